"""Shared fixtures: real loopback HTTP servers and real gateways, never mocks of them."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway import config as config_module
from gateway.app import Gateway
from tests.helpers.ports import free_port
from tests.helpers.raw import RawConnections
from tests.redis_fixtures import require_redis

# Modules whose tests run on uvloop's event loop as well as asyncio's: the gateway runs
# on uvloop, and these test what depends on how a loop's transports behave.
_ON_BOTH_LOOPS = {"test_writes.py", "test_h1.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if Path(str(item.fspath)).name in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


_SUITE_REDIS: list[Any] = []  # the session's redis-server, once started


def pytest_configure(config: pytest.Config) -> None:
    """Start the suite's own Redis (see tests/redis_fixtures.py) before any test module
    is imported: they read its URL at import."""
    if os.environ.get("GATEWAY_TEST_REDIS_URL") or shutil.which("redis-server") is None:
        return
    port = free_port()
    os.environ["GATEWAY_TEST_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    from tests.redis_fixtures import RedisServer

    server = RedisServer(port)
    server.start()
    _SUITE_REDIS.append(server)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``redis`` (one that needs a Redis without asking for one through a
    fixture of tests/redis_fixtures.py) is skipped where there is none."""
    if item.get_closest_marker("redis") is not None:
        require_redis()


def pytest_unconfigure(config: pytest.Config) -> None:
    while _SUITE_REDIS:
        _SUITE_REDIS.pop().stop()
    os.environ.pop("GATEWAY_TEST_REDIS_URL", None)


StartApp = Callable[[web.Application], Awaitable[str]]
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_app() -> AsyncIterator[StartApp]:
    """Start an aiohttp app on a free loopback port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StartGateway]:
    """Start a gateway from a config document (see ``gateway_document``).

    Unless the document says otherwise, each gateway gets its own embedded state file, so
    weights one test sets never leak into another."""
    gateways: list[Gateway] = []

    async def start(document: dict[str, Any], **kwargs: Any) -> Gateway:
        state = document.setdefault("state", {})
        if state.get("backend", "embedded") == "embedded" and "path" not in state:
            state["path"] = str(tmp_path_factory.mktemp("state") / "gateway-state.db")
        gateway = Gateway(config_module.parse(document, environ={}), **kwargs)
        await gateway.start()
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in reversed(gateways):
        await gateway.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no automatic decompression or cookie handling, like curl."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


@pytest.fixture
async def raw() -> AsyncIterator[RawConnections]:
    """Raw client connections (``tests.helpers.raw``), all closed after the test."""
    connections = RawConnections()
    yield connections
    await connections.close_all()
