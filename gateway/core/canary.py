"""The canary's decisions and its state machine: pure functions of plain values.

What it guarantees, in plain words
----------------------------------
- **It never rolls back a challenger that is as good as its champion, except with
  probability at most ``1 - confidence`` over the whole canary** (5 % at the default
  0.95), however long the canary runs and however often it is evaluated. Every rollback
  rule compares confidence sequences (``gateway.core.sequential``), bounds that hold at
  every evaluation at once, so looking every five seconds costs no extra false alarms.
  The error budget ``1 - confidence`` is split evenly between the kinds of check the
  route turns on (failure rates, latency, shadow agreement).
- **It rolls back as soon as the evidence is significant** that the challenger is worse:
  its failure rate exceeds the champion's by more than ``max_error_rate_increase``; or
  its success rate is below ``success_threshold`` while the champion's is significantly
  above it (a failing champion cannot condemn its challenger); or, with
  ``max_latency_ratio``, more of its requests are slower than that ratio times the
  champion's ``latency_quantile`` than the quantile allows; or, with
  ``min_shadow_agreement``, the shadow's agreement net of the champion's disagreement
  with itself is below it. Rollback needs no minimum number of requests: a challenger
  that fails everything is gone within a handful of its requests.
- **It never advances on missing data.** A step advances only once it has lasted
  ``step_interval_seconds``, both variants have at least ``min_requests`` in it, and every
  check's estimate over the step is within its limit. With no traffic it holds, for as
  long as it takes. (Advancing needs the estimates within limits, not proof: proving a
  challenger at most one point worse than a 1 % champion takes thousands of requests
  per step, and a canary that cannot move is switched off.)
- Both variants are compared over the same time window: the counts are those of the
  current canary only, champion and challenger side by side.

Rollback evidence accumulates over the whole canary (all its steps); advancing looks at
the current step. Decisions carry the checks they were made on (estimates, bounds,
limits), so each can be explained afterwards.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.core.sequential import lower_bound, upper_bound

# Fewer compared shadow answers than this in a canary is no basis to advance on.
MIN_SHADOW_SAMPLES = 20
HISTORY_SIZE = 50


class State(enum.StrEnum):
    IDLE = "idle"
    PROGRESSING = "progressing"
    HOLDING = "holding"
    AWAITING_PROMOTION = "awaiting_promotion"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    PAUSED = "paused"


# States in which the controller evaluates, and in which the weight is the canary's.
EVALUATED = frozenset({State.PROGRESSING, State.HOLDING})
ACTIVE = EVALUATED | {State.PAUSED, State.AWAITING_PROMOTION}


class Action(enum.StrEnum):
    """A decision: the label values of ``gateway_canary_decisions_total{decision}``."""

    START = "start"
    ADVANCE = "advance"
    HOLD = "hold"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    PAUSE = "pause"
    RESUME = "resume"


class Reason(enum.StrEnum):
    STARTED = "started"
    STEP_IN_PROGRESS = "step_in_progress"  # healthy so far; the step runs its interval
    INSUFFICIENT_DATA = "insufficient_data"
    INCONCLUSIVE = "inconclusive"  # an estimate beyond its limit, not significant yet
    HEALTHY = "healthy"
    LAST_STEP_PASSED = "last_step_passed"
    ERROR_RATE = "error_rate_increase"
    SUCCESS_RATE = "below_success_threshold"
    LATENCY = "latency"
    SHADOW_AGREEMENT = "shadow_agreement"
    INCONCLUSIVE_TOO_LONG = "inconclusive_too_long"
    GATE_CLOSED = "gate_closed"
    OPERATOR = "operator"
    CHALLENGER_CHANGED = "challenger_changed"
    CANARY_REMOVED = "canary_removed"  # the config no longer has it


class Verdict(enum.StrEnum):
    PASS = "pass"  # the step's estimate is within the limit
    FAIL = "fail"  # significant evidence the challenger is worse: roll back
    INCONCLUSIVE = "inconclusive"  # the estimate is beyond the limit, not significantly
    NO_DATA = "no_data"


# --- evidence --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counts:
    """One variant's requests over some span: how many, how many failed (a 5xx reached
    the client, or the answer was cut off), and how many fell in each latency bucket."""

    requests: int = 0
    failures: int = 0
    latency: tuple[int, ...] = ()  # one count per bucket of Policy.latency_bounds, +Inf last

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.requests + other.requests,
            self.failures + other.failures,
            _add(self.latency, other.latency),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "failures": self.failures, "latency": list(self.latency)}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Counts:
        return cls(
            int(value.get("requests", 0)),
            int(value.get("failures", 0)),
            tuple(int(n) for n in value.get("latency", ())),
        )


@dataclass(frozen=True, slots=True)
class ShadowCounts:
    """Compared shadow answers and, where the route samples it, the champion compared
    with itself (the noise every comparison has)."""

    compared: int = 0
    mismatched: int = 0
    noise_compared: int = 0
    noise_mismatched: int = 0

    def __add__(self, other: ShadowCounts) -> ShadowCounts:
        return ShadowCounts(
            self.compared + other.compared,
            self.mismatched + other.mismatched,
            self.noise_compared + other.noise_compared,
            self.noise_mismatched + other.noise_mismatched,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "compared": self.compared,
            "mismatched": self.mismatched,
            "noise_compared": self.noise_compared,
            "noise_mismatched": self.noise_mismatched,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ShadowCounts:
        return cls(*(int(value.get(k, 0)) for k in cls.__slots__))


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a:
        return b
    if not b:
        return a
    return tuple(x + y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a decision is made on: the canary's counts so far, and the current step's."""

    champion: Counts
    challenger: Counts
    step_champion: Counts
    step_challenger: Counts
    step_started: float
    shadow: ShadowCounts = ShadowCounts()
    step_weight: float = 0.0  # the challenger's weight in the step

    @property
    def baseline(self) -> Counts:
        """The champion's counts the step's estimates compare with: the step's own, but
        at weight 1 (no champion traffic in the step) its counts over the canary."""
        return self.step_champion if self.step_weight < 1 else self.champion

    @property
    def fewest(self) -> int:
        """Requests of the quieter variant in the step (of the challenger at weight 1)."""
        if self.step_weight >= 1:
            return self.step_challenger.requests
        return min(self.step_champion.requests, self.step_challenger.requests)

    def as_dict(self) -> dict[str, Any]:
        return {
            "canary": {
                "champion": self.champion.as_dict(),
                "challenger": self.challenger.as_dict(),
            },
            "step": {
                "champion": self.step_champion.as_dict(),
                "challenger": self.step_challenger.as_dict(),
                "started": self.step_started,
                "weight": self.step_weight,
            },
            "shadow": self.shadow.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """A route's canary settings, as plain values (built from its ``canary:`` block)."""

    steps: tuple[float, ...]
    step_interval_seconds: float = 60.0
    min_requests: int = 200
    max_error_rate_increase: float = 0.01
    success_threshold: float = 0.99
    confidence: float = 0.95
    max_latency_ratio: float | None = None
    latency_quantile: float = 0.99
    latency_bounds: tuple[float, ...] = ()  # the latency histogram's upper bucket bounds
    min_shadow_agreement: float | None = None
    shadow_noise: bool = False  # the route samples champion-vs-champion noise
    max_step_seconds: float | None = None  # None: 10 x step_interval_seconds
    on_inconclusive: str = "hold"  # or "rollback"
    auto_promote: bool = False

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < w <= 1 for w in self.steps):
            raise ValueError(f"steps must be weights in (0, 1], got {self.steps}")
        if any(b <= a for a, b in itertools.pairwise(self.steps)):
            raise ValueError(f"steps must increase, got {self.steps}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {self.confidence}")

    @property
    def step_limit_seconds(self) -> float:
        if self.max_step_seconds is not None:
            return self.max_step_seconds
        return 10 * self.step_interval_seconds

    @property
    def alpha(self) -> float:
        """The error budget of each kind of check the route turns on."""
        kinds = 1 + (self.max_latency_ratio is not None) + (self.min_shadow_agreement is not None)
        return (1 - self.confidence) / kinds


