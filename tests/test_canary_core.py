"""The canary's decision rule and state machine (``gateway.core.canary``) on evidence
built by hand: no sockets, no clock (``now`` is a number), no randomness.

- ``decide``: no traffic holds (the step runs, then insufficient data) and never moves;
  healthy equal counts advance once the interval is over and ``min_requests`` are in;
  a challenger failing everything is rolled back within a handful of its requests,
  before the interval ends; failures both variants share never roll back; the
  success-threshold rule fires only when the champion is significantly above the
  threshold; an estimate beyond its limit without significance holds (and rolls back
  after ``max_step_seconds`` when ``on_inconclusive`` says so); at weight 1 the champion's
  canary-wide counts are the baseline; the latency and shadow checks, with their
  helpers; what a decision carries and how it serialises.
- ``Policy``: validation, and the error budget split among the kinds of checks.
- The state machine: ``start``/``restart``, ``apply`` of each decision, every operator
  command in every state, the history's collapsing and bound, and ``Status`` round trips.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import orjson
import pytest

from gateway.core.canary import (
    ACTIVE,
    EVALUATED,
    HISTORY_SIZE,
    MIN_SHADOW_SAMPLES,
    Action,
    Counts,
    Decision,
    Evidence,
    NotAllowed,
    Policy,
    Reason,
    ShadowCounts,
    State,
    Status,
    Verdict,
    _remember,
    apply,
    command,
    decide,
    failure_bounds,
    latency_quantile,
    restart,
    slower_than,
    start,
)
from gateway.core.sequential import lower_bound, upper_bound
from gateway.metrics import LATENCY_BUCKETS

POLICY = Policy(steps=(0.1, 0.5))
INTERVAL = POLICY.step_interval_seconds
STARTED = 1_000.0  # when the step started
DURING = STARTED + INTERVAL / 2
AFTER = STARTED + INTERVAL
RATE_ALPHA = POLICY.alpha / 2  # each of the two failure-rate sequences' share

LATENCY_POLICY = replace(POLICY, max_latency_ratio=2.0, latency_bounds=LATENCY_BUCKETS)
SHADOW_POLICY = replace(POLICY, min_shadow_agreement=0.9)


def evidence(
    champion: Counts,
    challenger: Counts,
    *,
    step_champion: Counts | None = None,
    step_challenger: Counts | None = None,
    weight: float = 0.1,
    shadow: ShadowCounts | None = None,
) -> Evidence:
    """A canary in its first step: the step's counts are the canary's unless given."""
    return Evidence(
        champion=champion,
        challenger=challenger,
        step_champion=champion if step_champion is None else step_champion,
        step_challenger=challenger if step_challenger is None else step_challenger,
        step_started=STARTED,
        shadow=ShadowCounts() if shadow is None else shadow,
        step_weight=weight,
    )


def histogram(**buckets: int) -> tuple[int, ...]:
    """A latency histogram over LATENCY_BUCKETS: ``le_0_1=5`` puts 5 requests in the
    bucket whose upper bound is 0.1 s, ``inf=2`` 2 in the last one."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for name, n in buckets.items():
        if name == "inf":
            counts[-1] += n
        else:
            counts[LATENCY_BUCKETS.index(float(name.removeprefix("le_").replace("_", ".")))] += n
    return tuple(counts)


def mentions(text: str, *numbers: str) -> None:
    """A decision's words are for people and may change; the numbers must be there."""
    missing = [n for n in numbers if n not in text]
    assert not missing, (missing, text)


def check(decision: Decision, name: str) -> Any:
    (found,) = [c for c in decision.checks if c.name == name]
    return found


# --- decide: traffic and time ----------------------------------------------------------


def test_no_traffic_holds_while_the_step_runs() -> None:
    d = decide(evidence(Counts(), Counts()), POLICY, DURING)
    assert (d.action, d.reason) == (Action.HOLD, Reason.STEP_IN_PROGRESS)
    mentions(d.message, "30s")  # left of the step's interval
    assert {c.name: c.verdict for c in d.checks} == {
        "error_rate": Verdict.NO_DATA,
        "success_rate": Verdict.NO_DATA,
    }


@pytest.mark.parametrize("later", [0.0, 1.0, 10 * INTERVAL, 1e6])
@pytest.mark.parametrize("on_inconclusive", ["hold", "rollback"])
def test_no_traffic_after_the_interval_holds_for_data_forever(
    later: float, on_inconclusive: str
) -> None:
    policy = replace(POLICY, on_inconclusive=on_inconclusive)
    d = decide(evidence(Counts(), Counts()), policy, AFTER + later)
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    mentions(d.message, "0 of 200 requests")


