"""Writes held until the end of an event-loop pass (gateway.writes), on real sockets.

The first write of a pass goes out at once; the rest of the pass's writes wait for its
end.

Each test writes through a real transport to one end of a socket pair and reads the
other end without the event loop: a write the kernel has taken is readable at once, so
"nothing readable yet" proves the bytes are still held, and one loop step later they
must all be there."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.writes import FLUSH_BYTES, BatchedServer, BatchedTransport, WriteBatch
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.timeout(20)
WAIT_SECONDS = 5.0


Pair = tuple[BatchedTransport, socket.socket]
OpenPair = Callable[[WriteBatch], Awaitable[Pair]]


@pytest.fixture
async def open_pair() -> AsyncIterator[OpenPair]:
    """A batched transport on one end of a socket pair, and the raw other end."""
    opened: list[tuple[asyncio.Transport, socket.socket]] = []

    async def open_one(batch: WriteBatch) -> Pair:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, sock=ours
        )
        opened.append((transport, theirs))
        return batch.wrap(transport), theirs

    yield open_one
    for transport, theirs in opened:
        transport.abort()
        theirs.close()


def readable_now(sock: socket.socket) -> bytes:
    """What the peer can read right now, without waiting (b"" for nothing yet)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def read_until(sock: socket.socket, size: int) -> bytes:
    """At least ``size`` bytes from the peer; fails, showing what came, after
    WAIT_SECONDS."""
    got = bytearray()

    def enough() -> bool:
        got.extend(readable_now(sock))
        return len(got) >= size

    try:
        await wait_until(enough, f"{size} bytes from the peer", within=WAIT_SECONDS, every=0.001)
    except AssertionError as error:
        raise AssertionError(f"{error}; got {bytes(got)!r}") from None
    return bytes(got)


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def until_closed(sock: socket.socket) -> bool:
    return await wait_until(
        lambda: peer_closed(sock), "the peer to see the close", within=WAIT_SECONDS, every=0.001
    )


async def test_a_pass_first_write_goes_at_once_the_rest_wait_for_its_end(
    open_pair: OpenPair,
) -> None:
    batch = WriteBatch()
    (one, peer_one), (two, peer_two) = await open_pair(batch), await open_pair(batch)

    one.write(b"first ")
    assert readable_now(peer_one) == b"first "  # at once: light load adds no delay
    two.write(b"other")
    one.writelines([b"second ", b"third"])

    assert readable_now(peer_one) == b"" and readable_now(peer_two) == b""
    assert one.held_bytes == len(b"second third") and two.held_bytes == len(b"other")
    assert one.get_write_buffer_size() >= one.held_bytes
    await asyncio.sleep(0)  # one loop step: the end of the pass
    assert await read_until(peer_one, 12) == b"second third"
    assert await read_until(peer_two, 5) == b"other"
    assert one.held_bytes == two.held_bytes == 0


async def test_every_pass_sends_its_first_write_at_once(open_pair: OpenPair) -> None:
    batch = WriteBatch()
    transport, peer = await open_pair(batch)
    for n in range(3):
        transport.write(b"pass %d;" % n)
        assert readable_now(peer) == b"pass %d;" % n
        transport.write(b"more")
        assert readable_now(peer) == b""
        assert await read_until(peer, 4) == b"more"


async def test_a_reused_buffer_does_not_change_what_is_sent(open_pair: OpenPair) -> None:
    transport, peer = await open_pair(WriteBatch())
    transport.write(b"opens the pass: ")
    buffer = bytearray(b"as written")
    transport.write(buffer)
    transport.write(memoryview(b" and a view"))
    buffer[:] = b"overwritten"
    assert await read_until(peer, 37) == b"opens the pass: as written and a view"


async def test_empty_writes_hold_nothing(open_pair: OpenPair) -> None:
    transport, _ = await open_pair(WriteBatch())
    transport.write(b"")
    transport.writelines([])
    assert transport.held_bytes == 0


