"""Calibration of the canary's decision rule at the default configuration, by simulating
whole canaries (``tests/canary_sim.py``): seeded, no sockets.

- A/A (challenger = champion) at failure rates 0.1 %, 1 % and 10 % and 50, 500 and
  5,000 requests per step, 1,000 canaries each: false rollbacks at most 1 - confidence.
- Power: a challenger failing 5 points more than a 1 % champion (1,000 requests per
  step) is rolled back in at least 95 % of canaries within 30 steps; the median of its
  requests until then is reported.
- A challenger failing every request is rolled back within 30 of its requests.
- Failures both variants share (20 %) are no reason to roll back.
- No traffic: never advance, never roll back.

The settings run in two processes (one per core); the figures are printed (``-s``) and
quoted in the README's canary section.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

from gateway.core.canary import State
from tests.canary_sim import DEFAULT_POLICY, Outcome, run_setting

CANARIES = 1_000
FALSE_ROLLBACK_LIMIT = 1 - DEFAULT_POLICY.confidence
A_A = [(rate, per_step) for rate in (0.001, 0.01, 0.1) for per_step in (50, 500, 5000)]


def run_all(settings: list[tuple[float, float, float, int, int]]) -> list[list[Outcome]]:
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_setting, *setting) for setting in settings]
        return [future.result() for future in futures]


def rolled_back(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.state is State.ROLLED_BACK]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_a_canaries_are_rarely_rolled_back() -> None:
    results = run_all(
        [(rate, rate, per_step, CANARIES, seed) for seed, (rate, per_step) in enumerate(A_A)]
    )
    print(f"\nA/A, {CANARIES} canaries each, default config (limit {FALSE_ROLLBACK_LIMIT:.0%}):")
    for (rate, per_step), outcomes in zip(A_A, results, strict=True):
        false = len(rolled_back(outcomes)) / len(outcomes)
        finished = sum(o.state is State.AWAITING_PROMOTION for o in outcomes) / len(outcomes)
        print(
            f"  failure rate {rate:6.1%}, {per_step:5} requests/step: false rollbacks "
            f"{false:.1%}, reached the last step {finished:.0%}"
        )
        assert len(outcomes) == CANARIES
        assert false <= FALSE_ROLLBACK_LIMIT, (rate, per_step, false)
    # The healthy canaries also get somewhere where there is traffic for it.
    for (rate, per_step), outcomes in zip(A_A, results, strict=True):
        if per_step >= 5000:
            finished = sum(o.state is State.AWAITING_PROMOTION for o in outcomes)
            assert finished >= 0.9 * CANARIES, (rate, per_step, finished)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_worse_challengers_are_rolled_back_and_shared_failures_are_not() -> None:
    worse, broken, shared, silent = run_all(
        [
            (0.01, 0.06, 1000, CANARIES, 101),
            (0.01, 1.0, 500, CANARIES, 102),
            (0.2, 0.2, 500, CANARIES, 103),
            (0.01, 0.01, 0, 100, 104),
        ]
    )
    caught = rolled_back(worse)
    to_rollback = [o.challenger_requests for o in caught]
    print(
        f"\n1 % champion, challenger 6 %, 1,000 requests/step: rolled back in "
        f"{len(caught) / len(worse):.1%} of {len(worse)} canaries, after a median of "
        f"{statistics.median(to_rollback):.0f} challenger requests "
        f"(90th percentile {statistics.quantiles(to_rollback, n=10)[-1]:.0f})"
    )
    assert len(caught) >= 0.95 * len(worse)
    assert all(o.reason in ("error_rate_increase", "below_success_threshold") for o in caught)

    killed = [o.challenger_requests for o in rolled_back(broken)]
    print(
        f"challenger failing every request: rolled back in {len(killed) / len(broken):.0%}, "
        f"after at most {max(killed)} of its requests (median {statistics.median(killed):.0f})"
    )
    assert len(killed) == len(broken) and max(killed) <= 30

    shared_rate = len(rolled_back(shared)) / len(shared)
    print(f"both variants failing 20 %: rolled back in {shared_rate:.1%}")
    assert shared_rate <= FALSE_ROLLBACK_LIMIT

    # No traffic at all: it stays at its first step, holding, for as long as it takes.
    assert all(o.state is State.HOLDING and not o.ended for o in silent)
    assert all(o.reason == "insufficient_data" for o in silent)
    assert all(o.challenger_requests == 0 for o in silent)
