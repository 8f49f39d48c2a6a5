"""Acceptance: a slowloris attack and a crowd of idle keep-alive connections do not take
the gateway down.

A real ``gateway run`` process gets 2,000 connections that send their request head one
byte a second and 2,000 kept-alive connections that made one request and went idle.
Meanwhile normal clients keep sending requests (their latencies are reported), and the
admin listener's /healthz keeps answering. The slow connections must be closed at the
header timeout, the idle ones at the idle timeout, and the gateway's open file count
must return to what it was before. The figures are printed (``pytest -s``).

The header timeout is the default (10 s); the idle timeout is set to 15 s instead of
60 s, so that the test takes about half a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartApp
from tests.helpers.apps import catch_all_app
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.support import gateway_document, spawn_gateway, wait_ready

SLOW = 2000
IDLE = 2000
HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 15.0
SLACK = 3.0  # a timer fires on time; 4,000 connections closing at once take a moment
BATCH = 200  # connections opened at once (the listener's backlog is 1,024)
# Files the gateway may hold besides its baseline, its client connections all closed:
# the count of backend connections (subtracted) is read a moment apart from the files.
FILES_MARGIN = 2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def describe_files(pid: int) -> str:
    """The process's sockets by TCP state and local port (for a failure message)."""
    inodes = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes[target[8:-1]] = name
    states: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    local = int(fields[1].split(":")[1], 16)
                    remote = int(fields[2].split(":")[1], 16)
                    shown = remote if local < 30000 else "*"  # a client's port says nothing
                    key = f"state {fields[3]} local {local} remote {shown}"
                    states[key] = states.get(key, 0) + 1
    return f"{len(os.listdir(f'/proc/{pid}/fd'))} files: {states}"


async def backend_connections(admin: str) -> int:
    """Connections the gateway holds to its backends (gateway_upstream_connections):
    pooled for reuse, they are not the clients' and may outlive them."""
    async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as response:
        text = await response.text()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_upstream_connections{")
        )
    )


async def files_but_backends(pid: int, admin: str) -> tuple[int, int]:
    """The gateway's open files less its backend connections, and those."""
    backends = await backend_connections(admin)
    return open_files(pid) - backends, backends


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.opened = time.monotonic()
        self.answered = 0.0  # when its one answer came (idle connections)
        self.closed: float | None = None  # when the gateway closed it


async def open_connection(port: int) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Connection(reader, writer)


async def watch_close(conn: Connection) -> None:
    with contextlib.suppress(ConnectionError):
        while await conn.reader.read(65536):
            pass
    conn.closed = time.monotonic()