@pytest.mark.parametrize("failures", [0, 1, 5, 10])
def test_healthy_equal_counts_advance_after_the_interval(failures: int) -> None:
    e = evidence(Counts(1000, failures), Counts(1000, failures))
    d = decide(e, POLICY, AFTER)
    assert (d.action, d.reason) == (Action.ADVANCE, Reason.HEALTHY)
    assert {c.name: c.verdict for c in d.checks} == {
        "error_rate": Verdict.PASS,
        "success_rate": Verdict.PASS,
    }
    # ... and not a second before it.
    d = decide(e, POLICY, AFTER - 1)
    assert (d.action, d.reason) == (Action.HOLD, Reason.STEP_IN_PROGRESS)


def test_advancing_needs_min_requests_of_the_quieter_variant() -> None:
    enough = Counts(POLICY.min_requests)
    short = Counts(POLICY.min_requests - 1)
    assert decide(evidence(enough, enough), POLICY, AFTER).action is Action.ADVANCE
    for champion, challenger in [(enough, short), (short, enough)]:
        d = decide(evidence(champion, challenger), POLICY, AFTER)
        assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
        mentions(d.message, "199 of 200 requests")


# --- decide: failure rates -------------------------------------------------------------


@pytest.mark.parametrize("requests", [4, 10, 30])
@pytest.mark.parametrize("now", [STARTED, DURING, AFTER])
def test_a_challenger_failing_everything_is_rolled_back_within_a_handful(
    requests: int, now: float
) -> None:
    """Rollback needs neither min_requests nor the end of the step's interval."""
    e = evidence(Counts(9 * requests), Counts(requests, requests))
    d = decide(e, POLICY, now)
    assert (d.action, d.reason) == (Action.ROLLBACK, Reason.ERROR_RATE)
    error = check(d, "error_rate")
    assert error.verdict is Verdict.FAIL
    assert error.bound > POLICY.max_error_rate_increase
    assert d.message == error.detail


def test_two_failures_are_no_evidence_yet() -> None:
    d = decide(evidence(Counts(18), Counts(2, 2)), POLICY, DURING)
    assert (d.action, d.reason) == (Action.HOLD, Reason.STEP_IN_PROGRESS)


@pytest.mark.parametrize("scale", [1, 10, 100, 1_000, 10_000])
@pytest.mark.parametrize("now", [DURING, AFTER, AFTER + 100 * INTERVAL])
def test_failures_both_variants_share_never_roll_back(scale: int, now: float) -> None:
    """Both at 20 %: far below the success threshold and far from zero, but the
    challenger is no worse than what it would replace."""
    champion, challenger = Counts(90 * scale, 18 * scale), Counts(10 * scale, 2 * scale)
    policy = replace(POLICY, on_inconclusive="rollback")
    d = decide(evidence(champion, challenger), policy, now)
    assert d.action is not Action.ROLLBACK
    assert all(c.verdict is not Verdict.FAIL for c in d.checks)
    if now >= AFTER and 10 * scale >= POLICY.min_requests:
        assert (d.action, d.reason) == (Action.ADVANCE, Reason.HEALTHY)


TOLERANT = replace(POLICY, max_error_rate_increase=0.5)  # only the threshold rule fires


def test_below_the_success_threshold_with_a_healthy_champion_rolls_back() -> None:
    d = decide(evidence(Counts(10_000), Counts(2_000, 200)), TOLERANT, DURING)
    assert (d.action, d.reason) == (Action.ROLLBACK, Reason.SUCCESS_RATE)
    assert check(d, "error_rate").verdict is not Verdict.FAIL
    success = check(d, "success_rate")
    assert success.verdict is Verdict.FAIL
    assert success.limit == 0.99
    assert success.bound == pytest.approx(1 - lower_bound(200, 2_000, RATE_ALPHA))
    assert success.bound < 0.99
    mentions(success.detail, f"{success.bound:.2%}", "99.00%")


@pytest.mark.parametrize(
    "champion",
    [
        Counts(10_000, 1_000),  # the champion is below the threshold too
        Counts(10_000, 100),  # exactly at it: not significantly above
        Counts(100),  # no failures, but too few requests to show it is above 99 %
    ],
)
def test_a_champion_not_shown_above_the_threshold_condemns_no_one(champion: Counts) -> None:
    d = decide(evidence(champion, Counts(2_000, 200)), TOLERANT, DURING)
    assert d.action is not Action.ROLLBACK
    success = check(d, "success_rate")
    assert success.verdict is not Verdict.FAIL


