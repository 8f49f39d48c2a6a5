"""Runtime state end to end: challenger weights set through the admin API, kept in the
embedded store across restarts and shared through Redis between replicas, with the
routing they produce checked through the real proxy. No mocks."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.app import Gateway
from gateway.steering import weight_key
from gateway.store.redis import RedisStore
from tests.conftest import StartApp, StartGateway
from tests.e2e_support import (
    CHAT_PATH,
    CLIENT_TIMEOUT,
    UsageServer,
    admin_json,
    running_gateway,
)
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import (  # noqa: F401  (fixtures)
    SHARED_REDIS_URL,
    RedisServer,
    fast_client,
    private_redis,
    redis_prefix,
)
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(30)

VARIANT_HEADER = "X-Gateway-Variant"


@pytest.fixture
async def upstream(start_app: StartApp) -> AsyncIterator[str]:
    server = UsageServer()
    yield await start_app(server.app())


def weights_document(upstream: str, weight: float, **sections: Any) -> dict[str, Any]:
    sections.setdefault("tracing", {"enabled": False})
    return gateway_document(
        {"a": {"url": upstream}, "b": {"url": upstream}},
        [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "champion": "a",
                "challenger": "b",
                "split": {"challenger_weight": weight},
            }
        ],
        **sections,
    )


async def put_weight(
    http: aiohttp.ClientSession, gateway: Gateway, weight: float
) -> tuple[int, dict[str, Any], float]:
    """PUT the route's weight: (status, body, seconds the call took)."""
    started = time.monotonic()
    async with http.put(
        admin_url(gateway, "/api/v1/routes/r/weight"),
        data=orjson.dumps({"challenger_weight": weight}),
        timeout=CLIENT_TIMEOUT,
    ) as response:
        return response.status, await response.json(), time.monotonic() - started


async def served_weight(http: aiohttp.ClientSession, gateway: Gateway, route: str = "r") -> float:
    status, view = await admin_json(http, gateway, f"/api/v1/routes/{route}")
    assert status == 200, view
    return float(view["challenger_weight"])


async def variants(http: aiohttp.ClientSession, gateway: Gateway, n: int = 20) -> Counter[str]:
    """Which variant served each of ``n`` proxied requests (distinct request IDs)."""
    seen: Counter[str] = Counter()
    for i in range(n):
        async with http.post(
            proxy_url(gateway, CHAT_PATH),
            data=orjson.dumps({"usage": [1, 1]}),
            headers={"X-Request-ID": f"req-{i}"},
            timeout=CLIENT_TIMEOUT,
        ) as response:
            assert response.status == 200
            await response.read()
            seen[response.headers[VARIANT_HEADER]] += 1
    return seen


async def state_view(http: aiohttp.ClientSession, gateway: Gateway) -> dict[str, Any]:
    status, body = await admin_json(http, gateway, "/api/v1/routes")
    assert status == 200, body
    return dict(body["state"])


# ---------------------------------------------------------------- embedded store


