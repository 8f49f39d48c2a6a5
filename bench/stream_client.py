"""The stream benchmark's client: C concurrent event streams, every chunk timed.

Opens ``--streams`` connections spread over ``--ramp`` seconds, asks each for one answer
of ``bench.stream_upstream`` (``?n=N&interval_ms=I``) through ``--url``, and records
for every chunk the delay from the upstream's send (its ``"sent"`` stamp, CLOCK_MONOTONIC
in microseconds) to its arrival here, the time to first chunk of every stream, and
whether every stream came complete (N token chunks, the ``usage`` chunk, ``[DONE]``
and a clean end of the chunked body). A raw asyncio protocol with httptools' parser,
so that the client costs a few microseconds per chunk and stays off the measurement.

With ``--stall-after BYTES`` every stream instead stops reading after that many body
bytes and holds its connection open for ``--hold`` seconds (slow consumers).

Prints one JSON object. ``python -m bench.stream_client --url http://127.0.0.1:8080/x``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import httptools


def now_us() -> int:
    return time.monotonic_ns() // 1000


class Run:
    def __init__(self, expected_chunks: int, stall_after: int | None) -> None:
        self.expected = expected_chunks  # token chunks + the usage chunk
        self.stall_after = stall_after
        self.delays: list[int] = []
        self.ttfc: list[int] = []
        self.complete = 0
        self.failed = 0
        self.chunks = 0
        self.usage_ok = 0
        self.received_bytes: list[int] = []
        self.finished = 0
        self.done: asyncio.Future[None] | None = None
        self.total = 0


class StreamClient(asyncio.Protocol):
    def __init__(self, run: Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending = b""
        self.recv = 0
        self.started = 0
        self.first = 0
        self.chunks = 0
        self.done_seen = False
        self.usage_seen = False
        self.ended = False
        self.body_bytes = 0
        self.stalled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.started = now_us()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.recv = now_us()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(False)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        run = self.run
        if run.stall_after is not None:
            if self.body_bytes >= run.stall_after and not self.stalled and self.transport:
                self.stalled = True
                self.transport.pause_reading()
            return
        data = self.pending + body if self.pending else body
        start = 0
        recv = self.recv
        delays = run.delays
        while True:
            end = data.find(b"\n\n", start)
            if end < 0:
                break
            event = data[start:end]
            start = end + 2
            if event == b"data: [DONE]":
                self.done_seen = True
                continue
            colon = event.rfind(b":")
            delays.append(recv - int(event[colon + 1 : -1]))
            if not self.chunks:
                self.first = recv
            self.chunks += 1
            if b'"usage":{' in event:
                self.usage_seen = True
        self.pending = data[start:]

    def on_message_complete(self) -> None:
        self.ended = True
        self._finish(True)

    def _finish(self, clean: bool) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        run = self.run
        if self.first:
            run.ttfc.append(self.first - self.started)
        run.chunks += self.chunks
        run.received_bytes.append(self.body_bytes)
        ok = (
            self.ended
            and self.done_seen
            and self.usage_seen
            and self.chunks == run.expected
            and not self.pending
        )
        if run.stall_after is None:
            if ok:
                run.complete += 1
            else:
                run.failed += 1
        if self.usage_seen:
            run.usage_ok += 1
        self.transport = None
        run.finished += 1
        if run.finished == run.total and run.done is not None and not run.done.done():
            run.done.set_result(None)


def _pct(values: list[int], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(p * len(values)))] / 1000  # ms


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    path = url.path or "/"
    if args.stall_after is not None:
        query = f"bytes={args.bytes}"
    else:
        query = f"n={args.chunks}&interval_ms={args.interval_ms}"
    target = f"{path}?{query}"
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    run = Run(args.chunks + 1, args.stall_after)
    run.total = args.streams
    run.done = loop.create_future()
    transports: list[asyncio.BaseTransport] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = loop.time()
    errors: list[str] = []

    async def open_one(delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            if args.stall_after is None:
                transport, _ = await loop.create_connection(
                    lambda: StreamClient(run, request), host, port
                )
            else:
                # A small receive buffer, set before connecting: the kernel must not
                # take megabytes of the answer on a stalled reader's behalf.
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                transport, _ = await loop.create_connection(
                    lambda: StreamClient(run, request), sock=sock
                )
            transports.append(transport)
        except OSError as error:
            errors.append(str(error))
            run.failed += 1
            run.finished += 1
            if run.finished == run.total and run.done is not None and not run.done.done():
                run.done.set_result(None)

    step = args.ramp / max(1, args.streams)
    openers = [asyncio.ensure_future(open_one(i * step)) for i in range(args.streams)]
    await asyncio.gather(*openers)
    opened = loop.time() - t0
    if args.stall_after is not None:
        await asyncio.sleep(args.hold)
        for transport in transports:
            transport.abort()
        await asyncio.wait_for(asyncio.shield(run.done), 10)
    else:
        try:
            await asyncio.wait_for(asyncio.shield(run.done), args.timeout)
        except TimeoutError:
            errors.append("timeout")
            for transport in transports:
                transport.abort()
            await asyncio.sleep(0.5)
    wall = loop.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    delays = sorted(run.delays)
    ttfc = sorted(run.ttfc)
    return {
        "streams": args.streams,
        "complete": run.complete,
        "failed": run.failed,
        "usage_chunks": run.usage_ok,
        "chunks": run.chunks,
        "expected_chunks": args.streams * (args.chunks + 1),
        "delay_ms": {
            "p50": _pct(delays, 0.5),
            "p99": _pct(delays, 0.99),
            "p999": _pct(delays, 0.999),
            "max": delays[-1] / 1000 if delays else float("nan"),
        },
        "ttfc_ms": {"p50": _pct(ttfc, 0.5), "p99": _pct(ttfc, 0.99), "max": _pct(ttfc, 1.0)},
        "received_bytes": sorted(run.received_bytes),
        "opened_s": round(opened, 3),
        "wall_s": round(wall, 3),
        "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 3),
        "errors": errors[:5],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=100, help="token chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to open all streams")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--stall-after", type=int, default=None, help="stop reading after")
    parser.add_argument("--bytes", type=int, default=10 * 1024 * 1024, help="stalled answers")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds stalled")
    args = parser.parse_args(argv)
    from bench.loop import run

    result = run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