def test_an_estimate_beyond_the_limit_without_significance_holds() -> None:
    e = evidence(Counts(1_000, 10), Counts(300, 9))  # 3 % against 1 %
    d = decide(e, POLICY, AFTER)
    assert (d.action, d.reason) == (Action.HOLD, Reason.INCONCLUSIVE)
    error = check(d, "error_rate")
    assert error.verdict is Verdict.INCONCLUSIVE
    assert error.estimate == pytest.approx(0.02)
    assert error.bound < POLICY.max_error_rate_increase
    assert d.message == error.detail
    # It holds however long it lasts, by default.
    assert decide(e, POLICY, AFTER + 1e6).reason is Reason.INCONCLUSIVE


@pytest.mark.parametrize(("max_step_seconds", "limit"), [(300.0, 300.0), (None, 10 * INTERVAL)])
def test_inconclusive_for_too_long_rolls_back_when_asked_to(
    max_step_seconds: float | None, limit: float
) -> None:
    policy = replace(POLICY, on_inconclusive="rollback", max_step_seconds=max_step_seconds)
    assert policy.step_limit_seconds == limit
    e = evidence(Counts(1_000, 10), Counts(300, 9))
    before = decide(e, policy, STARTED + limit - 1)
    assert (before.action, before.reason) == (Action.HOLD, Reason.INCONCLUSIVE)
    at = decide(e, policy, STARTED + limit)
    assert (at.action, at.reason) == (Action.ROLLBACK, Reason.INCONCLUSIVE_TOO_LONG)
    mentions(at.message, f"{limit:.0f}s", check(at, "error_rate").detail)
    # Missing data is no inconclusive estimate: it is waited for.
    starved = decide(evidence(Counts(1_000, 10), Counts(100, 3)), policy, STARTED + 1e6)
    assert (starved.action, starved.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)


# --- decide: the last step at weight 1 -------------------------------------------------


def test_at_weight_one_the_champion_s_canary_counts_are_the_baseline() -> None:
    champion = Counts(5_000, 25)  # from the earlier steps
    challenger = Counts(5_250, 26)
    nothing = Counts()
    e = evidence(
        champion, challenger, step_champion=nothing, step_challenger=Counts(250, 1), weight=1.0
    )
    assert e.baseline == champion and e.fewest == 250
    d = decide(e, POLICY, AFTER)
    assert (d.action, d.reason) == (Action.ADVANCE, Reason.HEALTHY)
    assert check(d, "error_rate").estimate == pytest.approx(1 / 250 - 25 / 5_000)
    # min_requests is the challenger's alone at weight 1 ...
    e_short = replace(e, step_challenger=Counts(199))
    d = decide(e_short, POLICY, AFTER)
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    mentions(d.message, "199 of 200")
    # ... while below weight 1 a step without champion requests has nothing to compare.
    d = decide(replace(e, step_weight=0.5), POLICY, AFTER)
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    mentions(d.message, "0 of 200")
    # And a canary whose champion never had a request cannot advance even at weight 1.
    blind = replace(e, champion=nothing)
    d = decide(blind, POLICY, AFTER)
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    assert check(d, "error_rate").verdict is Verdict.NO_DATA


# --- latency ---------------------------------------------------------------------------

FAST = histogram(le_0_05=500, le_0_1=495, le_1_0=5)  # p99 in the 0.1 s bucket


def latency_evidence(champion: tuple[int, ...], challenger: tuple[int, ...]) -> Evidence:
    return evidence(Counts(sum(champion), 0, champion), Counts(sum(challenger), 0, challenger))


def test_a_much_slower_challenger_is_rolled_back_for_latency() -> None:
    slow = histogram(le_1_0=100)  # every request 0.5 to 1 s; the champion's p99 is 0.1 s
    d = decide(latency_evidence(FAST, slow), LATENCY_POLICY, DURING)
    assert (d.action, d.reason) == (Action.ROLLBACK, Reason.LATENCY)
    latency = check(d, "latency")
    assert latency.verdict is Verdict.FAIL
    assert latency.limit == pytest.approx(0.01)
    assert latency.bound == lower_bound(100, 100, LATENCY_POLICY.alpha)
    assert latency.estimate == 1.0
    # the share slow, the cut (2 x the champion's p99 of 0.1 s), the bound, the limit
    mentions(latency.detail, "100.00% (100/100)", "0.2s", "p99", "0.1s", f"{latency.bound:.2%}")
    mentions(latency.detail, "1.00%")
    assert d.message == latency.detail


def test_the_same_latency_distribution_passes() -> None:
    d = decide(latency_evidence(FAST, FAST), LATENCY_POLICY, AFTER)
    assert (d.action, d.reason) == (Action.ADVANCE, Reason.HEALTHY)
    latency = check(d, "latency")
    assert latency.verdict is Verdict.PASS
    assert latency.estimate == pytest.approx(5 / 1_000)  # the 0.5-1 s bucket is above 0.2 s


