"""A local LLM server for the stream benchmark: server-sent events, never the bottleneck.

Every request gets an OpenAI ``chat.completion.chunk`` stream: ``n`` chunks, one every
``interval_ms`` (a token each, ``"usage":null`` as OpenAI sends with
``stream_options.include_usage``), each stamped with the time it was written
(``"sent"``: CLOCK_MONOTONIC in microseconds, the same clock in every process), then a
final chunk with ``usage`` (``completion_tokens`` = ``n``) and ``data: [DONE]``. The
query string sets the shape: ``?n=200&interval_ms=50``; ``?bytes=10485760`` instead
sends that many bytes of events as fast as the reader takes them (the slow-consumer
test: written only while the socket takes them, so a reader that stops reading stops
the writing: ``GET /stats`` shows how much each answer got out).

A raw asyncio ``Protocol`` on uvloop, as ``bench.upstream``: one timer per stream and
chunk, a chunk formatted from a template and written with its chunked-encoding frame in
one ``write``. ``/stats`` also reports how late the timers fired (the server's own
lateness: driven directly, ``bench.stream`` shows it stays far below any proxy's).

``python -m bench.stream_upstream --port 8001``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Sequence
from typing import cast
from urllib.parse import parse_qsl

from bench.upstream import _BadRequest, request_end

HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: bench-stream-upstream\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
# One event, as vLLM or OpenAI send it (about 250 bytes), with the send time appended.
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1760000000,'
    b'"model":"bench","system_fingerprint":"fp_bench","choices":[{"index":0,"delta":'
    b'{"content":" token%d"},"logprobs":null,"finish_reason":null}],"usage":null,'
    b'"sent":%d}\n\n'
)
PROMPT_TOKENS = 17
FINAL = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1760000000,'
    b'"model":"bench","system_fingerprint":"fp_bench","choices":[],"usage":'
    b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d},"sent":%d}\n\n'
    b"data: [DONE]\n\n"
)
BULK_EVENT = CHUNK % (0, 0)
_BULK_WRITE = 64 * 1024
_BULK_FRAME = b"".join([BULK_EVENT] * (_BULK_WRITE // len(BULK_EVENT)))


def now_us() -> int:
    return time.monotonic_ns() // 1000


def frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stats:
    """What the server did, for ``GET /stats``."""

    def __init__(self) -> None:
        self.streams = 0
        self.open = 0
        self.chunks = 0
        self.late_us: list[int] = []  # per timer, how late it fired
        self.bulk: dict[int, int] = {}  # bytes written per bulk answer, by serial
        self.paused = 0  # bulk answers whose socket is full now

    def as_json(self) -> bytes:
        late = sorted(self.late_us)

        def pct(p: float) -> int:
            return late[min(len(late) - 1, int(p * len(late)))] if late else 0

        return json.dumps(
            {
                "streams": self.streams,
                "open": self.open,
                "chunks": self.chunks,
                "late_p50_us": pct(0.5),
                "late_p99_us": pct(0.99),
                "late_max_us": late[-1] if late else 0,
                "bulk_bytes": sorted(self.bulk.values()),
                "bulk_paused": self.paused,
            }
        ).encode()


class Ticker:
    """Sends every stream's chunks on time: streams due in the same millisecond share one
    timer (a list of them per millisecond slot), rather than one timer per chunk."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.slots: dict[int, list[tuple[StreamProtocol, int]]] = {}  # due ms -> streams
        self.base = time.monotonic()

    def add(self, stream: StreamProtocol, interval: float) -> None:
        step = max(1, round(interval * 1000))
        self._at(int((time.monotonic() - self.base) * 1000) + step, stream, step)

    def _at(self, due: int, stream: StreamProtocol, step: int) -> None:
        slot = self.slots.get(due)
        if slot is None:
            slot = self.slots[due] = []
            delay = self.base + due / 1000 - time.monotonic()
            self.loop.call_later(max(0.0, delay), self._fire, due)
        slot.append((stream, step))

    def _fire(self, due: int) -> None:
        streams = self.slots.pop(due, [])
        now = time.monotonic()
        self.stats.late_us.append(int((now - self.base - due / 1000) * 1e6))
        for stream, step in streams:
            if stream.tick():
                self._at(due + step, stream, step)


