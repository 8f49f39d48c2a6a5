"""Bounded buffering of request bodies: a body read to find its JSON ``model`` is read
only as far as needed, and bodies held in memory at once are capped over all requests
(``server.max_buffered_bytes``, past it 503 ``overloaded``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app
from tests.helpers.raw import RawConnections
from tests.helpers.waiting import wait_until
from tests.support import gateway_document

pytestmark = pytest.mark.timeout(30)


def model_routes(url: str, **server: Any) -> dict[str, Any]:
    return gateway_document(
        {"one": {"url": url}},
        [
            {"name": "m", "match": {"path_prefix": "/v1/chat", "model": "m"}, "champion": "one"},
            {"name": "other", "match": {"path_prefix": "/v1/chat"}, "champion": "one"},
        ],
        server=server,
    )


def budget_used(gateway: Gateway) -> int:
    assert gateway._proxy is not None
    return gateway._proxy.budget.used


async def test_a_body_naming_its_model_first_streams_on_without_waiting_for_the_rest(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    arrived = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        arrived.set()  # before the body is read: the gateway sent the head on already
        body = await request.read()
        return web.json_response({"length": len(body)})

    gateway = await start_gateway(model_routes(await start_app(catch_all_app(handle))))
    conn = await raw.open(gateway.proxy_port)
    first = b'{"model": "m", "stream": true, "messages": ['
    rest = b'{"role": "user", "content": "hi"}' * 2000 + b"]}"
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
        % (len(first) + len(rest), first)
    )
    # Were the whole body read before routing, the backend would see nothing until the
    # rest is sent, and this would time out.
    await asyncio.wait_for(arrived.wait(), 5)
    assert budget_used(gateway) <= len(first)  # only the start is held
    await conn.send(rest)
    answer = await conn.answer()
    assert answer.status == 200
    assert answer.json()["length"] == len(first) + len(rest)
    await wait_until(lambda: budget_used(gateway) == 0, "the held start given back")


async def test_bodies_held_at_once_are_capped_over_all_requests(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"length": len(await request.read())})

    gateway = await start_gateway(
        model_routes(
            await start_app(catch_all_app(handle)),
            max_body_bytes=10_000,
            max_buffered_bytes=10_000,
        )
    )
    # A body whose first member is nested must be read whole to find its model.
    start = b'{"messages": [' + b'"x",' * 1500  # 6,014 bytes, and more to come
    total = len(start) + 20
    slow = await raw.open(gateway.proxy_port)
    await slow.send(
        b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (total, start)
    )
    await wait_until(lambda: budget_used(gateway) == len(start), "the first body held")
    second = await raw.open(gateway.proxy_port)
    await second.send(
        b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
        % (len(start) + 2, start + b"]}")
    )
    answer = await second.answer()
    assert answer.status == 503
    assert answer.json()["error"]["code"] == "overloaded"
    assert budget_used(gateway) == len(start)  # the refused one gave back what it took
    await slow.send(b'"y"], "model": "m"}  ')
    assert (await slow.answer()).status == 200
    await wait_until(lambda: budget_used(gateway) == 0, "every held body given back")
    # A small body that arrives whole is routed as ever.
    third = await raw.open(gateway.proxy_port)
    body = b'{"messages": [], "model": "m"}'
    await third.send(
        b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    assert (await third.answer()).status == 200
    await wait_until(lambda: budget_used(gateway) == 0, "given back again")
    value = gateway.metrics.registry.get_sample_value(
        "gateway_requests_rejected_total", {"reason": "overloaded"}
    )
    assert value == 1