# --- checks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One check's verdict with the numbers it rests on."""

    name: str
    verdict: Verdict
    estimate: float | None  # the step's estimate the limit applies to
    limit: float
    bound: float | None  # the canary-wide confidence bound a rollback rests on
    # The check's numbers in plain words, formatted only when asked for: the controller
    # evaluates every few seconds and simulations millions of times.
    explain: Callable[[], str] = field(compare=False, repr=False)

    @property
    def detail(self) -> str:
        return self.explain()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict.value,
            "estimate": self.estimate,
            "limit": self.limit,
            "bound": self.bound,
            "detail": self.detail,
        }


_REASON_OF = {
    "error_rate": Reason.ERROR_RATE,
    "success_rate": Reason.SUCCESS_RATE,
    "latency": Reason.LATENCY,
    "shadow_agreement": Reason.SHADOW_AGREEMENT,
}


def _rate(counts: Counts) -> float | None:
    return counts.failures / counts.requests if counts.requests else None


def failure_bounds(evidence: Evidence, policy: Policy) -> tuple[float, float]:
    """The most the champion's failure rate can be and the least the challenger's can,
    from their confidence sequences over the canary, each at half the rate checks'
    budget (both hold at once with 1 - alpha). The error-rate and success-rate checks
    share them, and with them that budget: neither can roll back a challenger that is no
    worse than its champion unless one of the two sequences misses its rate."""
    half = policy.alpha / 2
    c, x = evidence.champion, evidence.challenger
    return upper_bound(c.failures, c.requests, half), lower_bound(x.failures, x.requests, half)


