"""Two gateway replicas sharing a private redis-server follow the model registry: an
alias moved through one is served by both within a second, with no request failing
while it moves; a promotion and its rollback made through one move both."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import named_app
from tests.helpers.waiting import wait_until
from tests.models_support import admin, call, models_document, proxy, served_by
from tests.redis_fixtures import RedisServer, private_redis  # noqa: F401

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def replicas(
    start_app: StartApp,
    start_gateway: StartGateway,
    private_redis: RedisServer,  # noqa: F811
) -> list[Gateway]:
    upstreams = {name: await start_app(named_app(name)) for name in ("v1", "v2")}
    state = {"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"}
    return [
        await start_gateway(
            models_document(
                upstreams,
                state=state,
                split={"challenger_weight": 0.0},
                canary={"steps": [0.3], "step_interval_seconds": 60},
            )
        )
        for _ in range(2)
    ]


@dataclass
class Load:
    """Steady load on every replica: each client sends its next request as soon as the
    last is answered. Every answer is kept: (replica, sent at, backend or error)."""

    answers: list[tuple[int, float, str]] = field(default_factory=list)
    failed: list[tuple[int, float, int, str]] = field(default_factory=list)

    def after(self, replica: int, since: float) -> list[str]:
        return [b for r, at, b in self.answers if r == replica and at >= since]


@contextlib.asynccontextmanager
async def steady_load(
    http: aiohttp.ClientSession, gateways: list[Gateway], clients: int = 4
) -> AsyncIterator[Load]:
    load = Load()
    stop = asyncio.Event()

    async def client(replica: int, n: int) -> None:
        url = proxy(gateways[replica])
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.monotonic()
            headers = {"X-Request-ID": f"c{replica}-{n}-{i}"}
            async with http.get(url, headers=headers) as response:
                body = await response.json()
            if response.status != 200:
                load.failed.append((replica, sent, response.status, str(body)))
            else:
                load.answers.append((replica, sent, body["backend"]))

    tasks = [
        asyncio.create_task(client(r, n)) for r in range(len(gateways)) for n in range(clients)
    ]
    try:
        yield load
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_replicas_follow_an_alias_move_within_a_second_without_failures(
    replicas: list[Gateway], http: aiohttp.ClientSession
) -> None:
    first = replicas[0]
    url = admin(first, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    for gateway in replicas:

        async def serves_v1(g: Gateway = gateway) -> bool:
            return await served_by(http, g) == "v1"

        await wait_until(serves_v1, "both replicas serve v1", within=2.0)

    async with steady_load(http, replicas) as load:
        await wait_until(lambda: len(load.answers) >= 100, "load under way")
        moved_at = time.monotonic()
        status, _ = await call(
            http, "PUT", url + "/aliases/champion", {"version": 2, "expected_version": 1}
        )
        assert status == 200

        def followed(replica: int) -> float | None:
            """How long after the move the replica's last v1 answer was sent, once it
            has answered v2 for 20 requests sent after that."""
            answers = [(at, b) for r, at, b in load.answers if r == replica and at >= moved_at]
            last_v1 = max((at for at, b in answers if b == "v1"), default=moved_at)
            if sum(1 for at, b in answers if b == "v2" and at > last_v1) < 20:
                return None
            return last_v1 - moved_at

        def follow_time(replica: int) -> tuple[float] | None:
            took = followed(replica)
            return None if took is None else (took,)  # truthy even when it took 0 s

        times = [
            await wait_until(lambda r=r: follow_time(r), f"replica {r} serving v2", within=5.0)
            for r in range(2)
        ]
        # A last look: nothing sent a second after the move went to v1 anywhere.
        settled = moved_at + 1.0
        await wait_until(
            lambda: all(len(load.after(r, settled)) >= 20 for r in range(2)),
            "requests sent a second after the move",
        )
    follow = [t[0] for t in times]
    after = [a for a in load.answers if a[1] >= moved_at]
    print(
        f"\nalias move followed after {follow[0] * 1000:.0f} ms (replica that moved it) and "
        f"{follow[1] * 1000:.0f} ms (the other); {len(load.answers)} requests under load, "
        f"{len(after)} of them sent after the move, {len(load.failed)} failed"
    )
    assert load.failed == []
    assert max(follow) < 1.0, follow
    for replica in range(2):
        assert set(load.after(replica, settled)) == {"v2"}


async def test_a_promotion_through_one_replica_moves_both(
    replicas: list[Gateway], http: aiohttp.ClientSession
) -> None:
    first, second = replicas
    url = admin(first, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await call(http, "PUT", url + "/aliases/challenger", {"version": 2})

    for gateway in replicas:
        await wait_until(
            lambda g=gateway: g.routes["r"].challenger is not None, "the challenger resolved"
        )
    status, view = await call(http, "POST", admin(second, "/routes/r/canary/start"))
    assert status == 200 and view["weight"] == 0.3
    for gateway in replicas:
        await wait_until(lambda g=gateway: g.routes["r"].weight == 0.3, "weight 0.3", within=1.5)

    started = time.monotonic()
    status, view = await call(http, "POST", admin(second, "/routes/r/canary/promote"))
    assert status == 200 and view["state"] == "promoted"
    for gateway in replicas:
        await wait_until(
            lambda g=gateway: (
                g.routes["r"].champion.name == "v2"
                and g.routes["r"].challenger is None
                and g.routes["r"].weight == 0.0
            ),
            "v2 champion everywhere",
            within=1.5,
        )
    promoted_in = time.monotonic() - started
    assert (await call(http, "GET", url))[1]["aliases"] == {"champion": 2, "previous": 1}
    assert {await served_by(http, g, f"k{i}") for g in replicas for i in range(10)} == {"v2"}

    status, view = await call(http, "POST", admin(first, "/routes/r/canary/rollback"))
    assert status == 200 and view["state"] == "rolled_back"
    for gateway in replicas:
        await wait_until(
            lambda g=gateway: (
                g.routes["r"].champion.name == "v1"
                and g.routes["r"].challenger is not None
                and g.routes["r"].challenger.name == "v2"
            ),
            "v1 champion again everywhere",
            within=1.5,
        )
    assert (await call(http, "GET", url))[1]["aliases"] == {"champion": 1, "challenger": 2}
    assert {await served_by(http, g, f"k{i}") for g in replicas for i in range(10)} == {"v1"}
    print(f"\npromotion followed by both replicas within {promoted_in * 1000:.0f} ms")


async def test_the_registry_outlives_the_replicas(
    replicas: list[Gateway],
    http: aiohttp.ClientSession,
    start_gateway: StartGateway,
    private_redis: RedisServer,  # noqa: F811
) -> None:
    first, second = replicas
    url = admin(first, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await wait_until(lambda: second.routes["r"].champion.name == "v2", "followed", within=1.5)
    document = models_document(
        {"v2": second.config.backends["v2"].url or ""},
        state={"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"},
    )
    for gateway in replicas:
        await gateway.stop()
    again = await start_gateway(document)
    # Resolved before the first request is taken.
    assert await served_by(http, again) == "v2"
    status, model = await call(http, "GET", admin(again, "/models/iris"))
    assert status == 200 and model["aliases"] == {"champion": 1}
    assert [h["action"] for h in model["history"]] == ["register", "alias"]
