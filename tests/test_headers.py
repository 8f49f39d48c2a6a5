"""Header hygiene at the edge, on the wire: what a backend is sent of a client's headers,
and that every answer to a routed request, gateway-made errors included, names its
variant."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app
from tests.helpers.ports import free_port
from tests.helpers.raw import RawConnections
from tests.support import gateway_document

pytestmark = pytest.mark.timeout(30)


class Headers:
    """An upstream that records the header lines it was sent, repeats included."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append([(k.lower(), v) for k, v in request.headers.items()])
        return web.json_response({})

    def last(self, name: str) -> list[str]:
        return [v for k, v in self.seen[-1] if k == name]


async def test_the_gateways_own_and_forwarding_headers_are_the_gateways(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    upstream = Headers()
    url = await start_app(catch_all_app(upstream.handle))
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": url}},
            [
                {"name": "strict", "match": {"path_prefix": "/strict"}, "champion": "one"},
                {
                    "name": "open",
                    "match": {"path_prefix": "/open"},
                    "champion": "one",
                    "split": {"allow_override": True},
                },
            ],
        )
    )
    sent = (
        "Host: public.example\r\n"
        "X-Forwarded-For: 203.0.113.7\r\n"
        "X-Forwarded-For: 198.51.100.2, 10.0.0.1\r\n"
        "X-Forwarded-Host: evil.example\r\n"
        "X-Forwarded-Proto: https\r\n"
        "X-Gateway-Shadow: 1\r\n"
        "X-Gateway-Variant: champion\r\n"
        "X-Gateway-Anything: x\r\n"
        "Connection: keep-alive, X-Hop\r\n"
        "X-Hop: secret\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "X-Kept: yes\r\n"
    )
    for path in ("/strict/x", "/open/x"):
        conn = await raw.open(gateway.proxy_port)
        await conn.send(f"GET {path} HTTP/1.1\r\n{sent}\r\n".encode())
        answer = await conn.answer()
        assert answer.status == 200
        assert upstream.last("x-forwarded-for") == [
            "203.0.113.7, 198.51.100.2, 10.0.0.1, 127.0.0.1"  # every hop, then the client
        ]
        assert upstream.last("x-forwarded-host") == ["public.example"]
        assert upstream.last("x-forwarded-proto") == ["http"]  # how the gateway was reached
        assert upstream.last("x-gateway-shadow") == []  # only the gateway marks a shadow call
        assert upstream.last("x-gateway-anything") == []
        assert upstream.last("x-hop") == [] and upstream.last("keep-alive") == []
        assert upstream.last("te") == []
        assert upstream.last("x-kept") == ["yes"]
        # The override header reaches the backend only where the route honours it.
        assert upstream.last("x-gateway-variant") == (["champion"] if path == "/open/x" else [])


async def errors_gateway(start_gateway: StartGateway, backend: dict[str, Any]) -> Any:
    return await start_gateway(
        gateway_document(
            {"down": backend},
            [{"name": "r", "match": {"path_prefix": "/"}, "champion": "down"}],
        )
    )


async def test_gateway_made_errors_to_routed_requests_name_the_variant(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    # 502: nothing listens there.
    gateway = await errors_gateway(start_gateway, {"url": f"http://127.0.0.1:{free_port()}"})
    conn = await raw.open(gateway.proxy_port)
    await conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = await conn.answer()
    assert answer.status == 502
    assert answer.headers["x-gateway-variant"] == "champion"

    # 504: a backend that does not answer in time.
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    url = await start_app(catch_all_app(slow))
    gateway = await errors_gateway(start_gateway, {"url": url, "timeout_seconds": 0.2})
    conn = await raw.open(gateway.proxy_port)
    await conn.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = await conn.answer()
    assert answer.status == 504
    assert answer.headers["x-gateway-variant"] == "champion"

    # 413: a body refused once the request was routed.
    conn = await raw.open(gateway.proxy_port)
    await conn.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n")
    answer = await conn.answer()
    assert answer.status == 413
    assert answer.headers["x-gateway-variant"] == "champion"
