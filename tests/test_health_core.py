"""Upstream health decisions (gateway.core.health) on plain values: outlier ejection, its
doubling and share limit, active health checks' verdicts, the retry budget."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.health import (
    MAX_EJECTION_SECONDS,
    CheckPolicy,
    FailureVerdict,
    OutlierPolicy,
    after_check,
    after_failure,
    check_delay,
    ejection_limit,
    ejection_seconds,
    retry_allowed,
    streak_on_return,
)

POLICY = OutlierPolicy(consecutive_failures=5, base_ejection_seconds=30.0)


@pytest.mark.parametrize(
    ("endpoints", "percent", "limit"),
    [
        (1, 50, 0),  # a lone endpoint stays: nowhere else to go
        (1, 99.9, 0),
        (1, 100, 1),  # unless the operator asks for it
        (2, 10, 1),  # at least one of several, whatever the share
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (5, 50, 2),
        (10, 50, 5),
        (10, 0, 1),
        (10, 100, 10),
        (3, 100, 3),
        (0, 50, 0),
    ],
)
def test_ejection_limit(endpoints: int, percent: float, limit: int) -> None:
    assert ejection_limit(endpoints, percent) == limit


@given(st.integers(0, 1000), st.floats(0, 100))
def test_ejection_limit_never_exceeds_the_backend_or_the_share(n: int, percent: float) -> None:
    limit = ejection_limit(n, percent)
    assert 0 <= limit <= n
    if n > 1:
        assert limit >= 1
        assert limit <= max(1, n * percent / 100)


def test_ejection_doubles_and_is_capped() -> None:
    assert [ejection_seconds(POLICY, n) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert ejection_seconds(POLICY, 10_000) == MAX_EJECTION_SECONDS
    # A base above the cap is never cut short, nor doubled.
    long = OutlierPolicy(base_ejection_seconds=600.0)
    assert ejection_seconds(long, 1) == ejection_seconds(long, 5) == 600.0


def fail(
    streak: int, *, in_a_row: int = 0, back_since: float | None = None, last: float = 0.0,
    now: float = 1000.0, room: bool = True,
) -> FailureVerdict:  # fmt: skip
    return after_failure(
        POLICY, streak=streak, in_a_row=in_a_row, back_since=back_since,
        last_ejection=last, now=now, room=room,
    )  # fmt: skip


def test_the_fifth_failure_in_a_row_ejects() -> None:
    streak = 0
    for expected in range(1, 5):
        verdict = fail(streak)
        assert verdict == (expected, 0.0, 0)
        streak = verdict.streak
    assert fail(streak) == (0, 30.0, 1)


def test_no_room_keeps_it_in_and_counting() -> None:
    assert fail(4, room=False) == (5, 0.0, 0)
    assert fail(11, room=False) == (12, 0.0, 0)
    assert fail(12) == (0, 30.0, 1)  # once there is room, the next failure ejects


def test_probation_ejects_again_at_once_and_doubles() -> None:
    back = streak_on_return(POLICY)
    assert back == 4
    # Back at t=1030 from a 30 s ejection, failing again 5 s later: 60 s this time.
    assert fail(back, in_a_row=1, back_since=1030.0, last=30.0, now=1035.0) == (0, 60.0, 2)
    assert fail(back, in_a_row=4, back_since=1030.0, last=240.0, now=1035.0) == (0, 300.0, 5)


def test_the_doubling_starts_over_after_serving_as_long_as_it_was_out() -> None:
    # Out for 60 s last time; 60 s of service since: a fresh 30 s.
    assert fail(4, in_a_row=2, back_since=1000.0, last=60.0, now=1060.0) == (0, 30.0, 1)
    assert fail(4, in_a_row=2, back_since=1000.0, last=60.0, now=1059.9) == (0, 120.0, 3)


def test_a_threshold_of_one_ejects_on_every_failure() -> None:
    one = OutlierPolicy(consecutive_failures=1, base_ejection_seconds=1.0)
    assert streak_on_return(one) == 0
    verdict = after_failure(one, streak=0, in_a_row=0, back_since=None, last_ejection=0.0,
                            now=0.0, room=True)  # fmt: skip
    assert verdict == (0, 1.0, 1)


def check(policy: CheckPolicy, outcomes: str, failing: bool = False) -> list[bool]:
    """The endpoint's ``failing`` after each check of ``outcomes`` ("+" passed, "-" failed)."""
    passes = fails = 0
    seen = []
    for outcome in outcomes:
        passes, fails, failing = after_check(
            policy, passed=outcome == "+", passes=passes, fails=fails, failing=failing
        )
        seen.append(failing)
    return seen


def test_checks_take_out_after_unhealthy_threshold_and_back_after_healthy_threshold() -> None:
    policy = CheckPolicy(healthy_threshold=2, unhealthy_threshold=3)
    assert check(policy, "--+--") == [False] * 5  # never three failures in a row
    assert check(policy, "---") == [False, False, True]
    assert check(policy, "+-+", failing=True) == [True, True, True]  # never two passes in a row
    assert check(policy, "-++", failing=True) == [True, True, False]
    assert check(policy, "----++-+") == [False, False, True, True, True, False, False, False]


def test_thresholds_of_one_follow_every_check() -> None:
    policy = CheckPolicy(healthy_threshold=1, unhealthy_threshold=1)
    assert check(policy, "-+-+") == [True, False, True, False]


@given(st.floats(0, 0.9999999))
def test_check_delay_stays_within_the_jitter(draw: float) -> None:
    delay = check_delay(10.0, draw)
    assert 9.0 <= delay < 11.0


def test_check_delay_spans_the_jitter() -> None:
    assert check_delay(10.0, 0.0) == pytest.approx(9.0)
    assert check_delay(10.0, 0.5) == pytest.approx(10.0)
    assert check_delay(10.0, 0.99999) == pytest.approx(11.0, abs=1e-3)


@pytest.mark.parametrize(
    ("requests", "retries", "allowed"),
    [
        (0, 0, True),  # at least three at once, however quiet the backend
        (1, 2, True),
        (3, 3, False),
        (10, 2, True),
        (10, 3, False),
        (20, 3, True),  # a fifth of 20 is 4
        (20, 4, False),
        (100, 19, True),
        (100, 20, False),
    ],
)
def test_retry_budget(requests: int, retries: int, allowed: bool) -> None:
    assert retry_allowed(requests, retries) is allowed


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_retry_budget_is_a_fifth_of_requests_or_three(requests: int, retries: int) -> None:
    if retry_allowed(requests, retries):
        assert retries < 3 or retries < 0.2 * requests
    else:
        assert retries >= 3 and retries >= 0.2 * requests
