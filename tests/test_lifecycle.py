"""Process lifecycle: SIGTERM drains in-flight requests, then exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartApp
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.support import gateway_document, spawn_gateway, wait_ready


async def _in_flight(session: aiohttp.ClientSession, admin: str) -> float:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_requests_in_flight":
            total += sum(sample.value for sample in family.samples)
    return total


async def _wait_in_flight(session: aiohttp.ClientSession, admin: str, n: int) -> None:
    async def in_flight() -> bool:
        return await _in_flight(session, admin) >= n

    await wait_until(in_flight, f"{n} requests in flight", within=10, every=0.05)


async def _gateway_in_front_of(
    slow: Callable[[web.Request], Awaitable[web.StreamResponse]],
    start_app: StartApp,
    tmp_path: Path,
    *,
    capture: bool,
) -> tuple[asyncio.subprocess.Process, int, str]:
    """A `gateway run` process routing everything to an upstream serving POST /slow."""
    app = web.Application()
    app.router.add_post("/slow", slow)
    upstream = await start_app(app)
    port, admin_port = free_port(), free_port()
    document = gateway_document(
        {"one": {"url": upstream}},
        [{"name": "s", "match": {"path_prefix": "/"}, "champion": "one"}],
        server={"port": port},
        admin={"port": admin_port},
        state={"path": str(tmp_path / "state.db")},
    )
    process = await spawn_gateway(document, tmp_path, capture=capture)
    return process, port, f"http://127.0.0.1:{admin_port}"


async def test_sigterm_lets_30_slow_requests_finish_then_exits_0(
    start_app: StartApp, tmp_path: Path
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.json_response({"ok": request.headers["X-Request-ID"]})

    process, port, admin = await _gateway_in_front_of(slow, start_app, tmp_path, capture=True)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, admin, process=process)

            async def call(i: int) -> tuple[int, str]:
                url = f"http://127.0.0.1:{port}/slow"
                async with session.post(url, headers={"X-Request-ID": f"slow-{i}"}) as response:
                    return response.status, (await response.json())["ok"]

            calls = [asyncio.create_task(call(i)) for i in range(30)]
            await _wait_in_flight(session, admin, 30)
            process.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=15)
        assert sorted(results) == sorted((200, f"slow-{i}") for i in range(30))
        code = await asyncio.wait_for(process.wait(), timeout=15)
        output = (await process.stdout.read()).decode() if process.stdout else ""
        assert code == 0, output
        assert "Traceback" not in output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_stops_accepting_new_connections(start_app: StartApp, tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    process, port, admin = await _gateway_in_front_of(slow, start_app, tmp_path, capture=False)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, admin, process=process)
            pending = asyncio.create_task(session.post(f"http://127.0.0.1:{port}/slow"))
            await _wait_in_flight(session, admin, 1)
            process.send_signal(signal.SIGTERM)

            # Once the listener is closed, new connections are refused.
            async def refused() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    return True
                writer.close()
                return False

            await wait_until(refused, "new connections to be refused", every=0.05)
            release.set()
            response = await asyncio.wait_for(pending, timeout=10)
            assert response.status == 200
            response.release()
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        release.set()
        if process.returncode is None:
            process.kill()
            await process.wait()