def _at_most(bound: float, estimate: float | None, limit: float) -> Verdict:
    """The verdict on a quantity that must stay at most ``limit``: FAIL when even its
    confident lower ``bound`` is past it, else by this step's ``estimate``."""
    if bound > limit:
        return Verdict.FAIL
    if estimate is None:
        return Verdict.NO_DATA
    return Verdict.PASS if estimate <= limit else Verdict.INCONCLUSIVE


def check_error_rate(
    evidence: Evidence, policy: Policy, champion_high: float, challenger_low: float
) -> Check:
    """Challenger's failure rate minus the champion's, against max_error_rate_increase."""
    limit = policy.max_error_rate_increase
    c, x = evidence.champion, evidence.challenger
    bound = challenger_low - champion_high  # the least the difference can be
    step_c, step_x = _rate(evidence.baseline), _rate(evidence.step_challenger)
    estimate = None if step_c is None or step_x is None else step_x - step_c
    return Check(
        "error_rate",
        _at_most(bound, estimate, limit),
        estimate,
        limit,
        bound,
        lambda: (
            f"failure rate challenger {_pct(x.failures, x.requests)} vs champion "
            f"{_pct(c.failures, c.requests)} in the canary; with confidence, the difference "
            f"is at least {bound:+.2%} (rollback above {limit:+.2%})"
        ),
    )


def check_success_rate(
    evidence: Evidence, policy: Policy, champion_high: float, challenger_low: float
) -> Check:
    """Challenger's success rate against success_threshold, unless the champion is below
    it as well: then the challenger is no worse than what it would replace."""
    threshold = policy.success_threshold
    best_success = 1 - challenger_low  # the most the challenger's success rate can be
    champion_fine = 1 - champion_high >= threshold  # significantly at or above it
    step_c, step_x = _rate(evidence.baseline), _rate(evidence.step_challenger)
    estimate = None if step_x is None else 1 - step_x
    if best_success < threshold and champion_fine:
        verdict = Verdict.FAIL
    elif estimate is None or step_c is None:
        verdict = Verdict.NO_DATA
    elif estimate >= threshold or 1 - step_c < threshold:
        verdict = Verdict.PASS
    else:
        verdict = Verdict.INCONCLUSIVE
    return Check(
        "success_rate",
        verdict,
        estimate,
        threshold,
        best_success,
        lambda: (
            f"challenger success rate at most {best_success:.2%} "
            f"(threshold {threshold:.2%}); champion "
            f"{'significantly above it' if champion_fine else 'not shown above it'}"
        ),
    )


def latency_quantile(counts: Counts, bounds: tuple[float, ...], q: float) -> float | None:
    """The q-quantile of a latency histogram, rounded up to its bucket's upper bound;
    None when it lies in the last (+Inf) bucket or there are no requests."""
    total = sum(counts.latency)
    if not total:
        return None
    needed = q * total
    seen = 0
    for i, n in enumerate(counts.latency):
        seen += n
        if seen >= needed:
            return bounds[i] if i < len(bounds) else None
    return None


def slower_than(counts: Counts, bounds: tuple[float, ...], seconds: float) -> int:
    """Requests certainly slower than ``seconds``: those in buckets lying wholly above it."""
    lows = (0.0, *bounds)
    return sum(n for low, n in zip(lows, counts.latency, strict=False) if low >= seconds)


