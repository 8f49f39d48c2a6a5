"""The proxy's own HTTP/1.1 upstream client, against raw loopback servers that misbehave
on purpose: closed keep-alive connections, chunked and informational answers, HEAD,
garbage, early answers and slow readers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstream.client import (
    ConnectError,
    Origin,
    StaleConnection,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
)
from tests.helpers.raw import RawHandler as Handler
from tests.helpers.raw import raw_servers
from tests.shadow_support import wait_until

pytestmark = pytest.mark.timeout(20)

RawServer = Callable[[Handler], Awaitable[Origin]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    async with raw_servers() as start:

        async def origin(handler: Handler) -> Origin:
            return Origin.parse("http", "127.0.0.1", await start(handler))

        yield origin


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    await c.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


async def body_of(
    client: UpstreamClient, origin: Origin, method: str = "GET", **kw: object
) -> tuple[int, bytes]:
    response = await client.request(
        origin, method, "/x", [], kw.get("body"),  # type: ignore[arg-type]
        connect_timeout=2, read_timeout=float(kw.get("read_timeout", 2)),  # type: ignore[arg-type]
    )  # fmt: skip
    data = b"".join([chunk async for chunk in response.chunks()])
    response.release()
    return response.status, data


async def seconds_to_time_out(client: UpstreamClient, origin: Origin, read_timeout: float) -> float:
    """How long a request took to fail with UpstreamTimeout (failing if it did not)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await body_of(client, origin, read_timeout=read_timeout)
    return loop.time() - started


async def error_reason(client: UpstreamClient, origin: Origin) -> str:
    """The reason of the UpstreamError a request failed with (failing if it did not)."""
    with pytest.raises(UpstreamError) as caught:
        await body_of(client, origin)
    return caught.value.reason


OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Counted:
    """A raw handler that counts the connections it was given."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.handler(reader, writer)


async def answers_every_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            break
        writer.write(OK_ANSWER)
        await writer.drain()
    writer.close()


def answers_once(answer: bytes, *, hold_open: bool = False) -> Handler:
    """A raw handler that reads one request, writes ``answer`` and closes the connection:
    at once, or (``hold_open``) once the client has closed its side."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        if hold_open:
            await reader.read()
        writer.close()

    return handler


