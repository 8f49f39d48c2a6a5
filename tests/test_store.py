"""Both state stores against the same behaviour, on real SQLite files and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store import StateStore, StoreError, open_store, watch_revisions
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis import RedisStore
from tests.helpers.clock import FakeClock
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import (  # noqa: F401  (fixtures)
    SHARED_REDIS_URL,
    RedisServer,
    fast_client,
    private_redis,
    redis_prefix,
)


@pytest.fixture(params=["embedded", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "embedded":
        s = EmbeddedStore(tmp_path / "state.db")
    else:  # asked for here, so that only the Redis cases need one (tests/conftest.py)
        prefix = request.getfixturevalue("redis_prefix")
        s = RedisStore(fast_client(SHARED_REDIS_URL), key_prefix=prefix, owns_client=True)
    yield s
    await s.close()


async def test_get_put_delete(store: StateStore) -> None:
    assert await store.get("routes/a/weight") is None
    v1 = await store.put("routes/a/weight", {"challenger_weight": 0.2, "by": "admin"})
    assert await store.get("routes/a/weight") == {"challenger_weight": 0.2, "by": "admin"}
    entry = await store.get_entry("routes/a/weight")
    assert entry is not None and entry.version == v1
    v2 = await store.put("routes/a/weight", {"challenger_weight": 0.3})
    assert v2 > v1
    assert await store.delete("routes/a/weight") is True
    assert await store.delete("routes/a/weight") is False
    assert await store.get("routes/a/weight") is None


async def test_values_round_trip_json_types(store: StateStore) -> None:
    value = {"s": "é", "i": 2**40, "f": 0.1, "b": True, "n": None, "l": [1, {"x": []}]}
    await store.put("k", value)
    assert await store.get("k") == value


async def test_compare_and_set(store: StateStore) -> None:
    # None means "only if absent".
    v1 = await store.compare_and_set("lease", None, {"owner": "a"})
    assert v1 is not None
    assert await store.compare_and_set("lease", None, {"owner": "b"}) is None
    # Stale version loses, current version wins, and nothing is written on a loss.
    assert await store.compare_and_set("lease", v1 + 1000, {"owner": "b"}) is None
    assert await store.get("lease") == {"owner": "a"}
    v2 = await store.compare_and_set("lease", v1, {"owner": "b"})
    assert v2 is not None and v2 > v1
    assert await store.compare_and_set("lease", v1, {"owner": "c"}) is None
    assert await store.get("lease") == {"owner": "b"}
    # A deleted and re-created key never reuses an old version (no ABA).
    await store.delete("lease")
    v3 = await store.put("lease", {"owner": "d"})
    assert v3 not in (v1, v2)
    assert await store.compare_and_set("lease", v2, {"owner": "e"}) is None
    # Absent key with an expected version: conflict.
    assert await store.compare_and_set("nope", v3, {"x": 1}) is None


async def test_concurrent_cas_has_one_winner(store: StateStore) -> None:
    v = await store.put("counter", {"n": 0})
    results = await asyncio.gather(
        *(store.compare_and_set("counter", v, {"n": i}) for i in range(1, 9))
    )
    assert sum(r is not None for r in results) == 1


async def test_scan_prefix(store: StateStore) -> None:
    for key in ["routes/b", "routes/a", "routes/a/x", "models/m", "routes_other", "routes%"]:
        await store.put(key, {"k": key})
    got = await store.scan_prefix("routes/")
    assert [e.key for e in got] == ["routes/a", "routes/a/x", "routes/b"]
    assert [e.value for e in got] == [{"k": "routes/a"}, {"k": "routes/a/x"}, {"k": "routes/b"}]
    # LIKE wildcards and case must not leak into a prefix match.
    assert [e.key for e in await store.scan_prefix("routes%")] == ["routes%"]
    assert await store.scan_prefix("ROUTES/") == []
    assert await store.scan_prefix("zzz") == []
    await store.delete("routes/a")
    assert [e.key for e in await store.scan_prefix("routes/")] == ["routes/a/x", "routes/b"]


async def test_revision_grows_on_every_write(store: StateStore) -> None:
    r0 = await store.revision()
    await store.put("a", {})
    r1 = await store.revision()
    assert r1 > r0
    assert await store.compare_and_set("a", None, {}) is None  # failed CAS: no change
    assert await store.revision() == r1
    await store.delete("a")
    assert await store.revision() > r1


async def test_health_ok(store: StateStore) -> None:
    health = await store.health()
    assert health.ok and health.backend == store.backend
    assert health.as_dict()["status"] == "ok"


async def test_bad_arguments(store: StateStore) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        await store.put("", {})
    with pytest.raises(ValueError, match="ttl"):
        await store.put("k", {}, ttl=0)


# -- TTLs --------------------------------------------------------------------------------


async def test_embedded_ttl_follows_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    s = EmbeddedStore(tmp_path / "s.db", clock=clock)
    try:
        v = await s.put("lease", {"owner": "a"}, ttl=5)
        clock.now += 4.9
        assert await s.get("lease") == {"owner": "a"}
        clock.now += 0.2
        assert await s.get("lease") is None
        assert await s.scan_prefix("") == []
        # An expired lease is absent for CAS, so a new owner can take it.
        assert await s.compare_and_set("lease", v, {"owner": "b"}) is None
        assert await s.compare_and_set("lease", None, {"owner": "b"}, ttl=5) is not None
    finally:
        await s.close()


async def test_redis_ttl(redis_prefix: str) -> None:  # noqa: F811
    s = RedisStore(fast_client(SHARED_REDIS_URL), key_prefix=redis_prefix, owns_client=True)
    try:
        await s.put("lease", {"owner": "a"}, ttl=0.2)
        await s.put("keep", {"x": 1}, ttl=0.2)
        await s.put("keep", {"x": 2})  # a write without ttl makes it permanent again

        async def lease_gone() -> bool:
            return await s.get("lease") is None

        await wait_until(lease_gone, "the lease to expire", within=5, every=0.05)
        assert [e.key for e in await s.scan_prefix("")] == ["keep"]
        assert await s.compare_and_set("lease", None, {"owner": "b"}) is not None
    finally:
        await s.close()


# -- embedded specifics ------------------------------------------------------------------


async def test_embedded_persists_across_reopen_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.db"
    s = EmbeddedStore(path)
    v = await s.put("routes/a/weight", {"challenger_weight": 0.25})
    rev = await s.revision()
    await s.close()
    s2 = open_store("embedded", str(path), None, "ignored")
    try:
        entry = await s2.get_entry("routes/a/weight")
        assert entry is not None
        assert entry.value == {"challenger_weight": 0.25} and entry.version == v
        assert await s2.revision() == rev
        assert (path.parent / "state.db-wal").exists()  # WAL mode, not rollback journal
    finally:
        await s2.close()


async def test_embedded_two_handles_on_one_file_see_each_other(tmp_path: Path) -> None:
    a = EmbeddedStore(tmp_path / "s.db")
    b = EmbeddedStore(tmp_path / "s.db")
    try:
        va = await a.compare_and_set("k", None, {"by": "a"})
        assert va is not None
        assert await b.compare_and_set("k", None, {"by": "b"}) is None
        assert await b.get("k") == {"by": "a"}
        assert await b.revision() == await a.revision()
    finally:
        await a.close()
        await b.close()


async def test_embedded_closed_store_raises_store_error(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path / "s.db")
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreError):
        await s.get("k")


def test_embedded_bad_path_fails_at_open(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception):  # noqa: B017 - OSError or sqlite3 error, either is fine
        EmbeddedStore(blocker / "state.db")


# -- factory -----------------------------------------------------------------------------


async def test_open_store_factory(tmp_path: Path, redis_prefix: str) -> None:  # noqa: F811
    s = open_store("redis", str(tmp_path / "unused.db"), SHARED_REDIS_URL, redis_prefix)
    try:
        assert isinstance(s, RedisStore) and s.backend == "redis"
        await s.put("x", {"y": 1})
        assert await s.get("x") == {"y": 1}
    finally:
        await s.close()
    with pytest.raises(ValueError, match="redis_url"):
        open_store("redis", "x", None, "p")
    with pytest.raises(ValueError, match="unknown state backend"):
        open_store("etcd", "x", None, "p")


# -- Redis: change propagation and outages -----------------------------------------------


async def test_change_on_one_replica_reaches_the_other_within_a_second(
    redis_prefix: str,  # noqa: F811
) -> None:
    a = RedisStore(fast_client(SHARED_REDIS_URL), key_prefix=redis_prefix, owns_client=True)
    b = RedisStore(fast_client(SHARED_REDIS_URL), key_prefix=redis_prefix, owns_client=True)
    seen: dict[str, object] = {}

    async def follow() -> None:
        # What a replica does: reload its weights whenever the revision moves.
        async for _ in watch_revisions(b):
            seen["weight"] = await b.get("routes/r/weight")

    task = asyncio.create_task(follow())
    try:
        await wait_until(lambda: "weight" in seen, "first revision", within=2)
        started = time.monotonic()
        await a.put("routes/r/weight", {"challenger_weight": 0.4})
        await wait_until(
            lambda: seen.get("weight") == {"challenger_weight": 0.4}, "propagation", within=1.0
        )
        assert time.monotonic() - started < 1.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await a.close()
        await b.close()


async def test_redis_outage_raises_store_error_and_health_reports_it(
    private_redis: RedisServer,  # noqa: F811
) -> None:
    s = RedisStore(fast_client(private_redis.url), key_prefix="p", owns_client=True)
    try:
        await s.put("k", {"v": 1})
        private_redis.stop()
        with pytest.raises(StoreError):
            await s.get("k")
        with pytest.raises(StoreError):
            await s.put("k", {"v": 2})
        health = await s.health()
        assert not health.ok and health.as_dict()["status"] == "error"
        private_redis.start()
        assert (await s.health()).ok
        assert await s.get("k") is None  # --save '': the data went with the process
    finally:
        await s.close()


async def test_watch_survives_backend_errors(private_redis: RedisServer) -> None:  # noqa: F811
    s = RedisStore(fast_client(private_redis.url), key_prefix="p", owns_client=True)
    seen: list[int] = []
    polls = 0

    async def counted_sleep(seconds: float) -> None:
        nonlocal polls
        polls += 1  # the watcher sleeps once after each poll, failed or not
        await asyncio.sleep(seconds)

    async def follow() -> None:
        async for rev in watch_revisions(s, interval=0.02, sleep=counted_sleep):
            seen.append(rev)

    task = asyncio.create_task(follow())
    try:
        before = await s.put("k", {})
        await wait_until(lambda: seen[-1:] == [before], "first revision", within=2)
        private_redis.stop()
        # The poll under way when the server went may still have been answered; the
        # ones after it all met the outage.
        at_stop = polls
        await wait_until(lambda: polls >= at_stop + 4, "three polls during the outage")
        assert not task.done()
        private_redis.start()
        # The restarted server lost everything; its revisions must still move forward,
        # or a watcher could mistake new state for state it has already loaded.
        after = await s.put("k", {})
        assert after > before
        await wait_until(lambda: seen[-1:] == [after], "revision after restart", within=2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await s.close()