def check_latency(evidence: Evidence, policy: Policy) -> Check:
    """How often the challenger is slower than max_latency_ratio x the champion's
    latency_quantile: at most 1 - latency_quantile of the time for a challenger that is
    no slower than the champion."""
    assert policy.max_latency_ratio is not None
    q, bounds = policy.latency_quantile, policy.latency_bounds
    allowed = 1 - q
    champion_q = latency_quantile(evidence.champion, bounds, q)
    if champion_q is None or evidence.champion.requests < policy.min_requests:
        return Check(
            "latency", Verdict.NO_DATA, None, allowed, None,
            lambda: "too few champion requests (or latencies past the last bucket) for a quantile",
        )  # fmt: skip
    cut = policy.max_latency_ratio * champion_q
    x = evidence.challenger
    slow = slower_than(x, bounds, cut)
    bound = lower_bound(slow, x.requests, policy.alpha)
    step_x = evidence.step_challenger
    estimate = slower_than(step_x, bounds, cut) / step_x.requests if step_x.requests else None
    return Check(
        "latency",
        _at_most(bound, estimate, allowed),
        estimate,
        allowed,
        bound,
        lambda: (
            f"{_pct(slow, x.requests)} of challenger requests slower than {cut:g}s "
            f"({policy.max_latency_ratio:g} x the champion's p{q * 100:g} {champion_q:g}s); "
            f"at least {bound:.2%} (allowed {allowed:.2%})"
        ),
    )


def check_shadow(evidence: Evidence, policy: Policy) -> Check:
    """Shadow agreement net of the champion's disagreement with itself."""
    assert policy.min_shadow_agreement is not None
    limit = policy.min_shadow_agreement
    s = evidence.shadow
    share = policy.alpha / 2 if policy.shadow_noise else policy.alpha
    mismatch_low = lower_bound(s.mismatched, s.compared, share)
    noise_high = 0.0
    noise_rate = 0.0
    if policy.shadow_noise:
        noise_high = upper_bound(s.noise_mismatched, s.noise_compared, share)
        noise_rate = s.noise_mismatched / s.noise_compared if s.noise_compared else 0.0
    best_agreement = 1 - (mismatch_low - noise_high)  # the most net agreement can be
    estimate = None
    if s.compared:
        estimate = 1 - max(0.0, s.mismatched / s.compared - noise_rate)
    if best_agreement < limit:
        verdict = Verdict.FAIL
    elif estimate is None or s.compared < MIN_SHADOW_SAMPLES:
        verdict = Verdict.NO_DATA
    else:
        verdict = Verdict.PASS if estimate >= limit else Verdict.INCONCLUSIVE
    return Check(
        "shadow_agreement",
        verdict,
        estimate,
        limit,
        best_agreement,
        lambda: (
            f"{_pct(s.mismatched, s.compared)} of {s.compared} shadow answers disagree"
            + (
                f", the champion with itself {_pct(s.noise_mismatched, s.noise_compared)}"
                if policy.shadow_noise
                else ""
            )
            + f"; net agreement at most {best_agreement:.2%} (limit {limit:.2%})"
        ),
    )


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.2%} ({part}/{whole})" if whole else "n/a (0 requests)"


def checks(evidence: Evidence, policy: Policy) -> tuple[Check, ...]:
    champion_high, challenger_low = failure_bounds(evidence, policy)
    found = [
        check_error_rate(evidence, policy, champion_high, challenger_low),
        check_success_rate(evidence, policy, champion_high, challenger_low),
    ]
    if policy.max_latency_ratio is not None:
        found.append(check_latency(evidence, policy))
    if policy.min_shadow_agreement is not None:
        found.append(check_shadow(evidence, policy))
    return tuple(found)


# --- the decision ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: Reason
    message: str
    checks: tuple[Check, ...] = ()
    evidence: Evidence | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "reason": self.reason.value,
            "message": self.message,
            "checks": [c.as_dict() for c in self.checks],
            "evidence": self.evidence.as_dict() if self.evidence is not None else None,
        }


