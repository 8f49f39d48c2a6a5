"""A raw HTTP/1.1 client on asyncio streams, for clients no library lets us be: slow,
silent, malformed, oversized. It reads answers by their Content-Length and tells when
(and whether) the server closed the connection. And raw servers, for backends that
misbehave exactly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lowercase names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, within: float = 5.0) -> Answer:
        """The next answer, whole (it must come within ``within`` seconds)."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await self.reader.readexactly(length)
        return Answer(status, headers, body)

    async def closed_within(self, seconds: float) -> float | None:
        """Seconds from opening until the server closed the connection (its reads give
        EOF or a reset), or None if it was still open ``seconds`` after this call."""
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return None
        except ConnectionError:
            pass
        return time.monotonic() - self.opened

    def close(self) -> None:
        self.writer.close()


class RawConnections:
    """Opens raw connections and closes every one it opened (the ``raw`` fixture)."""

    def __init__(self) -> None:
        self.opened: list[RawConnection] = []

    async def open(self, port: int, host: str = "127.0.0.1") -> RawConnection:
        conn = await RawConnection.open(port, host)
        self.opened.append(conn)
        return conn

    async def close_all(self) -> None:
        for conn in self.opened:
            conn.writer.close()
        for conn in self.opened:
            with contextlib.suppress(ConnectionError):
                await conn.writer.wait_closed()
        self.opened.clear()


def request(
    method: str = "GET", target: str = "/", headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """A request in bytes, with Host and (for a body) Content-Length."""
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[Callable[[RawHandler], Awaitable[int]]]:
    """``start(handler)`` serves ``handler`` on a free loopback port and returns the port.
    A connection the peer drops ends its handler quietly, and its socket is closed after;
    on the way out, handlers still running (the silent ones) are cancelled."""
    servers: list[asyncio.Server] = []
    handlers: set[asyncio.Task[None]] = set()

    async def start(handler: RawHandler) -> int:
        async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(closing, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    try:
        yield start
    finally:
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for server in servers:
            server.close()
            await server.wait_closed()