def test_slower_by_less_than_the_ratio_passes() -> None:
    """Every challenger request in the bucket above the champion's p99 (0.1-0.25 s): not
    certainly slower than 2 x 0.1 s, so no evidence against it."""
    d = decide(latency_evidence(FAST, histogram(le_0_25=1_000)), LATENCY_POLICY, AFTER)
    assert check(d, "latency").verdict is Verdict.PASS
    assert d.action is Action.ADVANCE


@pytest.mark.parametrize(
    "champion",
    [
        histogram(le_0_1=100),  # fewer than min_requests
        histogram(le_0_1=100, inf=900),  # its p99 beyond the last bucket
    ],
)
def test_latency_without_a_champion_quantile_is_missing_data(champion: tuple[int, ...]) -> None:
    e = latency_evidence(champion, histogram(le_0_1=1_000))
    d = decide(e, LATENCY_POLICY, AFTER)
    assert check(d, "latency").verdict is Verdict.NO_DATA
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    if sum(champion) >= POLICY.min_requests:  # not held for the request count
        assert check(d, "latency").detail in d.message


BOUNDS = (1.0, 2.0, 5.0)


@pytest.mark.parametrize(
    ("latency", "q", "expected"),
    [
        ((5, 3, 2, 0), 0.5, 1.0),
        ((5, 3, 2, 0), 0.51, 2.0),
        ((5, 3, 2, 0), 0.8, 2.0),
        ((5, 3, 2, 0), 0.81, 5.0),
        ((5, 3, 2, 0), 0.99, 5.0),
        ((0, 0, 10, 0), 0.01, 5.0),
        ((99, 0, 0, 1), 0.99, 1.0),
        ((98, 0, 0, 2), 0.99, None),  # in the +Inf bucket
        ((0, 0, 0, 1), 0.5, None),
        ((0, 0, 0, 0), 0.5, None),  # no requests
        ((), 0.5, None),
    ],
)
def test_latency_quantile(latency: tuple[int, ...], q: float, expected: float | None) -> None:
    assert latency_quantile(Counts(sum(latency), 0, latency), BOUNDS, q) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, 10),  # every request is slower than nothing
        (0.5, 6),  # the first bucket (0-1 s) may hold faster ones
        (1.0, 6),  # above 1 s: the 1-2, 2-5 and 5+ buckets
        (1.5, 3),
        (2.0, 3),
        (5.0, 1),
        (6.0, 0),  # the +Inf bucket starts at 5 s: not certainly above 6 s
    ],
)
def test_slower_than_counts_whole_buckets_above(seconds: float, expected: int) -> None:
    assert slower_than(Counts(10, 0, (4, 3, 2, 1)), BOUNDS, seconds) == expected


# --- shadow agreement ------------------------------------------------------------------

HEALTHY = (Counts(1_000), Counts(1_000))


def test_many_shadow_mismatches_roll_back() -> None:
    e = evidence(*HEALTHY, shadow=ShadowCounts(compared=500, mismatched=200))
    d = decide(e, SHADOW_POLICY, DURING)
    assert (d.action, d.reason) == (Action.ROLLBACK, Reason.SHADOW_AGREEMENT)
    shadow = check(d, "shadow_agreement")
    assert shadow.verdict is Verdict.FAIL
    assert shadow.bound == pytest.approx(1 - lower_bound(200, 500, SHADOW_POLICY.alpha))
    assert shadow.estimate == pytest.approx(0.6)
    mentions(shadow.detail, "40.00% (200/500)", f"{shadow.bound:.2%}", "90.00%")


def test_shadow_mismatches_the_champion_has_with_itself_do_not() -> None:
    noisy = ShadowCounts(compared=500, mismatched=200, noise_compared=500, noise_mismatched=200)
    policy = replace(SHADOW_POLICY, shadow_noise=True)
    d = decide(evidence(*HEALTHY, shadow=noisy), policy, AFTER)
    assert (d.action, d.reason) == (Action.ADVANCE, Reason.HEALTHY)
    shadow = check(d, "shadow_agreement")
    assert shadow.verdict is Verdict.PASS
    assert shadow.estimate == 1.0
    assert shadow.detail.count("40.00% (200/500)") == 2  # the shadow's, and the noise's
    # The two sequences (shadow and noise) share the shadow check's budget.
    half = policy.alpha / 2
    assert shadow.bound == 1 - (lower_bound(200, 500, half) - upper_bound(200, 500, half))
    # The same noise, when the route does not sample it, is not taken into account ...
    d = decide(evidence(*HEALTHY, shadow=noisy), SHADOW_POLICY, AFTER)
    assert d.reason is Reason.SHADOW_AGREEMENT
    # ... nor is a quiet champion an excuse.
    quiet = replace(noisy, noise_mismatched=0)
    d = decide(evidence(*HEALTHY, shadow=quiet), policy, AFTER)
    assert d.reason is Reason.SHADOW_AGREEMENT


