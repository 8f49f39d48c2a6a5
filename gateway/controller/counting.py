"""What a canary counts, per process: nothing per request beyond what the Record step
counts anyway.

Each (route, variant) record of ``gateway.metrics`` keeps its answers, failures and
latency buckets since the gateway started. About once a second every process takes
what is new since it last looked, adds it to its own totals for the canary's current
step, and writes those totals to the state store under a key of its own; the leader
sums every process's records (workers and replicas alike). Writing totals, not deltas,
makes a write that is retried or lost harmless: the next one carries everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.core.canary import Counts, ShadowCounts
from gateway.core.stats import ShadowOutcome, ShadowStats
from gateway.metrics import RouteMetrics
from gateway.runtime import RouteRuntime
from gateway.store import Entry


def counts_prefix(route: str, canary_id: str) -> str:
    return f"canary/{route}/counts/{canary_id}/"


def counts_key(route: str, canary_id: str, step: int, process: str) -> str:
    return f"{counts_prefix(route, canary_id)}{step:04d}/{process}"


@dataclass(slots=True)
class _Seen:
    """What one source had counted when last looked at (to take only what is new)."""

    source: object = None
    totals: tuple[Any, ...] = ()


def _metrics_totals(record: RouteMetrics) -> Counts:
    requests, failures, latency = record.totals()
    return Counts(requests, failures, latency)


def _shadow_totals(stats: ShadowStats) -> ShadowCounts:
    counts = stats.tally.counts
    return ShadowCounts(
        counts[ShadowOutcome.MATCH] + counts[ShadowOutcome.MISMATCH],
        counts[ShadowOutcome.MISMATCH],
        stats.baseline.noise_comparisons,
        stats.noise_mismatches,
    )


def _minus(now: Counts, then: Counts) -> Counts:
    latency = now.latency
    if then.latency:
        latency = tuple(a - b for a, b in zip(now.latency, then.latency, strict=True))
    return Counts(now.requests - then.requests, now.failures - then.failures, latency)


def _shadow_minus(now: ShadowCounts, then: ShadowCounts) -> ShadowCounts:
    return ShadowCounts(
        now.compared - then.compared,
        now.mismatched - then.mismatched,
        now.noise_compared - then.noise_compared,
        now.noise_mismatched - then.noise_mismatched,
    )


@dataclass(slots=True)
class StepTotals:
    """One process's counts for one step of one canary."""

    champion: Counts = field(default_factory=Counts)
    challenger: Counts = field(default_factory=Counts)
    shadow: ShadowCounts = field(default_factory=ShadowCounts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion.as_dict(),
            "challenger": self.challenger.as_dict(),
            "shadow": self.shadow.as_dict(),
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StepTotals:
        return cls(
            Counts.from_dict(value.get("champion", {})),
            Counts.from_dict(value.get("challenger", {})),
            ShadowCounts.from_dict(value.get("shadow", {})),
        )

    def __add__(self, other: StepTotals) -> StepTotals:
        return StepTotals(
            self.champion + other.champion,
            self.challenger + other.challenger,
            self.shadow + other.shadow,
        )


@dataclass(slots=True)
class StepCounter:
    """One route's counting in this process: new counts go to the current step."""

    step_key: tuple[str, int] | None = None  # (canary id, step) counted into, if any
    totals: StepTotals = field(default_factory=StepTotals)
    written: StepTotals | None = None  # the totals the store has
    _champion: _Seen = field(default_factory=_Seen)
    _challenger: _Seen = field(default_factory=_Seen)
    _shadow: _Seen = field(default_factory=_Seen)

    def count_into(self, step_key: tuple[str, int] | None) -> None:
        """Count what comes from now on into this step (None: into nothing)."""
        if step_key != self.step_key:
            self.step_key = step_key
            self.totals = StepTotals()
            self.written = None

    def take(self, route: RouteRuntime) -> None:
        """Add what the route's records counted since the last look."""
        champion = self._new(self._champion, route.champion_lane.metrics, _metrics_totals)
        challenger = self._new(self._challenger, route.challenger_lane.metrics, _metrics_totals)
        shadow = ShadowCounts()
        if route.shadow is not None:
            stats = route.shadow.stats
            now = _shadow_totals(stats)
            seen = self._shadow
            if seen.source is stats:
                shadow = _shadow_minus(now, seen.totals[0])
            seen.source, seen.totals = stats, (now,)
        if self.step_key is not None:
            self.totals = self.totals + StepTotals(champion, challenger, shadow)

    @staticmethod
    def _new(seen: _Seen, record: RouteMetrics, read: Any) -> Counts:
        now: Counts = read(record)
        # A record seen for the first time (or a new one, after its route was removed
        # and added again) has nothing new yet: what it counted before is not this step's.
        new = _minus(now, seen.totals[0]) if seen.source is record else Counts()
        seen.source, seen.totals = record, (now,)
        return new

    @property
    def unwritten(self) -> bool:
        return self.step_key is not None and self.totals != self.written


def sum_steps(entries: Iterable[Entry]) -> dict[int, StepTotals]:
    """Every process's totals (the entries under ``counts_prefix``), summed per step."""
    steps: dict[int, StepTotals] = {}
    for entry in entries:
        step_text = entry.key.rsplit("/", 2)[-2]
        try:
            step = int(step_text)
        except ValueError:
            continue
        steps[step] = steps.get(step, StepTotals()) + StepTotals.from_dict(entry.value)
    return steps
