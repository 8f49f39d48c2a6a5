"""gateway.steering: the one writer of a route's live weight, and its "file wins" rule.

No sockets: routes are built from config documents, the store is the embedded SQLite one
on a temporary file (the same code path as in production)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_module
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from gateway.steering import Override, Steering, SteeringError, weight_key
from gateway.store.base import Entry, StoreError
from gateway.store.embedded import EmbeddedStore
from tests.helpers.waiting import wait_until


def routes_document(weight: float = 0.1) -> dict[str, Any]:
    return {
        "backends": {"v1": {"url": "http://127.0.0.1:1"}, "v2": {"url": "http://127.0.0.1:2"}},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/r"},
                "champion": "v1",
                "challenger": "v2",
                "split": {"challenger_weight": weight},
            },
            {"name": "solo", "match": {"path_prefix": "/solo"}, "champion": "v1"},
        ],
    }


class Deployment:
    """A config's runtime and a Steering over it, reloadable like the gateway's."""

    def __init__(self, weight: float = 0.1) -> None:
        self.metrics = Metrics()
        self.steering = Steering(self.metrics)
        self.runtime = Runtime.build(self.config(weight), self.metrics)
        self.steering.adopt(self.runtime)

    @staticmethod
    def config(weight: float) -> config_module.GatewayConfig:
        return config_module.parse(routes_document(weight), environ={})

    def reload(self, weight: float) -> None:
        self.runtime = Runtime.build(self.config(weight), self.metrics, self.runtime)
        self.steering.adopt(self.runtime)

    def weight(self, route: str = "r") -> float:
        live = self.runtime.routes[route]
        gauge = self.metrics.challenger_weight.labels(route)._value.get()
        assert gauge == live.weight, "the gauge must follow every change"
        return live.weight


async def test_the_file_weight_applies_until_set_at_runtime() -> None:
    d = Deployment(0.1)
    assert d.weight() == 0.1 and d.runtime.routes["r"].threshold == 1000
    route, persisted = await d.steering.set_weight("r", 0.3)
    assert route is d.runtime.routes["r"] and not persisted  # no store attached
    assert d.weight() == 0.3 and route.threshold == 3000


async def test_the_file_wins_when_its_weight_changes_and_for_good() -> None:
    d = Deployment(0.1)
    await d.steering.set_weight("r", 0.3)
    d.reload(0.1)  # the file's weight as it was: the runtime weight stays
    assert d.weight() == 0.3
    d.reload(0.2)  # the file changed that weight: the file wins
    assert d.weight() == 0.2
    d.reload(0.1)  # and reverting the file does not bring the runtime weight back
    assert d.weight() == 0.1


@pytest.mark.parametrize(
    ("route", "weight", "status", "code"),
    [
        ("nope", 0.5, 404, "unknown_route"),
        ("r", 1.5, 400, "bad_weight"),
        ("r", -0.1, 400, "bad_weight"),
        ("r", math.nan, 400, "bad_weight"),
        ("r", True, 400, "bad_weight"),
        ("r", "0.5", 400, "bad_weight"),
        ("r", None, 400, "bad_weight"),
        ("solo", 0.0001, 409, "no_challenger"),
    ],
)
async def test_refused_weights_change_nothing(
    route: str, weight: object, status: int, code: str
) -> None:
    d = Deployment(0.1)
    with pytest.raises(SteeringError) as refused:
        await d.steering.set_weight(route, weight)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert d.weight("r") == 0.1 and d.weight("solo") == 0.0


async def test_a_route_without_challenger_takes_weight_zero() -> None:
    d = Deployment()
    route, _ = await d.steering.set_weight("solo", 0)
    assert route.weight == 0.0 and route.threshold == 0


async def test_runtime_weights_are_stored_and_followed(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "state.db")
    first, second = Deployment(0.1), Deployment(0.1)  # two replicas on one store
    try:
        async with first.steering.synced(store), second.steering.synced(store):
            _, persisted = await first.steering.set_weight("r", 0.4, actor="tester")
            assert persisted
            record = await store.get(weight_key("r"))
            assert record is not None and record["actor"] == "tester"
            await second.steering.restore()  # its watcher may have been first: either way
            assert second.weight() == 0.4
        # A restart with the same file comes back with the stored weight.
        restarted = Deployment(0.1)
        async with restarted.steering.synced(store):
            assert restarted.weight() == 0.4
        # One with another weight in the file: the file wins, and the record is gone.
        edited = Deployment(0.2)
        async with edited.steering.synced(store):
            assert edited.weight() == 0.2
            assert await store.get(weight_key("r")) is None
    finally:
        await store.close()


@pytest.mark.parametrize(
    "record",
    [
        {"challenger_weight": 2.0, "config_weight": 0.1},
        {"challenger_weight": "0.4", "config_weight": 0.1},
        {"config_weight": 0.1},
    ],
)
async def test_stored_records_that_hold_no_weight_are_ignored(
    tmp_path: Path, record: dict[str, Any]
) -> None:
    store = EmbeddedStore(tmp_path / "state.db")
    try:
        await store.put(weight_key("r"), record)
        await store.put(weight_key("solo"), {"challenger_weight": 0.5, "config_weight": 0.0})
        d = Deployment(0.1)
        async with d.steering.synced(store):
            assert d.weight("r") == 0.1 and d.weight("solo") == 0.0
    finally:
        await store.close()


def test_an_override_without_its_file_value_is_superseded_by_any_file() -> None:
    legacy = Override.from_record({"challenger_weight": 0.3})
    assert legacy is not None and legacy.superseded_by(0.0) and legacy.superseded_by(0.3)
    current = Override.from_record({"challenger_weight": 0.3, "config_weight": 0.1})
    assert current == Override(0.3, 0.1)
    assert not current.superseded_by(0.1) and current.superseded_by(0.2)


class PausedStore(EmbeddedStore):
    """An embedded store whose next scan reads, then waits for ``resume`` before it
    answers (a read overtaken by a change, as on a slow link); whose next put waits for
    ``release_put`` before it writes (``hold_next_put``: a write not landed yet) or after
    (``hold_next_ack``: landed, its answer slow to come back); and that can be down."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.pause_next_scan = False
        self.scanned, self.resume = asyncio.Event(), asyncio.Event()
        self.hold_next_put = self.hold_next_ack = False
        self.put_held, self.release_put = asyncio.Event(), asyncio.Event()
        self.down = False

    async def scan_prefix(self, prefix: str) -> list[Entry]:
        self._fail_if_down()
        entries = await super().scan_prefix(prefix)
        if self.pause_next_scan:
            self.pause_next_scan = False
            self.scanned.set()
            await self.resume.wait()
        return entries

    async def put(self, key: str, value: dict[str, Any], *, ttl: float | None = None) -> int:
        self._fail_if_down()
        before, self.hold_next_put = self.hold_next_put, False
        after, self.hold_next_ack = self.hold_next_ack, False
        if before:
            self.put_held.set()
            await self.release_put.wait()
        revision = await super().put(key, value, ttl=ttl)
        if after:
            self.put_held.set()
            await self.release_put.wait()
        return revision

    def _fail_if_down(self) -> None:
        if self.down:
            raise StoreError("down (a test's outage)")


