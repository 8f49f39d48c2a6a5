"""Backend pools: load balancing, outlier ejection, health checks' verdicts, connection caps
and their queue, and what a reload carries over, with an injected clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from gateway.config import BackendConfig
from gateway.upstream.pool import (
    BackendPool,
    NoHealthyEndpoint,
    UpstreamOverloaded,
    build_pools,
)
from tests.helpers.clock import FakeClock
from tests.helpers.waiting import wait_until

EJECT_AFTER_FAILURES = 5  # the defaults: outlier_detection's consecutive_failures
EJECTION_SECONDS = 30.0  # and base_ejection_seconds


def pool(strategy: str, endpoints: int, clock: FakeClock, **options: Any) -> BackendPool:
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(endpoints)]
    config = BackendConfig(endpoints=urls, load_balancing=strategy, **options)  # type: ignore[arg-type]
    return BackendPool.from_config("b", config, clock)


@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_request"])
def test_every_endpoint_gets_traffic(strategy: str) -> None:
    p = pool(strategy, 4, FakeClock())
    seen = Counter()
    for _ in range(400):
        endpoint = p.pick()
        assert endpoint is not None
        seen[endpoint.base] += 1
    assert len(seen) == 4
    if strategy == "round_robin":
        assert set(seen.values()) == {100}


def test_least_request_prefers_the_idlest() -> None:
    p = pool("least_request", 3, FakeClock())
    p.endpoints[0].active, p.endpoints[1].active, p.endpoints[2].active = 5, 1, 3
    picks = Counter(id(p.pick()) for _ in range(900))
    busiest, idlest, middle = (picks[id(e)] for e in p.endpoints)
    # Two random choices, the less busy wins: the busiest never, the idlest whenever drawn.
    assert busiest == 0
    assert idlest > middle > 0


@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_request"])
def test_failing_endpoint_is_ejected_then_returns(strategy: str) -> None:
    clock = FakeClock()
    p = pool(strategy, 3, clock)
    bad = p.endpoints[1]
    for _ in range(EJECT_AFTER_FAILURES - 1):
        p.failed(bad)
    assert bad.ejected_until == 0.0  # not yet
    p.failed(bad)
    assert bad.ejected_until == clock.now + EJECTION_SECONDS
    assert all(p.pick() is not bad for _ in range(60))
    clock.now += EJECTION_SECONDS
    assert any(p.pick() is bad for _ in range(60))
    assert bad.ejected_until == 0.0  # back in service: cleared, no clock read to pick it


def test_success_resets_the_failure_count() -> None:
    p = pool("round_robin", 2, FakeClock())
    bad = p.endpoints[0]
    for _ in range(EJECT_AFTER_FAILURES - 1):
        p.failed(bad)
    p.succeeded(bad)
    p.failed(bad)
    assert bad.ejected_until == 0.0


def test_all_ejected_means_no_endpoint_and_a_lone_endpoint_is_never_ejected() -> None:
    clock = FakeClock()
    p = pool("round_robin", 2, clock, outlier_detection={"max_ejection_percent": 100})
    for endpoint in p.endpoints:
        for _ in range(EJECT_AFTER_FAILURES):
            p.failed(endpoint)
    assert p.pick() is None
    lone = pool("round_robin", 1, clock)
    for _ in range(EJECT_AFTER_FAILURES * 3):
        lone.failed(lone.endpoints[0])
    assert lone.pick() is lone.endpoints[0]


def test_endpoint_keeps_its_base_path_and_the_raw_target() -> None:
    config = BackendConfig(url="http://model:8000/serving/")
    endpoint = BackendPool.from_config("b", config).endpoints[0]
    assert endpoint.origin.host_header == "model:8000"
    assert endpoint.target("/v1/x%2Fy?q=a%20b") == "/serving/v1/x%2Fy?q=a%20b"
    tls = BackendPool.from_config("t", BackendConfig(url="https://model")).endpoints[0]
    assert (tls.origin.port, tls.origin.tls, tls.origin.host_header) == (443, True, "model")


@pytest.mark.parametrize("strategy", ["random", "least_request"])
def test_random_draws_are_uniform_and_distinct_pairs_cover_every_endpoint(strategy: str) -> None:
    """With equal load every endpoint is picked about equally often: least_request's
    second draw must not favour the neighbour of the first."""
    p = pool(strategy, 5, FakeClock())
    picks = Counter(p.pick().base for _ in range(20_000))  # type: ignore[union-attr]
    assert len(picks) == 5
    assert max(picks.values()) / min(picks.values()) < 1.15, picks


def test_least_request_never_compares_an_endpoint_with_itself() -> None:
    p = pool("least_request", 2, FakeClock())
    busy, idle = p.endpoints
    busy.active = 9
    # Two endpoints: the pair is always both, so the idle one always wins.
    assert all(p.pick() is idle for _ in range(200))


class CompareSpy:
    """An endpoint that notes each time least_request reads its load."""

    ejected_until = 0.0
    limit = 1024

    def __init__(self, name: int, log: list[int]) -> None:
        self.name, self._log = name, log

    @property
    def active(self) -> int:
        self._log.append(self.name)
        return 0


def test_least_request_draws_every_pair_equally_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawing every (first, second) cell of the random grid once compares every ordered
    pair of distinct endpoints exactly once."""
    n = 5
    draws = iter(
        value
        for a in range(n)
        for b in range(n - 1)
        for value in ((a + 0.5) / n, (b + 0.5) / (n - 1))
    )
    monkeypatch.setattr("gateway.upstream.pool._random", lambda: next(draws))
    p = pool("least_request", n, FakeClock())
    log: list[int] = []
    p.endpoints = [CompareSpy(m, log) for m in range(n)]  # type: ignore[misc]
    for _ in range(n * (n - 1)):
        p.pick()
    pairs = Counter(zip(log[::2], log[1::2], strict=True))
    assert pairs == Counter((a, b) for a in range(n) for b in range(n) if a != b)


