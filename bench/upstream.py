"""A fast local upstream that answers every request with the same JSON.

One more port answers as a *challenger* would: the same answer with scores that moved a
little (``CHALLENGER_BODY``). The shadow benchmark mirrors to it, so every comparison
finds a real difference and takes the full path a real challenger costs, rather than the
shortcut two identical answers get.

nginx serves it when installed; otherwise a raw asyncio ``Protocol`` (on uvloop) does,
with just enough HTTP/1.1 to keep connections alive: find the end of the headers, skip
the body (Content-Length or chunked), write a prebuilt answer. No parser object, no
handler, no allocation beyond the receive buffer, so it stays far ahead of any proxy
put in front of it (``bench.run`` measures it directly to show that).

Run alone: ``python -m bench.upstream --port 8001 [--port 8002 ...] [--challenger-port 8009]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from bench import nginx
from bench.procs import Child, Children, bench_env, free_port, tcp_open

# Shaped like a model server's answer, with OpenAI-style usage so that trace recording
# has token counts to bucket.
CANNED_BODY = (
    b'{"id":"bench-1","model":"bench","predictions":[[0.12,0.88]],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}'
)
# A retrained model: same fields, scores off by 1e-4 (beyond the default tolerance).
CHALLENGER_BODY = CANNED_BODY.replace(b"[[0.12,0.88]]", b"[[0.1201,0.8799]]")
assert CHALLENGER_BODY != CANNED_BODY


def http_response(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Server: bench-upstream\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n" % len(body)
    ) + body


_MAX_HEAD = 64 * 1024


class _BadRequest(Exception):
    pass


def _chunked_end(buf: bytearray, start: int) -> int | None:
    """Offset just past a chunked body starting at ``start``, or None if incomplete."""
    pos = start
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _BadRequest from None
        pos = line_end + 2
        if size == 0:
            # Trailer fields, then the empty line.
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return None
                if line_end == pos:
                    return pos + 2
                pos = line_end + 2
        pos += size + 2
        if pos > len(buf):
            return None


def request_end(buf: bytearray) -> tuple[int, bool] | None:
    """(offset just past the first complete request, close after it) or None if incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        if len(buf) > _MAX_HEAD:
            raise _BadRequest
        return None
    head = bytes(buf[:head_end]).lower()
    close = b"\r\nconnection: close" in head
    body_start = head_end + 4
    if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
        end = _chunked_end(buf, body_start)
        return None if end is None else (end, close)
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return body_start, close
    value_end = head.find(b"\r\n", at + 2)
    try:
        length = int(head[at + 17 : value_end if value_end >= 0 else None])
    except ValueError:
        raise _BadRequest from None
    end = body_start + length
    return (end, close) if end <= len(buf) else None


class CannedProtocol(asyncio.Protocol):
    __slots__ = ("_buf", "_response", "_transport")

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        buf = self._buf
        buf += data
        answered = 0
        consumed = 0
        close = False
        try:
            while not close:
                view = buf if consumed == 0 else buf[consumed:]
                found = request_end(view)
                if found is None:
                    break
                end, close = found
                consumed += end
                answered += 1
        except _BadRequest:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return
        if consumed:
            del buf[:consumed]
        if answered:
            # Pipelined requests get their answers in one write.
            transport.write(self._response * answered)
        if close:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, bodies: Mapping[int, bytes]) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(
            functools.partial(CannedProtocol, http_response(body)),
            host,
            port,
            backlog=4096,
            reuse_address=True,
        )
        for port, body in bodies.items()
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


@dataclass(frozen=True, slots=True)
class Upstream:
    kind: str  # "nginx" or "python"
    host: str
    ports: tuple[int, ...]
    challenger_port: int  # answers with CHALLENGER_BODY
    child: Child

    @property
    def challenger_url(self) -> str:
        return f"http://{self.host}:{self.challenger_port}"

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.ports]


def start_upstream(
    children: Children,
    ports: Sequence[int],
    *,
    prefer: str = "auto",
    cpus: tuple[int, ...] | None = None,
) -> Upstream:
    """Start the canned upstream on ``ports`` and a challenger port: nginx when installed
    (unless prefer='python')."""
    challenger = free_port()
    bodies = {**dict.fromkeys(ports, CANNED_BODY), challenger: CHALLENGER_BODY}
    binary = nginx.nginx_binary() if prefer in ("auto", "nginx") else None
    if prefer == "nginx" and binary is None:
        raise RuntimeError("--upstream nginx: nginx is not installed")
    if binary is not None:
        prefix = children.workdir / "nginx-upstream"
        args = nginx.prepare(prefix, nginx.canned_config(prefix, bodies))
        child = children.start("upstream-nginx", [binary, *args], cpus=cpus)
        kind = "nginx"
    else:
        argv = [sys.executable, "-m", "bench.upstream", "--challenger-port", str(challenger)]
        for port in ports:
            argv += ["--port", str(port)]
        child = children.start("upstream-python", argv, cpus=cpus, env=bench_env())
        kind = "python"
    children.wait_ready(child, lambda: all(tcp_open("127.0.0.1", p) for p in bodies))
    return Upstream(kind, "127.0.0.1", tuple(ports), challenger, child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--challenger-port", type=int, default=None)
    args = parser.parse_args(argv)
    from bench.loop import run

    bodies = dict.fromkeys(args.port, CANNED_BODY)
    if args.challenger_port is not None:
        bodies[args.challenger_port] = CHALLENGER_BODY
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.host, bodies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