class StreamProtocol(asyncio.Protocol):
    """One connection: its requests, one at a time (keep-alive)."""

    def __init__(self, stats: Stats, ticker: Ticker) -> None:
        self.stats = stats
        self.ticker = ticker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # an answer is streaming
        self.close_after = False
        # Streamed answer
        self.n = 0
        self.sent = 0
        # Bulk answer
        self.bulk_left = 0
        self.bulk_id = 0
        self.can_write = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next_request()

    def _next_request(self) -> None:
        transport = self.transport
        if self.busy or transport is None:
            return
        try:
            found = request_end(self.buf)
        except _BadRequest:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return
        if found is None:
            return
        end, self.close_after = found
        line = bytes(self.buf[: self.buf.find(b"\r\n")])
        del self.buf[:end]
        target = line.split(b" ")[1].decode("latin-1") if line.count(b" ") >= 2 else "/"
        path, _, query = target.partition("?")
        params = dict(parse_qsl(query))
        if path == "/stats":
            body = self.stats.as_json()
            if "reset" in params:
                self.stats.late_us.clear()
                self.stats.bulk.clear()
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self._answered()
            return
        self.busy = True
        self.stats.streams += 1
        self.stats.open += 1
        transport.write(HEAD)
        if "bytes" in params:
            self.bulk_left = int(params["bytes"])
            self.bulk_id = self.stats.streams
            self.stats.bulk[self.bulk_id] = 0
            self._write_bulk()
            return
        self.n = int(params.get("n", "100"))
        self.sent = 0
        self.ticker.add(self, float(params.get("interval_ms", "50")) / 1000)

    def tick(self) -> bool:
        """Send the next chunk, stamped now; False once the answer is done."""
        transport = self.transport
        if transport is None:
            return False
        self.sent = sent = self.sent + 1
        self.stats.chunks += 1
        sent_us = time.monotonic_ns() // 1000
        if sent < self.n:
            transport.write(frame(CHUNK % (sent, sent_us)))
            return True
        # The final chunk follows the last token at once, as servers send it.
        total = PROMPT_TOKENS + self.n
        final = FINAL % (PROMPT_TOKENS, self.n, total, sent_us)
        transport.write(frame(CHUNK % (sent, sent_us)) + frame(final) + b"0\r\n\r\n")
        self.stats.open -= 1
        self.busy = False
        self._answered()
        return False

    def _answered(self) -> None:
        if self.close_after and self.transport is not None:
            self.transport.close()
            return
        if self.buf:
            self._next_request()

    # Bulk answers: written while the socket takes them.
    def pause_writing(self) -> None:
        self.can_write = False
        if self.bulk_left:
            self.stats.paused += 1

    def resume_writing(self) -> None:
        self.can_write = True
        if self.bulk_left:
            self.stats.paused -= 1
            self._write_bulk()

    def _write_bulk(self) -> None:
        transport = self.transport
        while self.bulk_left > 0 and self.can_write and transport is not None:
            data = _BULK_FRAME[: self.bulk_left]
            self.bulk_left -= len(data)
            self.stats.bulk[self.bulk_id] += len(data)
            transport.write(frame(data))
        if self.bulk_left <= 0 and self.busy and transport is not None:
            final = FINAL % (PROMPT_TOKENS, 1, PROMPT_TOKENS + 1, now_us())
            transport.write(frame(final) + b"0\r\n\r\n")
            self.stats.open -= 1
            self.busy = False
            self._answered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.stats.open -= 1
            if self.bulk_left and not self.can_write:
                self.stats.paused -= 1
            self.busy = False


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    ticker = Ticker(stats)
    server = await loop.create_server(
        lambda: StreamProtocol(stats, ticker), host, port, backlog=8192, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    from bench.loop import run

    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
