"""Upstream faults through a real gateway and real loopback backends: connect failures
retried elsewhere, ejection on failures and timeouts, active health checks, connection
caps and their queue, protocol errors answered 502, answers delimited by close, clients
that leave, and what the admin API and /metrics show of it all."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app, named_app
from tests.helpers.ports import free_port
from tests.helpers.raw import RawHandler, raw_servers
from tests.helpers.waiting import wait_until
from tests.shadow_support import scrape
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(60)

RawServer = Callable[[RawHandler], Awaitable[str]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawServer]:
    """Backends written at the socket level, to misbehave exactly; returns a base URL."""
    async with raw_servers() as start:

        async def url(handler: RawHandler) -> str:
            return f"http://127.0.0.1:{await start(handler)}"

        yield url


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answering(answer: bytes, *, close: bool = True) -> RawHandler:
    """Reads a request head, writes ``answer``; closes, or waits for the client to."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(answer)
        await writer.drain()
        if not close:
            await reader.read()

    return handler


async def hangs(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts, reads the request, never answers."""
    await read_head(reader)
    await asyncio.sleep(3600)


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def one_route(backend: dict[str, Any], **sections: Any) -> dict[str, Any]:
    return gateway_document(
        {"b": backend},
        [{"name": "r", "match": {"path_prefix": "/"}, "champion": "b"}],
        tracing={"enabled": False},
        **sections,
    )


async def get(http: aiohttp.ClientSession, gateway: Gateway, path: str = "/x") -> tuple[int, Any]:
    async with http.get(proxy_url(gateway, path)) as response:
        body = await response.read()
        try:
            return response.status, yaml.safe_load(body) if body else None
        except yaml.YAMLError:
            return response.status, body


async def route_view(http: aiohttp.ClientSession, gateway: Gateway) -> Any:
    async with http.get(admin_url(gateway, "/api/v1/routes/r")) as response:
        assert response.status == 200
        return await response.json()


# --- connect failures, failures in a row, timeouts -----------------------------------------


async def test_a_refused_connection_is_retried_on_another_endpoint_and_ejects_it(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = await start_app(named_app("one")), await start_app(named_app("two"))
    dead = refused_url()
    gateway = await start_gateway(one_route({"endpoints": [one, dead, two]}))
    statuses = [(await get(http, gateway))[0] for _ in range(30)]
    assert statuses == [200] * 30  # every refused attempt went to another endpoint
    metrics = await scrape(http, gateway)
    # Round robin sent it every third request until it was ejected after five.
    assert metrics.total("gateway_upstream_errors_total", route="r", reason="connect") == 5
    assert metrics.matching("gateway_endpoint_healthy", backend="b", endpoint=dead)[0][1] == 0
    assert metrics.total("gateway_endpoint_healthy", backend="b") == 2
    assert metrics.total(
        "gateway_endpoint_ejections_total", backend="b", endpoint=dead,
        reason="consecutive_failures",
    ) == 1  # fmt: skip
    view = (await route_view(http, gateway))["endpoints"]["b"]
    assert [(e["url"], e["healthy"]) for e in view] == [(one, True), (dead, False), (two, True)]
    assert view[1]["reason"] == "consecutive_failures"
    assert 29 < view[1]["ejected_for_seconds"] <= 30


async def test_a_lone_refusing_endpoint_is_a_502_and_never_retried(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(one_route({"url": refused_url()}))
    for _ in range(7):  # never ejected (nowhere else to go), never retried
        status, body = await get(http, gateway)
        assert status == 502
        assert body["error"]["code"] == "upstream_unavailable"
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_upstream_errors_total", route="r", reason="connect") == 7


async def test_5xx_answers_in_a_row_eject_but_are_relayed(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"oops": True}, status=500)

    good, bad = await start_app(named_app("good")), await start_app(catch_all_app(broken))
    backend = {"endpoints": [good, bad], "outlier_detection": {"consecutive_failures": 3}}
    gateway = await start_gateway(one_route(backend))
    statuses = [(await get(http, gateway))[0] for _ in range(20)]
    # An answer from the backend is the client's (sent, so never retried): three 500s
    # reach clients, then the endpoint is out and the rest go to the good one.
    assert statuses.count(500) == 3
    assert statuses[6:] == [200] * 14
    view = (await route_view(http, gateway))["endpoints"]["b"]
    assert [e["healthy"] for e in view] == [True, False]


async def test_timeouts_in_a_row_eject_a_hung_endpoint(
    start_app: StartApp,
    raw_upstream: RawServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    good, hung = await start_app(named_app("good")), await raw_upstream(hangs)
    backend = {"endpoints": [good, hung], "timeout_seconds": 0.2}
    gateway = await start_gateway(one_route(backend))
    statuses = [(await get(http, gateway))[0] for _ in range(20)]
    assert statuses.count(504) == 5  # consecutive_failures, then out
    assert statuses[10:] == [200] * 10
    metrics = await scrape(http, gateway)
    assert metrics.matching("gateway_endpoint_healthy", endpoint=hung)[0][1] == 0


async def test_an_ejected_endpoint_returns_after_its_time_and_doubles_if_still_bad(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    good = await start_app(named_app("good"))
    dead = refused_url()
    backend = {
        "endpoints": [good, dead],
        "outlier_detection": {"consecutive_failures": 2, "base_ejection_seconds": 0.3},
    }
    gateway = await start_gateway(one_route(backend))
    pool = gateway.runtime.pools["b"]
    while pool.endpoints[1].healthy(pool.clock()):
        assert (await get(http, gateway))[0] == 200
    assert pool.endpoints[1].last_ejection_seconds == pytest.approx(0.3)
    # Back after 0.3 s, on probation: the first request it gets fails, and it is out
    # again at once, for twice as long; the client never notices (retried).
    await wait_until(lambda: pool.endpoints[1].healthy(pool.clock()), "the ejection to end")
    for _ in range(2):
        assert (await get(http, gateway))[0] == 200
    assert not pool.endpoints[1].healthy(pool.clock())
    assert pool.endpoints[1].last_ejection_seconds == pytest.approx(0.6)
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_endpoint_ejections_total", endpoint=dead) == 2


async def test_kept_alive_connections_a_backend_drops_are_no_failures(
    raw_upstream: RawServer, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Says keep-alive, answers one request, and drops the next one unanswered: as a
        # backend does whose idle timeout fell just as the request came.
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)

    first, second = await raw_upstream(one_per_connection), await raw_upstream(one_per_connection)
    gateway = await start_gateway(one_route({"endpoints": [first, second]}))
    assert [(await get(http, gateway))[0] for _ in range(20)] == [200] * 20
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_upstream_errors_total") == 0
    assert metrics.total("gateway_endpoint_ejections_total") == 0
    assert metrics.total("gateway_endpoint_healthy") == 2


# --- active health checks -------------------------------------------------------------------


async def test_health_checks_take_an_endpoint_out_and_bring_it_back(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    ready = {"sick": True}
    checks: list[str] = []

    def app(name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            if request.path == "/serving/health":
                checks.append(name)
                sick = name == "sick" and ready["sick"]
                return web.Response(status=503 if sick else 200)
            return web.json_response({"backend": name})

        return catch_all_app(handle)

    fine, sick = await start_app(app("fine")), await start_app(app("sick"))
    backend = {
        "endpoints": [f"{fine}/serving", f"{sick}/serving"],
        "health_check": {
            "path": "/health", "interval_seconds": 0.05, "timeout_seconds": 0.5,
            "healthy_threshold": 2, "unhealthy_threshold": 2,
        },
    }  # fmt: skip
    gateway = await start_gateway(one_route(backend))
    pool = gateway.runtime.pools["b"]
    sick_endpoint = pool.endpoints[1]
    await wait_until(lambda: sick_endpoint.check_failing, "the failing checks to take it out")
    assert {(await get(http, gateway))[1]["backend"] for _ in range(10)} == {"fine"}
    metrics = await scrape(http, gateway)
    assert metrics.matching("gateway_endpoint_healthy", endpoint=f"{sick}/serving")[0][1] == 0
    assert metrics.total("gateway_endpoint_ejections_total", reason="health_check") == 1
    view = (await route_view(http, gateway))["endpoints"]["b"]
    assert view[1]["reason"] == "health_check"
    ready["sick"] = False
    await wait_until(lambda: not sick_endpoint.check_failing, "passing checks to bring it back")
    assert {(await get(http, gateway))[1]["backend"] for _ in range(10)} == {"fine", "sick"}
    assert {"fine", "sick"} <= set(checks)


async def test_every_endpoint_failing_its_checks_is_503_no_healthy_endpoint(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def unwell(request: web.Request) -> web.Response:
        return web.Response(status=500 if request.path == "/health" else 200)

    url = await start_app(catch_all_app(unwell))
    check = {"path": "/health", "interval_seconds": 0.05, "unhealthy_threshold": 1}
    gateway = await start_gateway(one_route({"url": url, "health_check": check}))
    endpoint = gateway.runtime.pools["b"].endpoints[0]
    await wait_until(lambda: endpoint.check_failing, "the endpoint to fail its check")
    status, body = await get(http, gateway)
    assert status == 503
    assert body["error"]["code"] == "no_healthy_endpoint"


# --- connection caps -------------------------------------------------------------------------


async def test_the_connection_cap_queues_then_answers_503_upstream_overloaded(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    arrived = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return web.json_response({"ok": True})

    url = await start_app(catch_all_app(slow))
    backend = {"url": url, "max_connections": 2, "queue_timeout_seconds": 0.3}
    gateway = await start_gateway(one_route(backend))
    held = [asyncio.create_task(get(http, gateway)) for _ in range(2)]
    await wait_until(lambda: arrived == 2, "two requests at the backend")
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await get(http, gateway)  # a third: waits 0.3 s for a slot, gets none
    waited = loop.time() - started
    assert status == 503
    assert body["error"]["code"] == "upstream_overloaded"
    assert 0.25 <= waited < 2.0
    assert arrived == 2  # the backend never saw it
    # One more waits, and gets the first slot that frees.
    queued = asyncio.create_task(get(http, gateway))
    pool = gateway.runtime.pools["b"]
    await wait_until(lambda: len(pool.waiting) == 1, "a request in the queue")
    release.set()
    assert [s for s, _ in await asyncio.gather(*held, queued)] == [200, 200, 200]
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_upstream_errors_total", reason="overloaded") == 1
    assert metrics.total("gateway_upstream_connections", backend="b") == 2  # kept alive
    assert pool.endpoints[0].active == 0


# --- protocol errors and close-delimited answers ----------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 000 Nothing\r\nContent-Length: 0\r\n\r\n",
        b"garbage, not HTTP\r\n\r\n",
    ],
)
async def test_switching_protocols_and_garbage_are_502_bad_upstream_response(
    raw_upstream: RawServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    answer: bytes,
) -> None:
    url = await raw_upstream(answering(answer, close=False))
    gateway = await start_gateway(one_route({"url": url}))
    async with http.get(proxy_url(gateway, "/x"), timeout=aiohttp.ClientTimeout(5)) as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == "bad_upstream_response"
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_upstream_errors_total", reason="protocol") == 1


async def test_an_answer_delimited_by_close_is_relayed_complete(
    raw_upstream: RawServer, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    payload = os.urandom(2 * 1024 * 1024)

    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for start in range(0, len(payload), 65536):
            writer.write(payload[start : start + 65536])
            await writer.drain()
        # The end of the answer is the end of the connection.

    gateway = await start_gateway(one_route({"url": await raw_upstream(http10)}))
    async with http.get(proxy_url(gateway, "/big")) as response:
        assert response.status == 200
        body = await response.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
    metrics = await scrape(http, gateway)
    assert metrics.total("gateway_upstream_errors_total") == 0


# --- clients that leave -----------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_frees_the_upstream_connection_at_once(
    raw_upstream: RawServer, start_gateway: StartGateway
) -> None:
    closed = asyncio.Event()

    async def thinks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # an LLM thinking: nothing more, until the gateway closes
        closed.set()

    url = await raw_upstream(thinks)
    gateway = await start_gateway(one_route({"url": url, "timeout_seconds": 30}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: gateway\r\n\r\n")
    await reader.readuntil(b"first")
    writer.transport.abort()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(closed.wait(), 5)  # not the 30 s read timeout
    assert loop.time() - started < 1.0
    pool = gateway.runtime.pools["b"]
    await wait_until(lambda: pool.endpoints[0].active == 0, "the slot freed")
    assert pool.endpoints[0].consecutive_failures == 0  # not the backend's fault
    assert gateway.upstream is not None
    await wait_until(
        lambda: gateway.upstream.open_connections(pool.endpoints[0].origin) == 0,  # type: ignore[union-attr]
        "no upstream connection left",
    )


async def test_a_client_leaving_mid_upload_is_not_the_backends_failure(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    async def reads_all(request: web.Request) -> web.Response:
        return web.json_response({"got": len(await request.read())})

    url = await start_app(catch_all_app(reads_all, client_max_size=64 * 1024 * 1024))
    gateway = await start_gateway(one_route({"url": url}))
    for _ in range(6):  # more than consecutive_failures
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
        )
        await writer.drain()
        writer.transport.abort()
    await wait_until(
        lambda: gateway.runtime.routes["r"].champion_lane.metrics.in_flight == 0,
        "the aborted requests to end",
    )
    endpoint = gateway.runtime.pools["b"].endpoints[0]
    assert endpoint.consecutive_failures == 0
    assert endpoint.active == 0
    assert (await get(http, gateway))[0] == 200


async def test_aborted_downloads_leave_no_reference_cycles(
    raw_upstream: RawServer, start_gateway: StartGateway
) -> None:
    """What a download a client aborted leaves must be freed by reference counting: the
    gateway runs the cycle collector rarely (app.tune_gc), and cycles through a closed
    connection's parser or a caught error's frames held megabytes per download."""

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
        block = b"x" * 65536
        while True:
            writer.write(block)
            await writer.drain()

    gateway = await start_gateway(one_route({"url": await raw_upstream(endless)}))
    endpoint = gateway.runtime.pools["b"].endpoints[0]
    assert gateway.upstream is not None
    upstream = gateway.upstream
    gc.collect()
    gc.disable()
    try:
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
            writer.write(b"GET /large HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await reader.readexactly(512 * 1024)
            writer.transport.abort()
            await wait_until(
                lambda: endpoint.active == 0 and upstream.open_connections(endpoint.origin) == 0,
                "the upstream connection closed",
            )
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = Counter(type(o).__name__ for o in gc.garbage)
        frames = [
            f"{o.f_code.co_filename}:{o.f_code.co_name}"
            for o in gc.garbage
            if isinstance(o, types.FrameType) and f"{os.sep}gateway{os.sep}" in o.f_code.co_filename
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert kinds["_Connection"] == kinds["_Exchange"] == kinds["UpstreamResponse"] == 0, kinds
    assert frames == []


# --- reload -----------------------------------------------------------------------------------


async def test_a_reload_keeps_endpoint_health_and_drops_a_removed_backends_series(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    good = await start_app(named_app("good"))
    dead = refused_url()
    other = await start_app(named_app("other"))
    backends: dict[str, Any] = {"b": {"endpoints": [good, dead]}, "c": {"url": other}}
    routes: list[dict[str, Any]] = [
        {"name": "r", "match": {"path_prefix": "/"}, "champion": "b"},
        {"name": "s", "match": {"path_prefix": "/s"}, "champion": "c"},
    ]
    document = gateway_document(backends, routes, tracing={"enabled": False})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    for _ in range(10):
        assert (await get(http, gateway))[0] == 200
    before = gateway.runtime.pools["b"]
    assert not before.endpoints[1].healthy(before.clock())
    metrics = await scrape(http, gateway)
    assert metrics.matching("gateway_upstream_connections", backend="c")
    # A changed timeout for b (a new pool, the same endpoints); c and its route removed.
    backends["b"]["timeout_seconds"] = 10
    del backends["c"]
    routes.pop()
    path.write_text(yaml.safe_dump(document))
    async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
        assert response.status == 200, await response.text()
    after = gateway.runtime.pools["b"]
    assert after is not before
    assert after.endpoints[1] is before.endpoints[1]
    assert not after.endpoints[1].healthy(after.clock())  # still out: no request fails
    assert [(await get(http, gateway))[0] for _ in range(4)] == [200] * 4
    metrics = await scrape(http, gateway)
    assert metrics.matching("gateway_endpoint_healthy", backend="b", endpoint=dead)[0][1] == 0
    assert not metrics.matching("gateway_upstream_connections", backend="c")
    assert not metrics.matching("gateway_endpoint_healthy", backend="c")
    assert not metrics.matching("gateway_requests_total", route="s")


def test_refused_url_is_refused() -> None:
    """The helper this file's refused endpoints rely on: nothing listens there."""
    port = int(refused_url().rsplit(":", 1)[1])
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