async def test_a_change_made_while_the_store_is_read_is_not_undone_by_that_read(
    tmp_path: Path,
) -> None:
    store = PausedStore(tmp_path / "state.db")
    replica = Deployment(0.1)
    try:
        async with replica.steering.synced(store):
            await replica.steering.set_weight("r", 0.5, actor="canary")
            store.pause_next_scan = True
            restoring = asyncio.create_task(replica.steering.restore())
            await asyncio.wait_for(store.scanned.wait(), 5)  # it has read 0.5...
            await replica.steering.set_weight("r", 0, actor="operator")  # ...the brake
            store.resume.set()
            await asyncio.wait_for(restoring, 5)
            assert replica.weight() == 0.0
            await replica.steering.restore()  # the next pass reads the brake back
            assert replica.weight() == 0.0
    finally:
        await store.close()


async def test_a_read_answered_before_a_change_here_is_stored_does_not_undo_it(
    tmp_path: Path,
) -> None:
    """The brake is applied here at once, then written; a restore's read of the store
    (on another of its connections, in Redis) may be answered before that write lands.
    What it read of that route predates the brake, and is not applied: it did, once, in
    test_canary_e2e, where the canary's weight came back for a poll."""
    store = PausedStore(tmp_path / "state.db")
    replica = Deployment(0.1)
    try:
        async with replica.steering.synced(store):
            await replica.steering.set_weight("r", 0.5, actor="canary")
            store.hold_next_put = True
            braking = asyncio.create_task(replica.steering.set_weight("r", 0, actor="operator"))
            await asyncio.wait_for(store.put_held.wait(), 5)  # applied here, not stored yet
            assert replica.weight() == 0.0
            await replica.steering.restore()  # reads the canary's 0.5
            assert replica.weight() == 0.0
            store.release_put.set()
            _, stored = await asyncio.wait_for(braking, 5)
            assert stored
            await replica.steering.restore()  # the brake, read back
            assert replica.weight() == 0.0
    finally:
        await store.close()


