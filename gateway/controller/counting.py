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


def segment_of(step: int, step_started: float) -> str:
    """What counts are kept under: a step, from the time it (re)started. A resumed step
    starts over with counts of its own; the earlier ones still count for the canary."""
    return f"{step:04d}-{round(step_started * 1000)}"


def counts_key(route: str, canary_id: str, segment: str, process: str) -> str:
    return f"{counts_prefix(route, canary_id)}{segment}/{process}"


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
    """One route's counting in this process: new counts go to the current segment."""

    step_key: tuple[str, str] | None = None  # (canary id, segment) counted into, if any
    # This process's totals per segment of the current canary, and what the store has:
    # going back to a segment (a status read that arrived late) finds its totals again.
    _totals: dict[tuple[str, str], StepTotals] = field(default_factory=dict)
    _written: dict[tuple[str, str], StepTotals] = field(default_factory=dict)
    _champion: _Seen = field(default_factory=_Seen)
    _challenger: _Seen = field(default_factory=_Seen)
    _shadow: _Seen = field(default_factory=_Seen)

    def count_into(self, step_key: tuple[str, str] | None) -> None:
        """Count what comes from now on into this segment (None: into nothing)."""
        if step_key is not None and self.step_key is not None and step_key[0] != self.step_key[0]:
            self._totals.clear()  # another canary: the last one's counts are its own
            self._written.clear()
        self.step_key = step_key

    @property
    def totals(self) -> StepTotals:
        if self.step_key is None:
            return StepTotals()
        return self._totals.get(self.step_key, StepTotals())

    def written(self) -> None:
        """The store has the current totals."""
        if self.step_key is not None:
            self._written[self.step_key] = self.totals

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
            self._totals[self.step_key] = self.totals + StepTotals(champion, challenger, shadow)

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
        key = self.step_key
        return key is not None and self._totals.get(key) != self._written.get(key)


def sum_segments(entries: Iterable[Entry]) -> dict[str, StepTotals]:
    """Every process's totals (the entries under ``counts_prefix``), summed per segment."""
    segments: dict[str, StepTotals] = {}
    for entry in entries:
        segment = entry.key.rsplit("/", 2)[-2]
        segments[segment] = segments.get(segment, StepTotals()) + StepTotals.from_dict(
            entry.value
        )
    return segments