# --- outlier ejection: the share limit, doubling, probation --------------------------------


def eject(p: BackendPool, index: int) -> None:
    for _ in range(EJECT_AFTER_FAILURES):
        p.failed(p.endpoints[index])


def test_never_more_than_the_share_is_ejected() -> None:
    clock = FakeClock()
    seen: list[tuple[str, str, str]] = []
    p = pool("round_robin", 3, clock)  # 50 % of 3: one at a time
    p.on_ejection = lambda *event: seen.append(event)
    eject(p, 0)
    eject(p, 1)
    assert p.endpoints[0].ejected_until == clock.now + EJECTION_SECONDS
    assert p.endpoints[1].ejected_until == 0.0  # no room: still in, still counting
    assert p.endpoints[1].consecutive_failures == EJECT_AFTER_FAILURES
    assert seen == [("b", p.endpoints[0].base, "consecutive_failures")]
    clock.advance(EJECTION_SECONDS)
    p.failed(p.endpoints[1])  # the first is back (its time is over): room for this one
    assert p.endpoints[1].ejected_until == clock.now + EJECTION_SECONDS
    assert [e.healthy(clock.now) for e in p.endpoints] == [True, False, True]


def test_an_ejection_in_a_row_doubles_and_probation_ejects_at_once() -> None:
    clock = FakeClock()
    p = pool("round_robin", 3, clock)
    bad = p.endpoints[1]
    eject(p, 1)
    assert bad.ejected_until == clock.now + 30
    clock.advance(30)
    assert any(p.pick() is bad for _ in range(3))  # back in rotation...
    p.failed(bad)  # ...on probation: one failure and it is out again, for twice as long
    assert bad.ejected_until == clock.now + 60
    clock.advance(60)
    assert any(p.pick() is bad for _ in range(3))
    p.succeeded(bad)  # a success ends the probation
    for _ in range(EJECT_AFTER_FAILURES - 1):
        p.failed(bad)
    assert bad.healthy(clock.now)
    # Served 10 s after a 60 s ejection: the doubling goes on (120 s)...
    clock.advance(10)
    p.failed(bad)
    assert bad.ejected_until == clock.now + 120
    # ...but after serving as long as it was last out, it starts over at 30 s.
    clock.advance(120)
    p.pick(), p.pick(), p.pick()
    clock.advance(120)
    p.failed(bad)
    assert bad.ejected_until == clock.now + 30