async def make_idle(port: int) -> Connection:
    conn = await open_connection(port)
    conn.writer.write(b"GET /v1/idle HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await conn.reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await conn.reader.readexactly(length)
    conn.answered = time.monotonic()
    return conn


async def make_slow(port: int) -> Connection:
    conn = await open_connection(port)
    conn.writer.write(b"G")  # the first byte of a head that will never end
    return conn


async def in_batches(count: int, make: object, port: int) -> list[Connection]:
    made: list[Connection] = []
    while len(made) < count:
        batch = min(BATCH, count - len(made))
        made += await asyncio.gather(*(make(port) for _ in range(batch)))  # type: ignore[operator]
    return made


async def trickle(conns: list[Connection], stop: asyncio.Event) -> None:
    """One more byte of the head, every second, on every slow connection still open."""
    head = b"ET /v1/slow HTTP/1.1\r\nHost: a\r\n" + b"X-Slow: " + b"x" * 1000
    sent = 1
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        for conn in conns:
            if conn.closed is None and not conn.writer.is_closing():
                with contextlib.suppress(ConnectionError, RuntimeError):
                    conn.writer.write(head[sent - 1 : sent])
        sent += 1


async def normal_clients(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    async def client() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                started = time.monotonic()
                async with http.post(f"http://127.0.0.1:{port}/v1/normal", data=b"{}") as r:
                    assert r.status == 200
                    await r.read()
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.01)

    await asyncio.gather(*(client() for _ in range(4)))


async def health_checks(admin: str, stop: asyncio.Event, latencies: list[float]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop.is_set():
            started = time.monotonic()
            async with http.get(f"{admin}/healthz") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.2)


async def test_slow_and_idle_connections_do_not_take_the_gateway_down(
    start_app: StartApp, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SLOW + IDLE + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this test opens {needed} files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    upstream = await start_app(catch_all_app(answer))
    port, admin_port = free_port(), free_port()
    document = gateway_document(
        {"one": {"url": upstream}},
        [{"name": "r", "match": {"path_prefix": "/v1"}, "champion": "one"}],
        server={"port": port, "idle_timeout_seconds": IDLE_TIMEOUT},
        admin={"port": admin_port},
        state={"path": str(tmp_path / "state.db")},
        tracing={"enabled": False},
    )
    process = await spawn_gateway(document, tmp_path, capture=False)
    admin = f"http://127.0.0.1:{admin_port}"
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    conns: list[Connection] = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, process=process)
        # Warm up as the normal clients will load it: the gateway's pool then holds the
        # backend connections they need, and the baseline counts them.
        warm: list[float] = []
        warm_stop = asyncio.Event()
        warming = asyncio.create_task(normal_clients(port, warm_stop, warm))
        await wait_until(lambda: len(warm) >= 200, "the warm-up requests")
        warm_stop.set()
        await warming

        baseline, pooled_before = await files_but_backends(process.pid, admin)

        started = time.monotonic()
        idle = await in_batches(IDLE, make_idle, port)
        slow = await in_batches(SLOW, make_slow, port)
        conns = idle + slow
        opened = time.monotonic() - started
        watchers = [asyncio.create_task(watch_close(c)) for c in conns]
        peak = open_files(process.pid)
        latencies: list[float] = []
        health: list[float] = []
        tasks = [
            asyncio.create_task(trickle(slow, stop)),
            asyncio.create_task(normal_clients(port, stop, latencies)),
            asyncio.create_task(health_checks(admin, stop, health)),
        ]
        await asyncio.wait_for(
            asyncio.gather(*watchers), HEADER_TIMEOUT + IDLE_TIMEOUT + 2 * SLACK + opened
        )
        stop.set()
        await asyncio.gather(*tasks)

        slow_closes = [c.closed - c.opened for c in slow if c.closed is not None]
        idle_closes = [c.closed - c.answered for c in idle if c.closed is not None]

        async def back_to_baseline() -> tuple[int, int] | None:
            now = await files_but_backends(process.pid, admin)
            return now if now[0] <= baseline + FILES_MARGIN else None

        after, pooled_after = await wait_until(
            back_to_baseline,
            f"the gateway's files back to the baseline {baseline} ({describe_files(process.pid)})",
            within=20,
        )
        print(
            f"\nslowloris: {SLOW} slow + {IDLE} idle connections, opened in {opened:.1f}s\n"
            f"  normal clients: {len(latencies)} requests, p50 "
            f"{statistics.median(latencies) * 1000:.1f} ms, p99 "
            f"{percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms\n"
            f"  admin /healthz: {len(health)} answers, max {max(health) * 1000:.1f} ms\n"
            f"  slow closed after {min(slow_closes):.2f}-{max(slow_closes):.2f}s "
            f"(header timeout {HEADER_TIMEOUT:g}s)\n"
            f"  idle closed after {min(idle_closes):.2f}-{max(idle_closes):.2f}s "
            f"(idle timeout {IDLE_TIMEOUT:g}s)\n"
            f"  gateway files (less backend connections): {baseline} before, {peak} with the "
            f"connections, {after} after; backend connections pooled: {pooled_before} before, "
            f"{pooled_after} after"
        )
        assert len(slow_closes) == SLOW and len(idle_closes) == IDLE
        assert min(slow_closes) >= HEADER_TIMEOUT - 0.5
        assert max(slow_closes) <= HEADER_TIMEOUT + SLACK + opened
        assert min(idle_closes) >= IDLE_TIMEOUT - 0.5 and max(idle_closes) <= IDLE_TIMEOUT + SLACK
        assert peak >= baseline + SLOW + IDLE  # they really were all open at once
        assert len(latencies) > 100 and percentile(latencies, 0.99) < 1.0
        assert len(health) > 20 and max(health) < 1.0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for conn in conns:
            conn.writer.close()
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