def decide(evidence: Evidence, policy: Policy, now: float) -> Decision:
    """What to do with a progressing or holding canary, given what it has seen."""
    found = checks(evidence, policy)

    def decision(action: Action, reason: Reason, message: str) -> Decision:
        return Decision(action, reason, message, found, evidence)

    failed = [c for c in found if c.verdict is Verdict.FAIL]
    if failed:
        return decision(Action.ROLLBACK, _REASON_OF[failed[0].name], failed[0].detail)
    elapsed = now - evidence.step_started
    if elapsed < policy.step_interval_seconds:
        left = policy.step_interval_seconds - elapsed
        return decision(Action.HOLD, Reason.STEP_IN_PROGRESS, f"step runs {left:.0f}s more")
    fewest = evidence.fewest
    missing = [c for c in found if c.verdict is Verdict.NO_DATA]
    if fewest < policy.min_requests or missing:
        what = (
            f"{fewest} of {policy.min_requests} requests in the step for the quieter variant"
            if fewest < policy.min_requests
            else "; ".join(c.detail for c in missing)
        )
        return decision(Action.HOLD, Reason.INSUFFICIENT_DATA, what)
    unsure = [c for c in found if c.verdict is Verdict.INCONCLUSIVE]
    if unsure:
        if elapsed >= policy.step_limit_seconds and policy.on_inconclusive == "rollback":
            return decision(
                Action.ROLLBACK,
                Reason.INCONCLUSIVE_TOO_LONG,
                f"inconclusive for {elapsed:.0f}s: {unsure[0].detail}",
            )
        return decision(Action.HOLD, Reason.INCONCLUSIVE, unsure[0].detail)
    return decision(Action.ADVANCE, Reason.HEALTHY, "every check passed over the step")


# --- the state machine -------------------------------------------------------------------


class NotAllowed(Exception):
    """A command the canary's state does not allow (the admin API's 409)."""