def test_a_late_failure_of_an_ejected_endpoint_changes_nothing() -> None:
    clock = FakeClock()
    p = pool("random", 3, clock)
    eject(p, 0)
    until = p.endpoints[0].ejected_until
    for _ in range(10):
        p.failed(p.endpoints[0])  # requests sent before the ejection, failing now
    assert p.endpoints[0].ejected_until == until
    assert p.endpoints[0].ejections_in_a_row == 1


@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_request"])
def test_after_a_timeout_an_endpoint_takes_one_request_at_a_time(strategy: str) -> None:
    p = pool(strategy, 3, FakeClock())
    hung = p.endpoints[0]
    hung.active = 3  # requests sent before anything was known
    p.failed(hung, timed_out=True)
    assert hung.limit == 1
    assert all(p.pick() is not hung for _ in range(60))  # busy: it has one (and more)
    hung.active = 0
    assert any(p.pick() is hung for _ in range(60))  # one probe at a time
    p.failed(p.endpoints[1])  # a failure that is no timeout does not throttle
    assert p.endpoints[1].limit == 1024
    p.succeeded(hung)
    assert hung.limit == 1024
    lone = pool(strategy, 1, FakeClock())
    lone.endpoints[0].active = 5
    lone.failed(lone.endpoints[0], timed_out=True)
    assert lone.pick() is lone.endpoints[0]  # nowhere else to go: never throttled


# --- active health checks ------------------------------------------------------------------

CHECKED = {"health_check": {"path": "/h", "healthy_threshold": 2, "unhealthy_threshold": 3}}


def test_failing_checks_take_an_endpoint_out_and_passing_ones_put_it_back() -> None:
    clock = FakeClock()
    seen: list[str] = []
    p = pool("round_robin", 3, clock, **CHECKED)
    p.on_ejection = lambda backend, endpoint, reason: seen.append(reason)
    bad = p.endpoints[2]
    p.checked(bad, False)
    p.checked(bad, False)
    assert bad.healthy(clock.now)
    p.checked(bad, False)
    assert not bad.healthy(clock.now + 10_000)  # out until its checks pass, however long
    assert all(p.pick() is not bad for _ in range(30))
    assert seen == ["health_check"]
    p.checked(bad, True)
    assert not bad.healthy(clock.now)
    p.checked(bad, True)
    assert bad.healthy(clock.now)
    assert any(p.pick() is bad for _ in range(3))


def test_checks_are_not_bound_by_the_share_and_can_empty_a_backend() -> None:
    clock = FakeClock()
    p = pool("least_request", 2, clock, **CHECKED)
    for endpoint in p.endpoints:
        for _ in range(3):
            p.checked(endpoint, False)
    assert p.pick() is None
    lone = pool("round_robin", 1, clock, **CHECKED)
    for _ in range(3):
        lone.checked(lone.endpoints[0], False)
    assert lone.pick() is None


async def test_acquire_says_when_no_endpoint_is_healthy() -> None:
    clock = FakeClock()
    p = pool("round_robin", 1, clock, **CHECKED)
    for _ in range(3):
        p.checked(p.endpoints[0], False)
    with pytest.raises(NoHealthyEndpoint):
        await p.acquire()


def test_passing_checks_do_not_end_an_outlier_ejection() -> None:
    clock = FakeClock()
    p = pool("round_robin", 3, clock, **CHECKED)
    bad = p.endpoints[0]
    eject(p, 0)
    until = bad.ejected_until
    for _ in range(3):
        p.checked(bad, False)
    for _ in range(2):
        p.checked(bad, True)
    assert bad.ejected_until == until  # the outlier ejection runs its course
    assert bad.reason == "consecutive_failures"
    clock.now = until
    assert bad.healthy(clock.now)


def test_health_view() -> None:
    clock = FakeClock()
    p = pool("round_robin", 2, clock, **CHECKED)
    eject(p, 0)
    for _ in range(3):
        p.checked(p.endpoints[1], False)
    clock.advance(10)
    first, second = p.health()
    assert first["healthy"] is False
    assert first["reason"] == "consecutive_failures"
    assert first["ejected_for_seconds"] == pytest.approx(20.0)
    assert second == {
        "url": p.endpoints[1].base, "healthy": False, "reason": "health_check",
        "ejected_for_seconds": None, "active": 0, "consecutive_failures": 0,
        "ejections_in_a_row": 0,
    }  # fmt: skip


