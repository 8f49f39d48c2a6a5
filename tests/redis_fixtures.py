"""Real Redis for tests: the suite's shared server under a unique key prefix per test, or
a private ``redis-server`` on a free port for tests that stop it or count its commands.

The shared server is the suite's own: ``tests/conftest.py`` starts a ``redis-server`` on a
free port when the session starts and names it in ``GATEWAY_TEST_REDIS_URL``, so the
tests need nothing running beforehand and never touch a Redis the machine may have on
6379. Where redis-server is missing, the tests that need a Redis (those using a fixture
here, or marked ``redis``) are skipped with one line saying so, and fail under CI=true;
``GATEWAY_TEST_REDIS_URL`` names a server to use instead.

Test modules import the fixtures they use from here (``from tests.redis_fixtures import
...``), so they work whatever the shared conftest holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.helpers.ports import free_port
from tests.helpers.tools import missing
from tests.helpers.waiting import wait_until_sync

SUITE_REDIS_ENV = "GATEWAY_TEST_REDIS_URL"
SHARED_REDIS_URL = os.environ.get(SUITE_REDIS_ENV, "redis://127.0.0.1:6379/0")
SHARED_REDIS_PORT = urlsplit(SHARED_REDIS_URL).port or 6379


def require_redis() -> None:
    """Skip the test (fail it under CI=true) when there is no Redis to give it: no
    redis-server to start, and no GATEWAY_TEST_REDIS_URL naming one."""
    if os.environ.get(SUITE_REDIS_ENV) is None:
        missing("redis-server", "apt-get install redis-server")


def fast_client(url: str) -> aioredis.Redis:
    """An async client that gives up quickly, as the gateway's should."""
    return aioredis.Redis.from_url(
        url, socket_timeout=1.0, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def delete_prefix(url: str, pattern: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


class RedisServer:
    """A private redis-server that a test may stop and start again on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def _ping(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=0.2) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def persistence(self) -> list[str]:
        """redis-server's options for keeping data: none, so a restart starts empty."""
        return ["--save", "", "--appendonly", "no"]

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("redis-server", "apt-get install redis-server")
        self._proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", *self.persistence(),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_sync(self._ping, f"redis-server on port {self.port}", within=10)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc = None

    def commands_processed(self) -> int:
        with redis.Redis(port=self.port) as c:
            return int(c.info("stats")["total_commands_processed"])

    def command_stats(self) -> dict[str, int]:
        with redis.Redis(port=self.port) as c:
            stats = c.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def reset_stats(self) -> None:
        with redis.Redis(port=self.port) as c:
            c.config_resetstat()

    def cleanup(self) -> None:
        """Stop the server and remove whatever it left behind."""
        self.stop()


S = TypeVar("S", bound=RedisServer)


@contextlib.contextmanager
def running(server: S) -> Iterator[S]:
    """``server`` started, and cleaned up on the way out."""
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with running(RedisServer()) as server:
        yield server


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix nobody else uses on the shared server; its keys are deleted after."""
    require_redis()
    prefix = f"gwtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_prefix(SHARED_REDIS_URL, f"{prefix}*")


@pytest.fixture
async def shared_redis() -> AsyncIterator[aioredis.Redis]:
    require_redis()
    client = fast_client(SHARED_REDIS_URL)
    try:
        await asyncio.wait_for(client.ping(), 5)
        yield client
    finally:
        await client.aclose()