@pytest.mark.parametrize("compared", [0, 1, MIN_SHADOW_SAMPLES - 1])
def test_too_few_compared_answers_are_missing_data(compared: int) -> None:
    e = evidence(*HEALTHY, shadow=ShadowCounts(compared=compared))
    d = decide(e, SHADOW_POLICY, AFTER)
    assert check(d, "shadow_agreement").verdict is Verdict.NO_DATA
    assert (d.action, d.reason) == (Action.HOLD, Reason.INSUFFICIENT_DATA)
    assert check(d, "shadow_agreement").detail in d.message
    mentions(d.message, f"(0/{compared})" if compared else "n/a")
    enough = replace(e, shadow=ShadowCounts(compared=MIN_SHADOW_SAMPLES))
    assert decide(enough, SHADOW_POLICY, AFTER).action is Action.ADVANCE


# --- what a decision carries -----------------------------------------------------------


def test_a_decision_carries_its_checks_and_serialises() -> None:
    policy = replace(LATENCY_POLICY, min_shadow_agreement=0.9)
    champion = Counts(90, 0, histogram(le_0_1=90))
    challenger = Counts(10, 10, histogram(le_0_1=10))
    e = evidence(champion, challenger, shadow=ShadowCounts(10, 1))
    d = decide(e, policy, DURING)
    assert (d.action, d.reason) == (Action.ROLLBACK, Reason.ERROR_RATE)
    assert d.evidence == e
    assert [c.name for c in d.checks] == [
        "error_rate",
        "success_rate",
        "latency",
        "shadow_agreement",
    ]
    error, success, latency, shadow = d.checks
    alpha = policy.alpha
    assert alpha == pytest.approx(0.05 / 3)  # three kinds of check
    champion_high = upper_bound(0, 90, alpha / 2)
    challenger_low = lower_bound(10, 10, alpha / 2)
    assert failure_bounds(e, policy) == (champion_high, challenger_low)
    assert (error.verdict, error.estimate, error.limit) == (Verdict.FAIL, 1.0, 0.01)
    assert error.bound == challenger_low - champion_high
    assert (success.verdict, success.estimate, success.limit) == (Verdict.INCONCLUSIVE, 0.0, 0.99)
    assert success.bound == 1 - challenger_low
    assert (latency.verdict, latency.bound) == (Verdict.NO_DATA, None)  # 90 champion requests
    assert shadow.verdict is Verdict.NO_DATA and shadow.estimate == pytest.approx(0.9)
    assert shadow.bound == 1 - lower_bound(1, 10, alpha)
    assert d.message == error.detail
    mentions(error.detail, "100.00% (10/10)", "0.00% (0/90)", f"{error.bound:+.2%}", "1.00%")
    mentions(success.detail, f"{1 - challenger_low:.2%}", "99.00%")
    mentions(latency.detail, "champion")
    mentions(shadow.detail, "10.00% (1/10)", f"{shadow.bound:.2%}", "90.00%")

    as_dict = d.as_dict()
    loaded = orjson.loads(orjson.dumps(as_dict))
    assert loaded == as_dict
    assert loaded["action"] == "rollback" and loaded["reason"] == "error_rate_increase"
    assert loaded["checks"][0] == {
        "name": "error_rate",
        "verdict": "fail",
        "estimate": 1.0,
        "limit": 0.01,
        "bound": error.bound,
        "detail": error.detail,
    }
    assert loaded["evidence"]["canary"]["challenger"] == {
        "requests": 10,
        "failures": 10,
        "latency": list(histogram(le_0_1=10)),
    }
    assert loaded["evidence"]["step"]["weight"] == 0.1
    assert loaded["evidence"]["step"]["started"] == STARTED
    assert loaded["evidence"]["shadow"]["mismatched"] == 1


def test_counts_add_and_round_trip() -> None:
    a = Counts(3, 1, (1, 2, 0))
    assert a + Counts() == a == Counts() + a
    assert a + a == Counts(6, 2, (2, 4, 0))
    with pytest.raises(ValueError):
        _ = a + Counts(1, 0, (1,))
    assert Counts.from_dict(orjson.loads(orjson.dumps(a.as_dict()))) == a
    assert Counts.from_dict({}) == Counts()
    s = ShadowCounts(4, 3, 2, 1)
    assert s + s == ShadowCounts(8, 6, 4, 2)
    assert ShadowCounts.from_dict(orjson.loads(orjson.dumps(s.as_dict()))) == s