async def test_close_sends_what_is_held_first(open_pair: OpenPair) -> None:
    transport, peer = await open_pair(WriteBatch())
    transport.write(b"sent, ")
    transport.write(b"last words")
    assert transport.held_bytes == 10
    transport.close()
    assert transport.is_closing()
    assert await read_until(peer, 16) == b"sent, last words"
    assert await until_closed(peer)


async def test_abort_drops_what_is_held(open_pair: OpenPair) -> None:
    transport, peer = await open_pair(WriteBatch())
    transport.write(b"sent")
    transport.write(b"never sent")
    transport.abort()
    assert transport.held_bytes == 0
    assert await read_until(peer, 4) == b"sent"
    assert await until_closed(peer)
    assert readable_now(peer) == b""


async def test_a_large_write_goes_out_at_once(open_pair: OpenPair) -> None:
    transport, peer = await open_pair(WriteBatch())
    transport.write(b"sent, ")
    transport.write(b"small ")
    assert readable_now(peer) == b"sent, "
    big = b"x" * FLUSH_BYTES
    transport.write(big)
    assert transport.held_bytes == 0
    # Readable before the loop has run: written at the call, not at the end of the pass.
    assert readable_now(peer).startswith(b"small x")


async def test_a_large_write_arrives_whole_and_in_order(open_pair: OpenPair) -> None:
    transport, peer = await open_pair(WriteBatch())
    payload = bytes(range(256)) * (3 * FLUSH_BYTES // 256)
    transport.write(b"(")
    transport.write(b"<")
    transport.write(payload)
    transport.write(b">")
    got = await read_until(peer, len(payload) + 3)
    assert got == b"(<" + payload + b">"


async def test_a_peer_gone_before_the_flush_loses_only_its_own_bytes(
    open_pair: OpenPair,
) -> None:
    batch = WriteBatch()
    (gone, _), (alive, peer) = await open_pair(batch), await open_pair(batch)
    alive.write(b"first, ")
    gone.write(b"to nobody")
    alive.write(b"to someone")
    gone.transport.close()  # closed under the batch, as when the peer resets
    batch.flush()
    assert gone.held_bytes == 0
    assert await read_until(peer, 17) == b"first, to someone"


async def test_the_wrapper_passes_the_rest_through(open_pair: OpenPair) -> None:
    transport, _ = await open_pair(WriteBatch())
    inner = transport.transport
    assert transport.get_extra_info("socket") is inner.get_extra_info("socket")
    assert transport.get_protocol() is inner.get_protocol()
    assert transport.is_reading()
    transport.pause_reading()
    assert not inner.is_reading()
    transport.resume_reading()
    transport.set_write_buffer_limits(high=4096, low=1024)
    assert inner.get_write_buffer_limits() == transport.get_write_buffer_limits() == (1024, 4096)


async def test_a_force_closed_answer_with_held_writes_arrives_whole() -> None:
    """An answer whose last writes are held, on a connection aiohttp closes after it,
    arrives whole and in order before the close. (aiohttp closes in a later pass than
    the answer's writes; that close() itself sends held bytes is tested above.)"""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(b"held one, held two")
        response.force_close()
        await response.prepare(request)  # the head: the pass's first write, sent at once
        await response.write(b"held one, ")
        await response.write_eof(b"held two")
        return response

    runner = web.ServerRunner(BatchedServer(handler, writes=WriteBatch()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), WAIT_SECONDS)  # until closed
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert body == b"held one, held two"
    finally:
        await runner.cleanup()


class _WriteFails(asyncio.Transport):
    """A transport whose write fails in a way no real one is known to: the batch must
    still deliver every other connection's bytes, and end this connection."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raise ValueError("unexpected")

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


async def test_a_failing_connection_does_not_strand_the_others(open_pair: OpenPair) -> None:
    batch = WriteBatch()
    alive, peer = await open_pair(batch)
    failing = batch.wrap(_WriteFails())
    alive.write(b"first, ")  # opens the pass
    failing.write(b"lost")
    alive.write(b"still delivered")
    batch.flush()
    assert failing.transport.is_closing()  # aborted: its peer sees a reset, not a hang
    assert await read_until(peer, 22) == b"first, still delivered"
    # The next pass works as usual.
    alive.write(b"!")
    assert await read_until(peer, 1) == b"!"