# --- connection caps and the queue ----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_request"])
def test_a_full_endpoint_is_skipped(strategy: str) -> None:
    p = pool(strategy, 3, FakeClock(), max_connections=2)
    p.endpoints[0].active = 2
    p.endpoints[1].active = 2
    assert all(p.pick() is p.endpoints[2] for _ in range(50))
    p.endpoints[2].active = 2
    assert p.pick() is None


def test_a_lone_full_endpoint_is_skipped() -> None:
    p = pool("round_robin", 1, FakeClock(), max_connections=1)
    assert p.pick() is p.endpoints[0]
    p.endpoints[0].active = 1
    assert p.pick() is None


async def take(p: BackendPool) -> Any:
    endpoint = p.pick()
    if endpoint is not None:
        endpoint.active += 1
        return endpoint
    return await p.acquire()


@pytest.mark.timeout(10)
async def test_waiting_requests_get_freed_slots_first_come_first_served() -> None:
    p = pool("round_robin", 2, FakeClock(), max_connections=1, queue_timeout_seconds=5)
    first, second = await take(p), await take(p)
    assert {first, second} == set(p.endpoints)
    waiters = [asyncio.create_task(take(p)) for _ in range(3)]
    await wait_until(lambda: len(p.waiting) == 3, "three requests waiting")
    p.release(second)
    assert await waiters[0] is second  # handed over: the slot never looked free
    assert second.active == 1
    assert p.pick() is None  # a newcomer does not overtake the queue
    p.release(first)
    assert await waiters[1] is first
    p.release(second)
    assert await waiters[2] is second
    p.release(first)
    p.release(second)
    assert [e.active for e in p.endpoints] == [0, 0]
    assert not p.waiting


@pytest.mark.timeout(10)
async def test_the_queue_timeout_answers_overloaded() -> None:
    p = pool("round_robin", 1, FakeClock(), max_connections=1, queue_timeout_seconds=0.05)
    held = await take(p)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamOverloaded):
        await take(p)
    assert 0.04 <= loop.time() - started < 1.0
    assert not p.waiting
    p.release(held)
    assert held.active == 0
    now = pool("round_robin", 1, FakeClock(), max_connections=1, queue_timeout_seconds=0)
    await take(now)
    with pytest.raises(UpstreamOverloaded):
        await take(now)


@pytest.mark.timeout(10)
async def test_a_slot_handed_to_a_request_that_gave_up_is_passed_on() -> None:
    p = pool("round_robin", 1, FakeClock(), max_connections=1, queue_timeout_seconds=5)
    held = await take(p)
    leaving = asyncio.create_task(take(p))
    staying = asyncio.create_task(take(p))
    await wait_until(lambda: len(p.waiting) == 2, "two requests waiting")
    p.release(held)  # handed to the first waiter...
    leaving.cancel()  # ...which is cancelled before it runs: the slot goes on
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await staying is held
    assert held.active == 1
    p.release(held)
    assert held.active == 0


@pytest.mark.timeout(10)
async def test_a_slot_on_an_endpoint_ejected_meanwhile_is_not_used() -> None:
    clock = FakeClock()
    p = pool("round_robin", 2, clock, max_connections=1, queue_timeout_seconds=5)
    first, second = await take(p), await take(p)
    waiter = asyncio.create_task(take(p))
    await wait_until(lambda: len(p.waiting) == 1, "a request waiting")
    eject(p, p.endpoints.index(first))
    p.release(first)  # handed over, but first is out: the waiter gives it back, waits on
    await wait_until(lambda: first.active == 0, "the ejected endpoint's slot given back")
    assert not waiter.done()
    p.release(second)
    assert await waiter is second