# --- Policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [(), (0.5, 0.1), (0.1, 0.1), (0.0, 0.5), (-0.1, 0.5), (0.5, 1.5), (1.01,), (math.nan,)],
)
def test_policy_refuses_bad_steps(steps: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="steps"):
        Policy(steps=steps)


@pytest.mark.parametrize("steps", [(1.0,), (0.01,), (0.05, 0.1, 0.5, 1.0)])
def test_policy_takes_increasing_weights_up_to_one(steps: tuple[float, ...]) -> None:
    assert Policy(steps=steps).steps == steps


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 1.5])
def test_policy_refuses_a_confidence_outside_0_1(confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence"):
        Policy(steps=(0.5,), confidence=confidence)


@pytest.mark.parametrize(
    ("latency", "shadow", "kinds"), [(None, None, 1), (2.0, None, 2), (None, 0.9, 2), (2.0, 0.9, 3)]
)
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_the_error_budget_is_split_among_the_kinds_of_checks(
    latency: float | None, shadow: float | None, kinds: int, confidence: float
) -> None:
    policy = Policy(
        steps=(0.5,), confidence=confidence, max_latency_ratio=latency, min_shadow_agreement=shadow
    )
    assert policy.alpha == pytest.approx((1 - confidence) / kinds)
    # The two failure-rate sequences share the rate checks' part.
    e = evidence(Counts(900, 9), Counts(100, 3))
    assert failure_bounds(e, policy) == (
        upper_bound(9, 900, policy.alpha / 2),
        lower_bound(3, 100, policy.alpha / 2),
    )


# --- the state machine -----------------------------------------------------------------

T0 = 5_000.0


def status_in(state: State, **changes: Any) -> Status:
    """A status in ``state`` at step 0 of POLICY (weight 0 where the weight is not the
    canary's)."""
    weight = POLICY.steps[0] if state in ACTIVE else 0.0
    step = -1 if state is State.IDLE else 0
    values: dict[str, Any] = {
        "state": state,
        "canary_id": "" if state is State.IDLE else "c1",
        "step": step,
        "weight": weight,
        "step_started": T0,
        "started_at": T0,
        "updated_at": T0,
        "challenger": None if state is State.IDLE else "b",
    }
    return Status(**{**values, **changes})


def made(action: Action, reason: Reason, message: str = "why") -> Decision:
    return Decision(action, reason, message)


@pytest.mark.parametrize("state", list(State))
def test_start_from_idle_or_ended_states_only(state: State) -> None:
    before = status_in(state)
    if state in {State.IDLE, State.PROMOTED, State.ROLLED_BACK}:
        s = start(before, POLICY, T0 + 1, "c2", "challenger-v2")
        assert (s.state, s.step, s.weight) == (State.PROGRESSING, 0, 0.1)
        assert (s.canary_id, s.challenger) == ("c2", "challenger-v2")
        assert s.step_started == s.started_at == s.updated_at == T0 + 1
        assert s.reason == "started"
        assert s.history[-1]["action"] == "start"
        assert s.history[-1]["message"] == "step 1 of 2 at weight 0.1"
    else:
        assert state in ACTIVE
        with pytest.raises(NotAllowed, match=state.value):
            start(before, POLICY, T0 + 1, "c2", "challenger-v2")


def test_restart_on_a_new_challenger_starts_over_from_any_step() -> None:
    s = status_in(State.HOLDING, step=1, weight=0.5)
    s = restart(s, POLICY, T0 + 7, "c3", "v3", Reason.CHALLENGER_CHANGED)
    assert (s.state, s.step, s.weight, s.step_started, s.started_at) == (
        State.PROGRESSING, 0, 0.1, T0 + 7, T0 + 7,
    )  # fmt: skip
    assert (s.canary_id, s.challenger, s.reason) == ("c3", "v3", "challenger_changed")


@pytest.mark.parametrize("state", sorted(set(State) - EVALUATED))
def test_only_evaluated_canaries_take_decisions(state: State) -> None:
    with pytest.raises(NotAllowed):
        apply(status_in(state), made(Action.HOLD, Reason.INSUFFICIENT_DATA), POLICY, T0)


@pytest.mark.parametrize("state", sorted(EVALUATED))
def test_advance_moves_to_the_next_step(state: State) -> None:
    s = apply(status_in(state), made(Action.ADVANCE, Reason.HEALTHY), POLICY, T0 + 60)
    assert (s.state, s.step, s.weight, s.step_started) == (State.PROGRESSING, 1, 0.5, T0 + 60)
    assert s.started_at == T0 and s.updated_at == T0 + 60
    assert s.reason == "healthy"
    assert s.history[-1] == {
        "at": T0 + 60,
        "action": "advance",
        "reason": "healthy",
        "message": "step 2 of 2 at weight 0.5",
        "step": 1,
        "weight": 0.5,
        "count": 1,
    }


@pytest.mark.parametrize("auto_promote", [False, True])
def test_advance_from_the_last_step(auto_promote: bool) -> None:
    policy = replace(POLICY, auto_promote=auto_promote)
    last = status_in(State.PROGRESSING, step=1, weight=0.5)
    s = apply(last, made(Action.ADVANCE, Reason.HEALTHY), policy, T0 + 60)
    assert s.reason == "last_step_passed" and s.step == 1
    if auto_promote:
        assert (s.state, s.weight) == (State.PROMOTED, 0.0)
        assert s.history[-1]["action"] == "promote"
    else:
        assert (s.state, s.weight) == (State.AWAITING_PROMOTION, 0.5)
        assert s.history[-1]["action"] == "advance"
    assert s.step_started == T0  # no new step


@pytest.mark.parametrize("state", sorted(EVALUATED))
def test_rollback_ends_the_canary_at_weight_zero(state: State) -> None:
    e = evidence(Counts(90), Counts(10, 10))
    d = decide(e, POLICY, DURING)
    s = apply(status_in(state, step=1, weight=0.5), d, POLICY, T0 + 3)
    assert (s.state, s.weight, s.step, s.reason) == (
        State.ROLLED_BACK,
        0.0,
        1,
        "error_rate_increase",
    )
    assert s.last_decision is not None
    assert s.last_decision["action"] == "rollback"
    assert s.last_decision["message"] == d.message
    assert s.last_decision["checks"][0]["verdict"] == "fail"
    assert s.last_decision["evidence"] == e.as_dict()
    orjson.dumps(s.as_dict())


@pytest.mark.parametrize("state", sorted(EVALUATED))
@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (Reason.STEP_IN_PROGRESS, State.PROGRESSING),
        (Reason.INSUFFICIENT_DATA, State.HOLDING),
        (Reason.INCONCLUSIVE, State.HOLDING),
    ],
)
def test_holds(state: State, reason: Reason, expected: State) -> None:
    before = status_in(state, step=1, weight=0.5)
    s = apply(before, made(Action.HOLD, reason), POLICY, T0 + 5)
    assert s.state is expected
    assert (s.step, s.weight, s.step_started, s.reason) == (1, 0.5, T0, reason.value)