async def answers_once_then_silence(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_request(reader)
    writer.write(OK_ANSWER)
    await writer.drain()
    await read_request(reader)
    await asyncio.sleep(10)


async def test_keep_alive_reuses_one_connection(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    handler = Counted(answers_every_request)
    origin = await raw_server(handler)
    for _ in range(5):
        assert await body_of(client, origin) == (200, b"ok")
    assert handler.connections == 1
    # Endpoints of different backends at the same address (each with its own Origin)
    # share the pooled connection; another address gets its own.
    same = Origin.parse("http", "127.0.0.1", origin.port)
    assert same is not origin and same.key == origin.key
    assert await body_of(client, same) == (200, b"ok")
    assert handler.connections == 1
    by_name = Origin.parse("http", "localhost", origin.port)
    assert by_name.key != origin.key
    assert await body_of(client, by_name) == (200, b"ok")
    assert handler.connections == 2


async def test_a_closed_idle_connection_is_retried_on_a_new_one(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    # Claims keep-alive, then closes: the next request finds a dead pooled connection.
    handler = Counted(answers_once(OK_ANSWER))
    origin = await raw_server(handler)
    for _ in range(4):
        assert await body_of(client, origin, "POST", body=b"{}") == (200, b"ok")
    assert handler.connections == 4


async def test_chunked_and_informational_answers(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n")
        for part in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    origin = await raw_server(handler)
    response = await client.request(origin, "GET", "/", [], None, connect_timeout=2, read_timeout=2)
    assert response.status == 200
    assert response.header("x-a") == "1"
    assert response.header("Link") is None
    assert b"".join([c async for c in response.chunks()]) == b"hello chunked world"
    response.release()


async def test_head_answer_has_no_body_and_is_not_reused(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    # The connection stays open until the client closes it: only the client's choice
    # not to reuse it makes the second request take a new one.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    handler = Counted(answers_once(answer, hold_open=True))
    origin = await raw_server(handler)
    for _ in range(2):
        status, body = await body_of(client, origin, "HEAD")
        assert (status, body) == (200, b"")
    assert handler.connections == 2


async def test_garbage_is_a_protocol_error(raw_server: RawServer, client: UpstreamClient) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP READY\r\n\r\n")
        await writer.drain()

    assert await error_reason(client, await raw_server(handler)) == "protocol"


async def test_silence_is_a_timeout_and_so_is_a_stalled_body(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(5)

    assert 0.25 < await seconds_to_time_out(client, await raw_server(silent), 0.3) < 1.5
    await seconds_to_time_out(client, await raw_server(stalls), 0.3)


async def test_a_reused_connection_times_out_on_its_new_shorter_timeout(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    """A connection keeps its timer between exchanges; one armed for a long timeout
    must not let a later exchange with a short one wait that long."""
    handler = Counted(answers_once_then_silence)
    origin = await raw_server(handler)
    assert await body_of(client, origin, read_timeout=8) == (200, b"ok")
    assert 0.25 < await seconds_to_time_out(client, origin, read_timeout=0.3) < 1.5
    assert handler.connections == 1  # the same connection, so its old timer was in play


async def test_a_kept_timer_still_times_out_a_later_silent_exchange(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    """The timer kept from a short first exchange re-arms for a longer second one, and
    that one times out at its own deadline, not never and not at the old one."""
    origin = await raw_server(answers_once_then_silence)
    assert await body_of(client, origin, read_timeout=0.3) == (200, b"ok")
    assert 0.75 < await seconds_to_time_out(client, origin, read_timeout=0.8) < 2.0


async def test_a_connection_idle_past_its_kept_timer_is_reused(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    handler = Counted(answers_every_request)
    origin = await raw_server(handler)
    assert await body_of(client, origin, read_timeout=0.1) == (200, b"ok")
    (idle,) = client._idle[origin.key]
    await wait_until(lambda: idle._timer is None, "the kept timer to fire on the idle connection")
    assert await body_of(client, origin, read_timeout=0.1) == (200, b"ok")
    assert handler.connections == 1


async def test_a_reused_connection_times_out_on_its_new_longer_timeout(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    """The other way round: the old, earlier timer fires and must not end the new
    exchange before its own deadline."""

    async def answers_then_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_ANSWER)
        await writer.drain()
        await read_request(reader)
        await asyncio.sleep(0.6)  # past the first exchange's timeout, within the second's
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()
        await asyncio.sleep(10)

    origin = await raw_server(answers_then_late)
    assert await body_of(client, origin, read_timeout=0.4) == (200, b"ok")
    assert await body_of(client, origin, read_timeout=5) == (200, b"late")


async def test_refused_connection(client: UpstreamClient) -> None:
    from tests.helpers.ports import free_port

    origin = Origin.parse("http", "127.0.0.1", free_port())
    assert await error_reason(client, origin) == "connect"


async def test_early_answer_while_the_body_is_still_streaming(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    never_done = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        await never_done.wait()
        yield b"never"

    origin = await raw_server(handler)
    response = await client.request(
        origin, "POST", "/", [], endless(), connect_timeout=2, read_timeout=2
    )
    assert response.status == 413
    response.close()


async def test_large_answer_to_a_slow_reader_is_intact_and_bounded(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    payload = os.urandom(8 * 1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()

    origin = await raw_server(handler)
    response = await client.request(origin, "GET", "/", [], None, connect_timeout=2, read_timeout=2)
    digest = hashlib.sha256()
    peak = 0
    async for chunk in response.chunks():
        digest.update(chunk)
        peak = max(peak, response._exchange.buffered)
        await asyncio.sleep(0)  # a slow client: the backend must wait, not pile up
    response.release()
    assert digest.digest() == hashlib.sha256(payload).digest()
    # Reading pauses above the high-water mark; what arrives in the meantime is one
    # socket read at most.
    assert peak < 2 * 1024 * 1024


async def test_connection_is_not_reused_after_an_early_answer(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    # The backend answers (keep-alive) before it has read the body. Reusing that
    # connection would hand the rest of the old body to the next request as its head.
    async def answers_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST"):
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(OK_ANSWER)
        await writer.drain()
        await reader.read()

    stalled = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 100
        await stalled.wait()
        yield b"y" * 100

    handler = Counted(answers_early)
    origin = await raw_server(handler)
    response = await client.request(
        origin, "POST", "/", [], slow_body(), content_length=200, connect_timeout=2,
        read_timeout=2,
    )  # fmt: skip
    assert response.status == 413
    assert [c async for c in response.chunks()] == []
    response.release()
    stalled.set()
    assert await body_of(client, origin) == (200, b"ok")
    assert handler.connections == 2


def _head_line_by_line(
    method: str, target: str, host: str, headers: list[tuple[str, str]], framing: str
) -> bytes:
    """The request head written out one line at a time, as RFC 9112 lays it out."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if framing:
        lines.append(framing)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


_SOME_HEADERS = [("Content-Type", "application/json"), ("X-Request-ID", "r1"), ("X-É", "ü")]


@pytest.mark.parametrize("headers", [[], _SOME_HEADERS[:1], _SOME_HEADERS])
@pytest.mark.parametrize(
    ("method", "body", "length", "framing"),
    [
        ("POST", b"{}", None, "Content-Length: 2"),
        ("POST", None, None, "Content-Length: 0"),  # a body method always says its length
        ("GET", None, None, ""),
        ("PUT", "stream", 5, "Content-Length: 5"),
        ("PUT", "stream", None, "Transfer-Encoding: chunked"),
    ],
)
def test_request_head_layout(
    headers: list[tuple[str, str]], method: str, body: object, length: int | None, framing: str
) -> None:
    from gateway.upstream.client import _request_head

    async def stream() -> AsyncIterator[bytes]:
        yield b"12345"

    source = stream() if body == "stream" else body
    head = _request_head(method, "/p?q=1", "h:81", headers, source, length)  # type: ignore[arg-type]
    assert head == _head_line_by_line(method, "/p?q=1", "h:81", headers, framing)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nafter",
        b"HTTP/1.1 000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 Nearly\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 1000 Big\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 OK\r\n\r\n",
    ],
)
async def test_switching_protocols_and_bad_status_lines_are_protocol_errors(
    raw_server: RawServer, client: UpstreamClient, answer: bytes
) -> None:
    origin = await raw_server(answers_once(answer, hold_open=True))
    assert await error_reason(client, origin) == "protocol"
    # Nothing is left open or pooled: the connection is gone with the exchange.
    await wait_until(lambda: client.open_connections(origin) == 0, "the connection closed")


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
async def test_an_answer_delimited_by_close_is_relayed_whole(
    raw_server: RawServer, client: UpstreamClient, version: bytes
) -> None:
    payload = os.urandom(300_000)  # past the high-water mark: reading pauses on the way

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/" + version + b" 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for start in range(0, len(payload), 50_000):
            writer.write(payload[start : start + 50_000])
            await writer.drain()
        writer.close()  # the end of the body

    origin = await raw_server(handler)
    status, data = await body_of(client, origin)
    assert status == 200
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    await wait_until(lambda: client.open_connections(origin) == 0, "the connection closed")


async def test_a_close_delimited_answer_cut_by_a_reset_is_an_error(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a clean close: the body is not complete

    response = await client.request(
        await raw_server(handler), "GET", "/x", [], None, connect_timeout=2, read_timeout=2
    )
    with pytest.raises(UpstreamError):
        async for _ in response.chunks():
            pass
    response.close()


async def test_a_head_or_204_answer_needs_no_close_to_end(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    origin = await raw_server(answers_once(b"HTTP/1.0 204 No Content\r\n\r\n", hold_open=True))
    assert await body_of(client, origin) == (204, b"")


async def test_open_connections_are_counted_by_origin(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    origin = await raw_server(answers_every_request)
    assert client.open_connections(origin) == 0
    assert await body_of(client, origin) == (200, b"ok")
    assert client.open_connections(origin) == 1  # idle in the pool
    first = await client.request(origin, "GET", "/x", [], None, connect_timeout=2, read_timeout=2)
    second = await client.request(origin, "GET", "/x", [], None, connect_timeout=2, read_timeout=2)
    assert client.open_connections(origin) == 2
    first.close()
    assert second.whole_body() == b"ok"
    second.release()  # read whole: back to the pool
    await wait_until(lambda: client.open_connections(origin) == 1, "the closed one uncounted")
    await client.close()
    await wait_until(lambda: client.open_connections(origin) == 0, "every connection closed")


async def test_a_refused_connection_is_a_connect_error(client: UpstreamClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        origin = Origin.parse("http", "127.0.0.1", port)
        with pytest.raises(ConnectError) as caught:
            await body_of(client, origin)
    assert caught.value.reason == "connect"


async def test_a_failing_body_source_is_not_taken_for_the_backend(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def reads_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        raise ConnectionResetError("the client went away")

    origin = await raw_server(reads_forever)
    with pytest.raises(ConnectionResetError, match="client went away"):
        await client.request(origin, "POST", "/x", [], body(), connect_timeout=2, read_timeout=5)


async def test_a_kept_alive_connection_dropped_unanswered_is_stale_when_the_caller_can_go_elsewhere(
    raw_server: RawServer, client: UpstreamClient
) -> None:
    async def once_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_ANSWER)
        await writer.drain()
        await read_request(reader)  # the next request on it: closed unanswered

    handler = Counted(once_then_drop)
    origin = await raw_server(handler)
    assert await body_of(client, origin) == (200, b"ok")
    with pytest.raises(StaleConnection):
        await client.request(
            origin, "GET", "/x", [], None, connect_timeout=2, read_timeout=2, elsewhere=True
        )
    assert handler.connections == 1  # not retried here: the caller sends it elsewhere
    assert await body_of(client, origin) == (200, b"ok")  # a new connection
    # Without ``elsewhere`` a dropped kept-alive connection is retried on a new one.
    assert await body_of(client, origin) == (200, b"ok")
    assert handler.connections == 3