async def test_a_route_left_alone_while_its_write_was_in_flight_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that leaves a route alone (its write in flight) may follow a revision that
    already holds that write and a newer one from another replica: nothing moves the
    revision again, so the next poll reads the store anyway (found by review)."""
    monkeypatch.setattr(Steering._follow, "__defaults__", (0.01,))  # poll every 10 ms
    store = PausedStore(tmp_path / "state.db")
    a, b = Deployment(0.1), Deployment(0.1)
    passes = 0
    restore = a.steering.restore

    async def counted() -> int:
        nonlocal passes
        passes += 1
        return await restore()

    a.steering.restore = counted  # type: ignore[method-assign]
    try:
        async with a.steering.synced(store), b.steering.synced(store):
            store.hold_next_ack = True
            braking = asyncio.create_task(a.steering.set_weight("r", 0, actor="operator"))
            await asyncio.wait_for(store.put_held.wait(), 5)  # A's brake is in the store...
            await b.steering.set_weight("r", 0.3, actor="operator")  # ...then B's weight
            seen = passes
            await wait_until(lambda: passes >= seen + 2, "A's follower to pass twice")
            assert a.weight() == 0.0  # left alone while its own write is in flight
            store.release_put.set()
            await asyncio.wait_for(braking, 5)
            await wait_until(lambda: a.weight() == 0.3, "A to read B's newer weight")
    finally:
        await store.close()


async def test_a_change_made_while_the_store_is_down_is_stored_when_it_is_back(
    tmp_path: Path,
) -> None:
    store = PausedStore(tmp_path / "state.db")
    replica, other = Deployment(0.1), Deployment(0.1)
    try:
        async with replica.steering.synced(store), other.steering.synced(store):
            await replica.steering.set_weight("r", 0.5, actor="canary")
            store.down = True
            _, stored = await replica.steering.set_weight("r", 0, actor="operator")
            assert not stored and replica.weight() == 0.0  # applied all the same
            with pytest.raises(StoreError):
                await replica.steering.restore()
            assert replica.weight() == 0.0
            store.down = False
            await replica.steering.restore()  # stores the brake before it reads anything
            assert replica.weight() == 0.0
            record = await store.get(weight_key("r"))
            assert record is not None and record["challenger_weight"] == 0.0
            await other.steering.restore()
            assert other.weight() == 0.0
            # Once stored, it is a record like any other: a later change replaces it.
            await other.steering.set_weight("r", 0.3, actor="operator")
            await replica.steering.restore()
            assert replica.weight() == 0.3
    finally:
        await store.close()