@pytest.mark.parametrize("action", [Action.START, Action.PROMOTE, Action.PAUSE, Action.RESUME])
def test_apply_refuses_what_the_controller_does_not_decide(action: Action) -> None:
    with pytest.raises(ValueError, match="not a decision"):
        apply(status_in(State.PROGRESSING), made(action, Reason.OPERATOR), POLICY, T0)


# Written out independently of the module's own table: command -> {state it is allowed
# in}, and what it leads to.
ALLOWED = {
    Action.PAUSE: {State.PROGRESSING, State.HOLDING, State.AWAITING_PROMOTION},
    Action.RESUME: {State.PAUSED},
    Action.PROMOTE: {State.PROGRESSING, State.HOLDING, State.AWAITING_PROMOTION, State.PAUSED},
    Action.ROLLBACK: {
        State.PROGRESSING,
        State.HOLDING,
        State.AWAITING_PROMOTION,
        State.PAUSED,
        State.PROMOTED,
    },
}
LEADS_TO = {
    Action.PAUSE: State.PAUSED,
    Action.RESUME: State.PROGRESSING,
    Action.PROMOTE: State.PROMOTED,
    Action.ROLLBACK: State.ROLLED_BACK,
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("action", list(ALLOWED))
def test_operator_commands(action: Action, state: State) -> None:
    before = status_in(state, step=1, weight=0.5 if state in ACTIVE else 0.0)
    if state not in ALLOWED[action]:
        with pytest.raises(
            NotAllowed, match=f"cannot {action.value} a canary that is {state.value}"
        ):
            command(before, action, T0 + 9)
        return
    s = command(before, action, T0 + 9)
    assert s.state is LEADS_TO[action]
    assert (s.reason, s.updated_at, s.step) == ("operator", T0 + 9, 1)
    assert s.history[-1]["action"] == action.value
    assert s.history[-1]["message"] == f"{action.value} by an operator"
    if action in (Action.PROMOTE, Action.ROLLBACK):
        assert s.weight == 0.0
    else:
        assert s.weight == before.weight == 0.5
    # Resuming starts the step's interval over; nothing else moves it.
    assert s.step_started == (T0 + 9 if action is Action.RESUME else T0)


@pytest.mark.parametrize("action", [Action.START, Action.ADVANCE, Action.HOLD])
def test_what_is_not_an_operator_command(action: Action) -> None:
    with pytest.raises(ValueError, match="not an operator command"):
        command(status_in(State.PROGRESSING), action, T0)


def test_a_resumed_step_runs_its_whole_interval_again() -> None:
    s = start(Status(), POLICY, 0.0, "c1", "b")
    s = command(s, Action.PAUSE, 50.0)
    s = command(s, Action.RESUME, 1_000.0)
    e = replace(evidence(Counts(1_000), Counts(1_000)), step_started=s.step_started)
    assert decide(e, POLICY, 1_000.0 + INTERVAL - 1).reason is Reason.STEP_IN_PROGRESS
    assert decide(e, POLICY, 1_000.0 + INTERVAL).reason is Reason.HEALTHY


# --- history -------------------------------------------------------------------------


def test_repeated_holds_collapse_into_one_entry_with_a_count() -> None:
    s = start(Status(), POLICY, 0.0, "c1", "b")
    for i in range(5):
        s = apply(s, made(Action.HOLD, Reason.INSUFFICIENT_DATA, f"try {i}"), POLICY, 60.0 + i)
    assert [(h["action"], h["count"]) for h in s.history] == [("start", 1), ("hold", 5)]
    hold = s.history[-1]
    assert (hold["at"], hold["last_at"], hold["message"]) == (60.0, 64.0, "try 0")
    assert s.last_decision is not None and s.last_decision["message"] == "try 4"
    # Another reason, or the same one at another step, is a new entry.
    s = apply(s, made(Action.HOLD, Reason.INCONCLUSIVE), POLICY, 70.0)
    s = apply(s, made(Action.ADVANCE, Reason.HEALTHY), POLICY, 80.0)
    s = apply(s, made(Action.HOLD, Reason.INCONCLUSIVE), POLICY, 90.0)
    s = apply(s, made(Action.HOLD, Reason.INCONCLUSIVE), POLICY, 95.0)
    assert [(h["action"], h["reason"], h["step"], h["count"]) for h in s.history] == [
        ("start", "started", 0, 1),
        ("hold", "insufficient_data", 0, 5),
        ("hold", "inconclusive", 0, 1),
        ("advance", "healthy", 1, 1),
        ("hold", "inconclusive", 1, 2),
    ]
    # The history outlives the canary: a new one adds to it.
    s = command(s, Action.ROLLBACK, 100.0)
    s = start(s, POLICY, 200.0, "c2", "b2")
    assert [h["action"] for h in s.history][-2:] == ["rollback", "start"]
    assert len(s.history) == 7


def test_the_history_keeps_the_last_history_size_entries() -> None:
    s = start(Status(), POLICY, 0.0, "c1", "b")
    reasons = [Reason.INSUFFICIENT_DATA, Reason.INCONCLUSIVE]
    for i in range(3 * HISTORY_SIZE):
        s = apply(s, made(Action.HOLD, reasons[i % 2], f"hold {i}"), POLICY, float(i))
    assert len(s.history) == HISTORY_SIZE
    assert [h["message"] for h in s.history] == [
        f"hold {i}" for i in range(2 * HISTORY_SIZE, 3 * HISTORY_SIZE)
    ]
    assert all(h["count"] == 1 for h in s.history)


def test_remember() -> None:
    entry = {"at": 1.0, "action": "hold", "reason": "inconclusive", "step": 0, "message": "m"}
    kept = _remember((), entry, size=3)
    assert kept == ({**entry, "count": 1},)
    kept = _remember(kept, {**entry, "at": 2.0, "message": "n"}, size=3)
    assert kept == ({**entry, "count": 2, "last_at": 2.0},)
    for step in (1, 2, 3):
        kept = _remember(kept, {**entry, "step": step}, size=3)
    assert [h["step"] for h in kept] == [1, 2, 3]
    # An entry from an older store without a count counts as one.
    assert _remember(({**entry},), entry)[-1]["count"] == 2


# --- Status ----------------------------------------------------------------------------


def test_status_round_trips_through_json() -> None:
    s = start(Status(), POLICY, 10.0, "c1", "b")
    s = apply(s, decide(evidence(Counts(1_000), Counts(1_000)), POLICY, AFTER), POLICY, 70.0)
    for t in (80.0, 85.0):
        d = decide(evidence(Counts(2_000, 20), Counts(300, 9)), POLICY, AFTER)
        assert d.reason is Reason.INCONCLUSIVE
        s = apply(s, d, POLICY, t)
    assert s.state is State.HOLDING and s.last_decision is not None
    assert s.last_decision["checks"]  # the decision's numbers are kept
    value = s.as_dict()
    assert value["state"] == "holding" and isinstance(value["history"], list)
    assert Status.from_dict(orjson.loads(orjson.dumps(value))) == s
    assert Status.from_dict(value) == s
    assert Status.from_dict({}) == Status()
    assert Status().as_dict()["step"] == -1