@pytest.mark.timeout(10)
async def test_an_endpoint_back_from_failing_checks_serves_the_waiting_requests_first() -> None:
    # b fails its checks, a is full: a request waits. b passing its checks again is
    # room that no release hands over: the waiting request gets it, not a newcomer,
    # instead of waiting for a to free a slot (or for the queue timeout, 503).
    p = pool("round_robin", 2, FakeClock(), max_connections=1, queue_timeout_seconds=5,
             **CHECKED)  # fmt: skip
    a, b = p.endpoints
    for _ in range(3):
        p.checked(b, False)
    assert await take(p) is a
    waiter = asyncio.create_task(take(p))
    await wait_until(lambda: len(p.waiting) == 1, "a request waiting")
    p.checked(b, True)
    p.checked(b, True)
    assert p.pick() is None  # a newcomer does not overtake the queue
    assert await waiter is b
    assert [a.active, b.active] == [1, 1]
    assert not p.waiting


@pytest.mark.timeout(10)
async def test_an_endpoint_back_from_its_ejection_serves_the_waiting_requests_first() -> None:
    clock = FakeClock()
    p = pool("round_robin", 2, clock, max_connections=1, queue_timeout_seconds=5)
    a, b = p.endpoints
    eject(p, 1)
    assert await take(p) is a
    waiter = asyncio.create_task(take(p))
    await wait_until(lambda: len(p.waiting) == 1, "a request waiting")
    clock.advance(EJECTION_SECONDS)  # b is back: the next request to come finds it
    newcomer = asyncio.create_task(take(p))
    assert await waiter is b  # first come, first served
    await wait_until(lambda: len(p.waiting) == 1, "the newcomer waiting")
    p.release(a)
    assert await newcomer is a
    assert [a.active, b.active] == [1, 1]


@pytest.mark.timeout(10)
async def test_an_endpoint_that_answers_again_after_a_timeout_serves_the_waiting() -> None:
    # After a timeout a takes one request at a time; its next success gives it room
    # again (its limit back to max_connections), which goes to the waiting request.
    p = pool("round_robin", 2, FakeClock(), max_connections=2, queue_timeout_seconds=5)
    a, b = p.endpoints
    p.failed(a, timed_out=True)
    held = [await take(p) for _ in range(3)]
    assert sorted(e.base for e in held) == sorted([a.base, b.base, b.base])
    waiter = asyncio.create_task(take(p))
    await wait_until(lambda: len(p.waiting) == 1, "a request waiting")
    p.succeeded(a)
    assert await waiter is a
    assert [a.active, b.active] == [2, 2]


def test_other_than_offers_another_endpoint_with_room() -> None:
    p = pool("round_robin", 3, FakeClock(), max_connections=1)
    a, b, c = p.endpoints
    b.active = 1
    assert all(p.other_than(a) is c for _ in range(10))
    c.active = 1
    assert p.other_than(a) is None
    lone = pool("round_robin", 1, FakeClock())
    assert lone.other_than(lone.endpoints[0]) is None


# --- reload ----------------------------------------------------------------------------------


def test_a_changed_backend_keeps_the_endpoints_it_still_lists() -> None:
    clock = FakeClock()
    urls = ["http://127.0.0.1:9000", "http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    before = build_pools({"b": BackendConfig(endpoints=urls, **CHECKED)}, clock=clock)["b"]  # type: ignore[arg-type]
    eject(before, 0)
    for _ in range(3):
        before.checked(before.endpoints[1], False)
    before.endpoints[2].active = 4
    # Same endpoints but one, a new timeout, no more health checks.
    changed = BackendConfig(endpoints=[*urls[:2], "http://127.0.0.1:9003"], timeout_seconds=5)
    after = build_pools({"b": changed}, {"b": before}, clock=clock)["b"]
    assert after is not before
    assert after.endpoints[0] is before.endpoints[0]  # ejection and all
    assert not after.endpoints[0].healthy(clock.now)
    assert after.endpoints[1] is before.endpoints[1]
    assert after.endpoints[1].healthy(clock.now)  # nothing checks it any more: back
    assert after.endpoints[2].base == "http://127.0.0.1:9003"
    assert after.endpoints[2].active == 0
    assert after.waiting is before.waiting
    same = build_pools({"b": changed}, {"b": after}, clock=clock)["b"]
    assert same is after
