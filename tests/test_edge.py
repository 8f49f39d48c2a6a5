"""The proxy listener against slow, idle, oversized and malformed clients, through real
sockets (``tests.helpers.raw``) to a real gateway in front of a real upstream.

Timeouts are configured short (fractions of a second) so that every case runs in about
a second; each test waits for what it expects with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from gateway.edge import RejectLog
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app, hung_app
from tests.helpers.raw import RawConnections, request
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(30)

HEADER_TIMEOUT = 0.6
IDLE_TIMEOUT = 1.0
BODY_TIMEOUT = 0.6
# Timers fire on time to within the event loop's granularity; a loaded CI machine may
# run a little late, never early.
SLACK = 1.5


def limits(**server: Any) -> dict[str, Any]:
    return {
        "header_timeout_seconds": HEADER_TIMEOUT,
        "idle_timeout_seconds": IDLE_TIMEOUT,
        "body_timeout_seconds": BODY_TIMEOUT,
        **server,
    }


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"path": request.raw_path, "headers": dict(request.headers), "length": len(body)}
    )


async def edge_gateway(start_app: StartApp, start_gateway: StartGateway, **server: Any) -> Gateway:
    upstream = await start_app(catch_all_app(echo))
    return await start_gateway(
        gateway_document(
            {"one": {"url": upstream}},
            [{"name": "r", "match": {"path_prefix": "/v1"}, "champion": "one"}],
            server=limits(**server),
        )
    )


def rejected(gateway: Gateway, reason: str) -> float:
    value = gateway.metrics.registry.get_sample_value(
        "gateway_requests_rejected_total", {"reason": reason}
    )
    return value or 0.0


# --- 1. slow and idle clients ---------------------------------------------------------


async def test_a_request_head_sent_too_slowly_gets_408_and_the_connection_closes(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    started = time.monotonic()
    await conn.send(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n")  # ...and never the end of it
    # Bytes that keep coming do not extend the deadline: the head must be done in time.
    for _ in range(3):
        await conn.send(b"X-Slow: 1\r\n")
        await asyncio.sleep(HEADER_TIMEOUT / 4)
    answer = await conn.answer(within=HEADER_TIMEOUT + SLACK)
    assert answer.status == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert answer.headers["connection"] == "close"
    closed = await conn.closed_within(SLACK)
    assert closed is not None
    assert HEADER_TIMEOUT <= time.monotonic() - started <= HEADER_TIMEOUT + SLACK
    assert rejected(gateway, "header_timeout") == 1


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    closed = await conn.closed_within(HEADER_TIMEOUT + SLACK)
    assert closed is not None and closed >= HEADER_TIMEOUT
    assert await conn.reader.read() == b""  # nothing was sent to a client that sent nothing


async def test_an_idle_kept_alive_connection_is_closed_at_the_idle_timeout(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    await conn.send(request("GET", "/v1/a"))
    assert (await conn.answer()).status == 200
    answered = time.monotonic()
    # Idle past the header timeout: that one is for heads, not for the wait between them.
    await asyncio.sleep(HEADER_TIMEOUT + 0.2)
    await conn.send(request("GET", "/v1/b"))
    assert (await conn.answer()).status == 200
    answered = time.monotonic()
    closed = await conn.closed_within(IDLE_TIMEOUT + SLACK)
    assert closed is not None
    assert IDLE_TIMEOUT - 0.05 <= time.monotonic() - answered <= IDLE_TIMEOUT + SLACK
    await wait_until(lambda: rejected(gateway, "idle_timeout") == 1, "the idle close counted")


STREAM_EVENTS = 8
STREAM_GAP = 0.2  # 8 events 0.2 s apart: longer than the header and the idle timeouts


async def events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(STREAM_EVENTS):
        await response.write(b"data: %d\n\n" % i)
        await asyncio.sleep(STREAM_GAP)
    await response.write_eof()
    return response


async def streamed_answer(conn: Any) -> bytes:
    """Ask for the event stream on ``conn`` and read its answer to the end."""
    await conn.send(request("GET", "/v1/events"))
    async with asyncio.timeout(STREAM_EVENTS * STREAM_GAP + 5):
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower()
        body: bytes = await conn.reader.readuntil(b"\r\n0\r\n\r\n")
    return body


async def stream_gateway(start_app: StartApp, start_gateway: StartGateway) -> Gateway:
    upstream = await start_app(catch_all_app(events))
    return await start_gateway(
        gateway_document(
            {"one": {"url": upstream}},
            [{"name": "r", "match": {"path_prefix": "/v1"}, "champion": "one"}],
            server=limits(),
        )
    )


async def test_a_long_stream_is_not_cut_by_the_idle_timeout_which_applies_after_it(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    """While a streamed answer is under way the connection's idle and head timers are
    let go of (edge.answer_is_a_stream); once it ends, the idle timeout counts again."""
    gateway = await stream_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    body = await streamed_answer(conn)
    assert body.count(b"data: ") == STREAM_EVENTS
    answered = time.monotonic()
    closed = await conn.closed_within(IDLE_TIMEOUT + SLACK)
    assert closed is not None
    assert time.monotonic() - answered >= IDLE_TIMEOUT - 0.05
    await wait_until(lambda: rejected(gateway, "idle_timeout") == 1, "the idle close counted")


async def test_a_slow_head_after_a_long_stream_gets_408(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await stream_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    await streamed_answer(conn)
    started = time.monotonic()
    await conn.send(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n")  # ...and never the end of it
    answer = await conn.answer(within=HEADER_TIMEOUT + SLACK)
    assert answer.status == 408
    assert time.monotonic() - started >= HEADER_TIMEOUT - 0.05
    assert rejected(gateway, "header_timeout") == 1


async def test_a_stalled_request_body_gets_408_and_the_connection_closes(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    await conn.send(
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70000
    )
    answer = await conn.answer(within=BODY_TIMEOUT + SLACK)
    assert answer.status == 408
    assert answer.json()["error"]["code"] == "request_timeout"
    assert answer.headers["x-gateway-variant"] == "champion"  # a routed request's answer
    assert await conn.closed_within(SLACK) is not None
    assert rejected(gateway, "body_timeout") == 1


async def test_a_slowly_flowing_body_is_not_cut_off(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    """The body timeout bounds each gap, not the whole upload."""
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    pieces = 6
    await conn.send(
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (pieces * 1000)
    )
    for _ in range(pieces):  # in all, well past the body timeout; each gap within it
        await conn.send(b"y" * 1000)
        await asyncio.sleep(BODY_TIMEOUT / 3)
    answer = await conn.answer()
    assert answer.status == 200
    assert answer.json()["length"] == pieces * 1000


# --- head size ------------------------------------------------------------------------


async def test_a_head_past_max_header_bytes_gets_431(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway, max_header_bytes=4096)
    # Under the limit, many headers: fine.
    conn = await raw.open(gateway.proxy_port)
    headers = {f"X-H{i}": "v" * 60 for i in range(50)}  # ~3.5 KB
    await conn.send(request("GET", "/v1/ok", headers))
    assert (await conn.answer()).status == 200
    # Over it, in one piece (many small headers, each well within any per-line limit).
    for many in ({f"X-H{i}": "v" * 60 for i in range(80)}, {"X-Big": "v" * 5000}):
        conn = await raw.open(gateway.proxy_port)
        await conn.send(request("GET", "/v1/big", many))
        answer = await conn.answer()
        assert answer.status == 431
        assert answer.json()["error"]["code"] == "headers_too_large"
        assert await conn.closed_within(SLACK) is not None
    # Over it, trickled without ever ending: refused once the limit is passed, not held.
    conn = await raw.open(gateway.proxy_port)
    await conn.send(b"GET /v1/x HTTP/1.1\r\nHost: a\r\n")
    for _ in range(6):
        await conn.send(b"X-More: " + b"v" * 1000 + b"\r\n")
    answer = await conn.answer()
    assert answer.status == 431
    assert rejected(gateway, "headers_too_large") == 3


async def test_the_head_limit_counts_a_head_split_over_many_reads(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway, max_header_bytes=4096)
    head = request("GET", "/v1/x", {f"X-H{i}": "v" * 60 for i in range(80)})
    conn = await raw.open(gateway.proxy_port)
    for start in range(0, len(head), 1000):  # each read is small; the head is not
        await conn.send(head[start : start + 1000])
        await asyncio.sleep(0.01)
    assert (await conn.answer()).status == 431


# --- connections ----------------------------------------------------------------------


async def test_connections_past_max_connections_are_refused_and_admin_answers(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw: RawConnections,
) -> None:
    gateway = await edge_gateway(
        start_app, start_gateway, max_connections=3, header_timeout_seconds=30
    )
    assert gateway.edge is not None
    held = [await raw.open(gateway.proxy_port) for _ in range(3)]
    edge = gateway.edge
    await wait_until(lambda: edge.connection_count == 3, "three connections held")
    extra = await raw.open(gateway.proxy_port)
    assert await extra.closed_within(SLACK) is not None  # closed at once, nothing sent
    async with http.get(admin_url(gateway, "/healthz")) as response:
        assert response.status == 200
    # Those held are served as usual.
    await held[0].send(request("GET", "/v1/a"))
    assert (await held[0].answer()).status == 200
    assert rejected(gateway, "max_connections") == 1
    # Once one goes, a new connection is taken again.
    held.pop().close()
    edge = gateway.edge
    await wait_until(lambda: edge.connection_count == 2, "the closed one gone")
    again = await raw.open(gateway.proxy_port)
    await again.send(request("GET", "/v1/b"))
    assert (await again.answer()).status == 200


# --- malformed requests ---------------------------------------------------------------


async def test_a_malformed_request_gets_a_json_400_and_one_debug_line(
    start_app: StartApp,
    start_gateway: StartGateway,
    raw: RawConnections,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    caplog.set_level(logging.DEBUG)
    garbage = [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to a plain-HTTP port
    ]
    for data in garbage:
        conn = await raw.open(gateway.proxy_port)
        await conn.send(data + b"\r\n\r\n")
        answer = await conn.answer()
        assert answer.status == 400, data
        error = answer.json()["error"]
        assert error["code"] == "bad_request" and error["request_id"]
        assert await conn.closed_within(SLACK) is not None
    assert rejected(gateway, "bad_request") == len(garbage)
    edge_lines = [
        r
        for r in caplog.records
        if r.name.startswith(("gateway.edge", "gateway.pipeline", "aiohttp"))
    ]
    assert not [r for r in edge_lines if r.exc_info], "no traceback for a client's error"
    assert not [r for r in edge_lines if r.levelno >= logging.WARNING]
    assert len([r for r in edge_lines if "rejected (bad_request)" in r.getMessage()]) == 4


async def test_a_malformed_chunked_body_is_a_counted_400(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway = await edge_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    await conn.send(
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n"
    )
    answer = await conn.answer()
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "bad_request"


def test_rejections_are_summed_up_at_most_once_an_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[str] = []
    log = RejectLog(counted.append, interval=60.0)
    caplog.set_level(logging.DEBUG, logger="gateway.edge")
    for _ in range(1000):
        log("bad_request", "garbage")
    log("header_timeout", "slow")
    assert len(counted) == 1001
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    log.flush()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1001" in warnings[0] and "bad_request 1000" in warnings[0]
    log.flush()  # nothing new: nothing said
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# --- drain ----------------------------------------------------------------------------


async def test_stop_is_bounded_by_the_drain_timeout_in_total(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """aiohttp alone waits the timeout for handlers, and again after cancelling them."""
    hung = asyncio.Event()
    upstream = await start_app(hung_app(hung))
    drain = 1.0
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": upstream, "timeout_seconds": 600}},
            [{"name": "r", "match": {"path_prefix": "/"}, "champion": "one"}],
            server={"drain_timeout_seconds": drain},
        )
    )
    pending = asyncio.create_task(http.get(proxy_url(gateway, "/hang")))
    await asyncio.wait_for(hung.wait(), 5)
    started = time.monotonic()
    await gateway.stop()
    took = time.monotonic() - started
    assert drain <= took < drain + 1.0, took
    with pytest.raises(aiohttp.ClientError):
        await pending