@dataclass(frozen=True, slots=True)
class Status:
    """A canary's state, as kept in the state store and shown by the admin API."""

    state: State = State.IDLE
    canary_id: str = ""
    step: int = -1  # index into Policy.steps; -1 when idle
    weight: float = 0.0
    step_started: float = 0.0
    started_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    challenger: str | None = None  # the backend the canary is about
    last_decision: dict[str, Any] | None = None
    history: tuple[dict[str, Any], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "canary_id": self.canary_id,
            "step": self.step,
            "weight": self.weight,
            "step_started": self.step_started,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "challenger": self.challenger,
            "last_decision": self.last_decision,
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Status:
        return cls(
            state=State(value.get("state", "idle")),
            canary_id=str(value.get("canary_id", "")),
            step=int(value.get("step", -1)),
            weight=float(value.get("weight", 0.0)),
            step_started=float(value.get("step_started", 0.0)),
            started_at=float(value.get("started_at", 0.0)),
            updated_at=float(value.get("updated_at", 0.0)),
            reason=str(value.get("reason", "")),
            challenger=value.get("challenger"),
            last_decision=value.get("last_decision"),
            history=tuple(value.get("history", ())),
        )


def _remember(
    history: Iterable[dict[str, Any]], entry: dict[str, Any], size: int = HISTORY_SIZE
) -> tuple[dict[str, Any], ...]:
    """The history with ``entry`` added: the same action and reason as the last entry
    (a hold every few seconds) counts up that entry instead of adding one."""
    kept = list(history)
    if kept and all(kept[-1].get(k) == entry.get(k) for k in ("action", "reason", "step")):
        last = dict(kept[-1])
        last["count"] = int(last.get("count", 1)) + 1
        last["last_at"] = entry["at"]
        kept[-1] = last
    else:
        kept.append({**entry, "count": 1})
    return tuple(kept[-size:])


def _entry(
    action: Action, reason: Reason, message: str, status: Status, now: float
) -> dict[str, Any]:
    return {
        "at": now,
        "action": action.value,
        "reason": reason.value,
        "message": message,
        "step": status.step,
        "weight": status.weight,
    }


def _moved(
    status: Status,
    now: float,
    action: Action,
    reason: Reason,
    message: str,
    decision: Decision | None = None,
    **changes: Any,
) -> Status:
    """``status`` after a move: its history gains an entry. ``last_decision`` is the
    controller's latest decision with the checks and evidence it rested on (the move it
    led to named as applied, e.g. a promotion for an advance past the last step); an
    operator's command leaves it, so a paused canary still shows why it was holding."""
    moved = replace(status, updated_at=now, reason=reason.value, **changes)
    entry = _entry(action, reason, message, moved, now)
    last = moved.last_decision
    if decision is not None:
        last = {**decision.as_dict(), **entry, "explanation": decision.message}
    return replace(moved, last_decision=last, history=_remember(status.history, entry))


def start(
    status: Status, policy: Policy, now: float, canary_id: str, challenger: str | None
) -> Status:
    """A new canary at its first step (from idle, or after a promotion or rollback; a
    running one is restarted only by a change of challenger, see ``restart``)."""
    if status.state in ACTIVE:
        raise NotAllowed(f"a canary is already {status.state.value}")
    return restart(status, policy, now, canary_id, challenger, Reason.STARTED)


def restart(
    status: Status,
    policy: Policy,
    now: float,
    canary_id: str,
    challenger: str | None,
    reason: Reason,
) -> Status:
    weight = policy.steps[0]
    return _moved(
        status, now, Action.START, reason, f"step 1 of {len(policy.steps)} at weight {weight:g}",
        state=State.PROGRESSING, canary_id=canary_id, step=0, weight=weight,
        step_started=now, started_at=now, challenger=challenger, last_decision=None,
    )  # fmt: skip


def apply(status: Status, decision: Decision, policy: Policy, now: float) -> Status:
    """The status after the controller's ``decision`` on an evaluated canary."""
    if status.state not in EVALUATED:
        raise NotAllowed(f"a {status.state.value} canary is not evaluated")
    action, reason = decision.action, decision.reason
    if action is Action.ROLLBACK:
        return _moved(
            status, now, action, reason, decision.message, decision,
            state=State.ROLLED_BACK, weight=0.0,
        )  # fmt: skip
    if action is Action.HOLD:
        state = State.PROGRESSING if reason is Reason.STEP_IN_PROGRESS else State.HOLDING
        return _moved(status, now, action, reason, decision.message, decision, state=state)
    if action is Action.ADVANCE:
        last = len(policy.steps) - 1
        if status.step >= last:
            if policy.auto_promote:
                return _moved(
                    status, now, Action.PROMOTE, Reason.LAST_STEP_PASSED, decision.message,
                    decision, state=State.PROMOTED, weight=0.0,
                )  # fmt: skip
            return _moved(
                status, now, action, Reason.LAST_STEP_PASSED, decision.message, decision,
                state=State.AWAITING_PROMOTION,
            )  # fmt: skip
        step = status.step + 1
        weight = policy.steps[step]
        return _moved(
            status, now, action, reason, f"step {step + 1} of {last + 1} at weight {weight:g}",
            decision, state=State.PROGRESSING, step=step, weight=weight, step_started=now,
        )  # fmt: skip
    raise ValueError(f"not a decision the controller takes: {action}")


# What each operator command may be given in, and what it leads to.
_COMMANDS: dict[Action, frozenset[State]] = {
    Action.PAUSE: frozenset({State.PROGRESSING, State.HOLDING, State.AWAITING_PROMOTION}),
    Action.RESUME: frozenset({State.PAUSED}),
    Action.PROMOTE: frozenset(ACTIVE),
    Action.ROLLBACK: frozenset(ACTIVE | {State.PROMOTED}),
}


def command(status: Status, action: Action, now: float) -> Status:
    """An operator's pause, resume, promote or rollback. Raises NotAllowed when the state
    does not allow it."""
    allowed = _COMMANDS.get(action)
    if allowed is None:
        raise ValueError(f"not an operator command: {action}")
    if status.state not in allowed:
        raise NotAllowed(f"cannot {action.value} a canary that is {status.state.value}")
    message = f"{action.value} by an operator"
    if action is Action.PAUSE:
        return _moved(status, now, action, Reason.OPERATOR, message, state=State.PAUSED)
    if action is Action.RESUME:
        # The step starts over: its interval counts from now, not from before the pause.
        return _moved(
            status, now, action, Reason.OPERATOR, message,
            state=State.PROGRESSING, step_started=now,
        )  # fmt: skip
    if action is Action.PROMOTE:
        return _moved(
            status, now, action, Reason.OPERATOR, message, state=State.PROMOTED, weight=0.0
        )
    return _moved(
        status, now, action, Reason.OPERATOR, message, state=State.ROLLED_BACK, weight=0.0
    )