async def test_weight_survives_a_restart_with_the_embedded_store_and_the_file_wins_edits(
    upstream: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    state = {"path": str(tmp_path / "state.db")}
    async with running_gateway(weights_document(upstream, 0.0, state=state)) as gateway:
        assert await variants(http, gateway) == {"champion": 20}
        status, body, _ = await put_weight(http, gateway, 1.0)
        assert status == 200 and body["persisted"] is True and body["challenger_weight"] == 1.0
        assert await variants(http, gateway) == {"challenger": 20}
        view = await state_view(http, gateway)
        assert view["backend"] == "embedded" and view["status"] == "ok"
        await gateway.stop()

    # A new gateway on the same file serves the stored weight from its first request.
    async with running_gateway(weights_document(upstream, 0.0, state=state)) as gateway:
        assert await served_weight(http, gateway) == 1.0
        assert await variants(http, gateway) == {"challenger": 20}
        status, body, _ = await put_weight(http, gateway, 0.25)
        assert status == 200 and body["persisted"] is True

    async with running_gateway(weights_document(upstream, 0.0, state=state)) as gateway:
        assert await served_weight(http, gateway) == 0.25

    # The operator edits the route's weight in the file: the file wins over the store.
    async with running_gateway(weights_document(upstream, 0.5, state=state)) as gateway:
        assert await served_weight(http, gateway) == 0.5
    async with running_gateway(weights_document(upstream, 1.0, state=state)) as gateway:
        assert await variants(http, gateway) == {"challenger": 20}
    # Reverting the file to the weight the stored 0.25 once overrode does not bring the
    # stale 0.25 back: once the file won, the record is gone.
    async with running_gateway(weights_document(upstream, 0.0, state=state)) as gateway:
        assert await served_weight(http, gateway) == 0.0


# ---------------------------------------------------------------- Redis store, replicas


async def test_weight_set_on_one_redis_replica_is_served_by_the_other_within_1s(
    upstream: str,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    redis_prefix: str,  # noqa: F811
) -> None:
    state = {"backend": "redis", "redis_url": SHARED_REDIS_URL, "key_prefix": redis_prefix}
    a = await start_gateway(weights_document(upstream, 0.0, state=state))
    b = await start_gateway(weights_document(upstream, 0.0, state=state))
    assert (await state_view(http, a))["status"] == "ok"
    delays: list[float] = []
    for i, weight in enumerate([0.3, 0.65, 0.1, 0.8, 0.45, 0.0]):
        source, other = (a, b) if i % 2 == 0 else (b, a)
        started = time.monotonic()
        status, body, _ = await put_weight(http, source, weight)
        assert status == 200 and body["persisted"] is True

        async def applied(other: Gateway = other, weight: float = weight) -> bool:
            return await served_weight(http, other) == weight

        await wait_until(applied, f"weight {weight} on the other replica", within=3, every=0.005)
        delays.append(time.monotonic() - started)  # from the PUT being sent

    # And served, not only shown: all traffic through B moves to the challenger.
    started = time.monotonic()
    status, body, _ = await put_weight(http, a, 1.0)
    assert status == 200 and body["persisted"] is True

    async def routed() -> bool:
        return await variants(http, b, 1) == {"challenger": 1}

    await wait_until(routed, "B routing to the challenger", within=3, every=0.005)
    routed_delay = time.monotonic() - started
    assert await variants(http, b) == {"challenger": 20}
    assert max(delays) < 1.0 and routed_delay < 1.0, (delays, routed_delay)
    print(
        f"\n[replica weight propagation] admin view: median {statistics.median(delays):.3f}s,"
        f" max {max(delays):.3f}s over {len(delays)} PUTs; proxy routing {routed_delay:.3f}s"
    )


async def test_weight_put_while_the_redis_store_is_down_applies_locally(
    private_redis: RedisServer,  # noqa: F811
    upstream: str,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    state = {"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"}
    document = weights_document(upstream, 0.0, state=state)
    # A second route, whose weight another replica will store once Redis is back.
    probe = {**document["routes"][0], "name": "probe", "match": {"path_prefix": "/probe"}}
    document["routes"].append(probe)
    gateway = await start_gateway(document)
    view = await state_view(http, gateway)
    assert view["backend"] == "redis" and view["status"] == "ok"
    status, body, _ = await put_weight(http, gateway, 0.2)
    assert status == 200 and body["persisted"] is True

    await asyncio.to_thread(private_redis.stop)
    status, body, seconds = await put_weight(http, gateway, 1.0)  # bounded by CLIENT_TIMEOUT
    assert status == 200 and body["persisted"] is False and body["challenger_weight"] == 1.0
    assert seconds < 5, seconds
    assert await variants(http, gateway) == {"challenger": 20}  # applied anyway
    started = time.monotonic()
    view = await state_view(http, gateway)
    health_seconds = time.monotonic() - started
    assert view["backend"] == "redis" and view["status"] == "error", view
    assert view["detail"]
    _, route = await admin_json(http, gateway, "/api/v1/routes/r")
    assert route["state"]["status"] == "error" and route["challenger_weight"] == 1.0

    # Redis back (empty: it had no persistence): healthy again, the local weight stays.
    await asyncio.to_thread(private_redis.start)

    async def healthy() -> bool:
        return (await state_view(http, gateway))["status"] == "ok"

    await wait_until(healthy, "the state store healthy again", within=5)
    # The watcher must not undo the weight. That it has read the store since Redis came
    # back shows when it applies a weight stored meanwhile for the other route (as
    # another replica would store it): the same pass found no record for this route.
    # (A gateway keeps its state under "<state.key_prefix>:state:".)
    other_replica = RedisStore(
        fast_client(private_redis.url), key_prefix="gw:state:", owns_client=True
    )
    try:
        record = {"challenger_weight": 0.5, "config_weight": 0.0, "updated_at": time.time(),
                  "actor": "another replica"}  # fmt: skip
        await other_replica.put(weight_key("probe"), record)
    finally:
        await other_replica.close()

    async def probe_applied() -> bool:
        return await served_weight(http, gateway, "probe") == 0.5

    await wait_until(probe_applied, "the watcher to apply the probe route's stored weight")
    assert await served_weight(http, gateway) == 1.0
    status, body, _ = await put_weight(http, gateway, 0.0)
    assert status == 200 and body["persisted"] is True
    print(
        f"\n[store down] PUT answered in {seconds:.3f}s with persisted=false; "
        f"routes view (state error) in {health_seconds:.3f}s"
    )


async def test_gateway_starts_and_serves_with_the_redis_store_unreachable(
    upstream: str, http: aiohttp.ClientSession
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    document = weights_document(
        upstream, 0.3, state={"backend": "redis", "redis_url": url, "key_prefix": "gw"}
    )
    started = time.monotonic()
    async with running_gateway(document) as gateway:
        assert time.monotonic() - started < 10
        assert await served_weight(http, gateway) == 0.3  # the file's weight
        view = await state_view(http, gateway)
        assert view["backend"] == "redis" and view["status"] == "error"
        status, body, seconds = await put_weight(http, gateway, 1.0)
        assert status == 200 and body["persisted"] is False and seconds < 5
        assert await variants(http, gateway) == {"challenger": 20}
