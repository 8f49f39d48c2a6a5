"""Backend pools: load balancing and passive outlier ejection, with an injected clock."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.config import BackendConfig
from gateway.upstream.pool import EJECT_AFTER_FAILURES, EJECTION_SECONDS, BackendPool
from tests.helpers.clock import FakeClock


def pool(strategy: str, endpoints: int, clock: FakeClock) -> BackendPool:
    urls = [f"http://127.0.0.1:{9000 + i}" for i in range(endpoints)]
    config = BackendConfig(endpoints=urls, load_balancing=strategy)  # type: ignore[arg-type]
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
    p = pool("round_robin", 2, clock)
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
