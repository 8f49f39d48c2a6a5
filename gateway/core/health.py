"""Upstream health decisions: outlier ejection, active health checks, the retry budget.

Plain values in, plain values out, the time passed in: the shell (``gateway.upstream``)
keeps each endpoint's numbers and does the I/O.

Outlier ejection, as Envoy's ``consecutive_5xx`` does it: an endpoint whose last
``consecutive_failures`` attempts failed (no connection, a timeout, a 5xx, a broken
answer) is taken out of rotation for ``base_ejection_seconds``, doubled for each
ejection in a row (capped at ``MAX_EJECTION_SECONDS``, or the base if larger), as long as
no more than ``max_ejection_percent`` of the backend's endpoints are out at once. When
its time is over it is back on probation: one more failure ejects it again at once, a
success clears it. Once it has served for as long as its last ejection lasted, the
doubling starts over.

Active health checks: ``unhealthy_threshold`` failed checks in a row take an endpoint
out, ``healthy_threshold`` passed ones in a row put it back. They are the operator's own
probe, so the share limit does not apply to them (with every endpoint failing its
checks a backend answers 503 ``no_healthy_endpoint``).

The retry budget, as Envoy's: a request whose connection failed may be sent again to
another endpoint while the backend's retries in flight stay under a fifth of its
requests in flight (or three at once, whichever is more). A dead endpoint refuses at
once, so its retries end quickly and the budget is rarely reached; a backend failing
everywhere at once is not sent twice its load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# Envoy's max_ejection_time: however often an endpoint is ejected in a row, it is tried
# again after at most this long (or after base_ejection_seconds, if that is longer).
MAX_EJECTION_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5
    base_ejection_seconds: float = 30.0
    max_ejection_percent: float = 50.0
    max_ejection_seconds: float = MAX_EJECTION_SECONDS


def ejection_limit(endpoints: int, max_percent: float) -> int:
    """How many of a backend's ``endpoints`` outlier detection may hold out at once.

    The share rounded down, but at least one of several (as Envoy: with two endpoints
    and 30 %, one bad endpoint is still ejected). A lone endpoint only at 100 %: with
    nowhere else to send a request, refusing it only hides that the backend is back."""
    share = int(endpoints * max_percent // 100)
    if endpoints > 1:
        return max(1, share)
    return share


def ejection_seconds(policy: OutlierPolicy, in_a_row: int) -> float:
    """How long the ``in_a_row``-th ejection in a row lasts (1 for the first)."""
    base = policy.base_ejection_seconds
    cap = max(policy.max_ejection_seconds, base)
    # 2**n overflows nothing here: past the cap the exponent no longer matters.
    exponent = min(max(in_a_row - 1, 0), 32)
    return min(base * 2.0**exponent, cap)


class FailureVerdict(NamedTuple):
    """What one more failure does to an endpoint."""

    streak: int  # failures in a row now (0 after an ejection: it starts over)
    ejected_for: float  # seconds out of rotation from now; 0.0 if it stays in
    in_a_row: int  # ejections in a row, this one included


def after_failure(
    policy: OutlierPolicy,
    *,
    streak: int,
    in_a_row: int,
    back_since: float | None,
    last_ejection: float,
    now: float,
    room: bool,
) -> FailureVerdict:
    """One more failure of an endpoint in service.

    ``streak`` is its failures in a row before this one, ``in_a_row`` its ejections in a
    row so far, ``back_since`` when it last came back from one (None if never),
    ``last_ejection`` how long that one lasted, and ``room`` whether the share limit
    allows one more endpoint out now."""
    streak += 1
    if streak < policy.consecutive_failures or not room:
        return FailureVerdict(streak, 0.0, in_a_row)
    if back_since is not None and now - back_since >= last_ejection:
        in_a_row = 0  # it served as long as it was last out: the doubling starts over
    in_a_row += 1
    return FailureVerdict(0, ejection_seconds(policy, in_a_row), in_a_row)


def streak_on_return(policy: OutlierPolicy) -> int:
    """The failure streak an endpoint comes back from an ejection with: one short of the
    limit, so that a single failure ejects it again at once (probation), while a
    success clears it as usual."""
    return policy.consecutive_failures - 1


@dataclass(frozen=True, slots=True)
class CheckPolicy:
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


class CheckVerdict(NamedTuple):
    passes: int  # passed checks in a row
    fails: int  # failed checks in a row
    failing: bool  # out of rotation because of its checks


def after_check(policy: CheckPolicy, *, passed: bool, passes: int, fails: int,
                failing: bool) -> CheckVerdict:  # fmt: skip
    """An endpoint's standing after one more active health check."""
    if passed:
        passes, fails = passes + 1, 0
        if failing and passes >= policy.healthy_threshold:
            failing = False
    else:
        passes, fails = 0, fails + 1
        if not failing and fails >= policy.unhealthy_threshold:
            failing = True
    return CheckVerdict(passes, fails, failing)


def check_delay(interval: float, draw: float, *, jitter: float = 0.1) -> float:
    """Seconds until an endpoint's next check: ``interval`` give or take ``jitter`` of it,
    ``draw`` being a uniform random number in [0, 1). Spread, so that many gateways (or
    many endpoints of one) do not probe in step."""
    return interval * (1.0 - jitter + 2.0 * jitter * draw)


# Envoy's retry budget defaults: retries in flight may be a fifth of the requests in
# flight, and at least three at once, so that a quiet backend can still retry.
RETRY_BUDGET_RATIO = 0.2
MIN_RETRY_CONCURRENCY = 3


def retry_allowed(
    requests_in_flight: int,
    retries_in_flight: int,
    *,
    ratio: float = RETRY_BUDGET_RATIO,
    minimum: int = MIN_RETRY_CONCURRENCY,
) -> bool:
    """Whether one more retry may start, given a backend's requests in flight (retries
    included) and the retries among them."""
    return retries_in_flight < max(minimum, ratio * requests_in_flight)
