"""Streaming statistics of shadow comparisons: pure, bounded, no clock.

- :class:`NoiseBaseline` counts per field how often champion-vs-shadow comparisons
  mismatch, and how often champion-vs-champion comparisons do (Diffy's idea): a field
  only counts as a *real* difference where the first clearly exceeds the second, which is
  what keeps sampling temperature, IDs and timestamps out of the report.
- :class:`SlidingQuantiles` keeps the last N latency deltas (shadow minus champion) in a
  ring: O(1) insertion, bounded memory; quantiles are computed when asked (rarely: the
  admin API).
- :class:`OutcomeTally` counts outcomes and gives the agreement rate, with a confidence
  bound the canary can gate on.
- :class:`MismatchRing` keeps the last N mismatching fields with truncated values.
- :class:`ShadowStats` bundles them for one route; :meth:`ShadowStats.snapshot` is what the
  admin API serialises (``dataclasses.asdict`` of it is plain JSON-ready data).

Deciding that a field is a real difference
------------------------------------------
Point estimates flag too early: 1 mismatch in 3 samples against 0 in 3 noise samples is a
33 % "net" rate, and it means nothing. So the decision uses one-sided Wilson score bounds
at ``confidence`` (default 0.99, z = 2.326): a field is DIFFERENT when

    wilson_lower(raw mismatches) - wilson_upper(noise mismatches) > min_net_rate

and at least ``min_samples`` comparisons (and ``min_noise_samples`` noise comparisons in
all) were seen. Two separated one-sided 99 % bounds make a false flag for a field that is
only noise very unlikely (under 1 % per field and check), and Wilson bounds behave at rates
of 0 and 1, where the normal approximation collapses. A field that never showed up in a
champion-vs-champion comparison (the champion doesn't produce it) has no noise: its noise
bound is 0. ``net_mismatch_rate`` is the point estimate ``max(0, raw - noise)`` for the
report.

Not being DIFFERENT is not evidence of being noise: with few samples the bounds are too
wide to separate anything. A field is WITHIN_NOISE only when each rate lies within the
other's bound (give or take ``min_net_rate``): the raw rate at most the noise's upper bound,
and the noise rate at least the raw rate's lower bound. Otherwise it is INCONCLUSIVE (4
mismatches in 12 against 0 in 5 noise comparisons, say): more samples will tell.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import NormalDist

from gateway.core.compare import Comparison, FieldResult, Missing, Outcome
from gateway.core.extract import Empty, Tensor, Value


class ShadowOutcome(enum.StrEnum):
    """Label values of ``gateway_shadow_requests_total{outcome}``."""

    MATCH = "match"
    MISMATCH = "mismatch"
    ERROR = "error"
    TIMEOUT = "timeout"
    DROPPED = "dropped"


_OUTCOME_OF = {Outcome.MATCH: ShadowOutcome.MATCH, Outcome.MISMATCH: ShadowOutcome.MISMATCH}


class FieldVerdict(enum.StrEnum):
    AGREE = "agree"  # never mismatched
    INSUFFICIENT = "insufficient"  # mismatched, but too few samples to say
    WITHIN_NOISE = "within_noise"  # mismatches explained by champion-vs-champion noise
    INCONCLUSIVE = "inconclusive"  # neither a real difference nor noise, so far
    DIFFERENT = "different"  # a real difference


def z_for(confidence: float) -> float:
    """z of a one-sided bound at ``confidence`` (0.99 -> 2.326)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence: must be in [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score bounds of a binomial proportion; (0, 1) with no trials."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At p_hat = 0 or 1 one bound is exactly 0 or 1; rounding would leave it a hair inside.
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


# --------------------------------------------------------------------------- noise baseline


class _Counts:
    __slots__ = ("compared", "mismatched", "noise_compared", "noise_mismatched")

    def __init__(self) -> None:
        self.compared = self.mismatched = self.noise_compared = self.noise_mismatched = 0


@dataclass(frozen=True, slots=True)
class FieldReport:
    field: str
    compared: int
    mismatched: int
    noise_compared: int
    noise_mismatched: int
    raw_rate: float
    noise_rate: float
    net_rate: float
    verdict: FieldVerdict

    @property
    def real(self) -> bool:
        return self.verdict is FieldVerdict.DIFFERENT


class NoiseBaseline:
    """Per-field mismatch counts, raw (champion vs shadow) and noise (champion vs champion).

    At most ``max_fields`` distinct fields are tracked, first come first served (the real
    content fields appear in the first answers); observations of fields beyond the cap are
    counted in ``overflow`` instead. ``min_noise_samples=0`` means no baseline is
    configured: noise rates are then 0 and verdicts rest on the raw rates alone.
    """

    def __init__(
        self,
        *,
        max_fields: int = 256,
        confidence: float = 0.99,
        min_samples: int = 20,
        min_noise_samples: int = 0,
        min_net_rate: float = 0.0,
    ) -> None:
        if max_fields < 1 or min_samples < 1 or min_noise_samples < 0:
            raise ValueError("max_fields and min_samples must be >= 1, min_noise_samples >= 0")
        if not 0.0 <= min_net_rate < 1.0:
            raise ValueError(f"min_net_rate: must be in [0, 1), got {min_net_rate}")
        self.max_fields = max_fields
        self.z = z_for(confidence)
        self.min_samples = min_samples
        self.min_noise_samples = min_noise_samples
        self.min_net_rate = min_net_rate
        self.comparisons = 0
        self.noise_comparisons = 0
        self.overflow = 0
        self._fields: dict[str, _Counts] = {}

    def observe(self, comparison: Comparison) -> None:
        """A champion-vs-shadow comparison."""
        self.comparisons += 1
        for result in comparison.fields:
            counts = self._counts(result.path)
            if counts is not None:
                counts.compared += 1
                counts.mismatched += not result.matched

    def observe_noise(self, comparison: Comparison) -> None:
        """A champion-vs-champion comparison of the same request."""
        self.noise_comparisons += 1
        for result in comparison.fields:
            counts = self._counts(result.path)
            if counts is not None:
                counts.noise_compared += 1
                counts.noise_mismatched += not result.matched

    def _counts(self, path: str) -> _Counts | None:
        counts = self._fields.get(path)
        if counts is None:
            if len(self._fields) >= self.max_fields:
                self.overflow += 1
                return None
            counts = self._fields[path] = _Counts()
        return counts

    def fields(self) -> tuple[str, ...]:
        return tuple(self._fields)

    def net_mismatch_rate(self, field: str) -> float:
        report = self.report(field)
        return 0.0 if report is None else report.net_rate

    def report(self, field: str) -> FieldReport | None:
        counts = self._fields.get(field)
        return None if counts is None else self._report(field, counts)

    def reports(self) -> tuple[FieldReport, ...]:
        """Every tracked field, biggest net mismatch rate first."""
        reports = [self._report(f, c) for f, c in self._fields.items()]
        return tuple(sorted(reports, key=lambda r: (-r.net_rate, -r.raw_rate, r.field)))

    def real_differences(self) -> tuple[str, ...]:
        return tuple(r.field for r in self.reports() if r.real)

    def _report(self, field: str, c: _Counts) -> FieldReport:
        raw = c.mismatched / c.compared if c.compared else 0.0
        noise = c.noise_mismatched / c.noise_compared if c.noise_compared else 0.0
        return FieldReport(
            field=field,
            compared=c.compared,
            mismatched=c.mismatched,
            noise_compared=c.noise_compared,
            noise_mismatched=c.noise_mismatched,
            raw_rate=raw,
            noise_rate=noise,
            net_rate=max(0.0, raw - noise),
            verdict=self._verdict(c),
        )

    def _verdict(self, c: _Counts) -> FieldVerdict:
        if c.mismatched == 0:
            return FieldVerdict.AGREE
        if c.compared < self.min_samples or self.noise_comparisons < self.min_noise_samples:
            return FieldVerdict.INSUFFICIENT
        raw_lower, _ = wilson_interval(c.mismatched, c.compared, self.z)
        # No noise comparison ever contained the field: the champion doesn't produce it.
        noise_upper = (
            wilson_interval(c.noise_mismatched, c.noise_compared, self.z)[1]
            if c.noise_compared
            else 0.0
        )
        margin = self.min_net_rate
        if raw_lower - noise_upper > margin:
            return FieldVerdict.DIFFERENT
        raw = c.mismatched / c.compared
        noise = c.noise_mismatched / c.noise_compared if c.noise_compared else 0.0
        if raw <= noise_upper + margin and noise >= raw_lower - margin:
            return FieldVerdict.WITHIN_NOISE
        return FieldVerdict.INCONCLUSIVE


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int  # deltas in the window
    p50: float | None
    p90: float | None
    p99: float | None


class SlidingQuantiles:
    """Quantiles of the last ``capacity`` values; O(1) insertion into a fixed ring."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.capacity = capacity
        self.total = 0  # values ever added
        self.rejected = 0  # non-finite values, which would poison every quantile
        self._values: list[float] = []
        self._next = 0

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            self.rejected += 1
            return
        self.total += 1
        if len(self._values) < self.capacity:
            self._values.append(value)
        else:
            self._values[self._next] = value
        self._next = (self._next + 1) % self.capacity

    def __len__(self) -> int:
        return len(self._values)

    def quantile(self, q: float) -> float | None:
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Iterable[float]) -> tuple[float | None, ...]:
        """Linear interpolation between order statistics (Hyndman-Fan type 7, numpy's
        default); None while the window is empty."""
        ordered = sorted(self._values)
        return tuple(_type7(ordered, q) for q in qs)

    def summary(self) -> LatencySummary:
        p50, p90, p99 = self.quantiles((0.5, 0.9, 0.99))
        return LatencySummary(len(self._values), p50, p90, p99)


def _type7(ordered: list[float], q: float) -> float | None:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not ordered:
        return None
    h = (len(ordered) - 1) * q
    low = math.floor(h)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (h - low) * (ordered[high] - ordered[low])


# --------------------------------------------------------------------------- outcomes


class OutcomeTally:
    def __init__(self) -> None:
        self.counts: dict[ShadowOutcome, int] = dict.fromkeys(ShadowOutcome, 0)

    def add(self, outcome: ShadowOutcome) -> None:
        self.counts[outcome] += 1

    @property
    def compared(self) -> int:
        return self.counts[ShadowOutcome.MATCH] + self.counts[ShadowOutcome.MISMATCH]

    @property
    def agreement_rate(self) -> float | None:
        """Matches over compared samples; errors, timeouts and drops aren't comparisons."""
        compared = self.compared
        return self.counts[ShadowOutcome.MATCH] / compared if compared else None

    def agreement_lower_bound(self, confidence: float = 0.99) -> float | None:
        """One-sided Wilson lower bound of the agreement rate, for gating a canary."""
        compared = self.compared
        if not compared:
            return None
        return wilson_interval(self.counts[ShadowOutcome.MATCH], compared, z_for(confidence))[0]


# --------------------------------------------------------------------------- mismatches

ELLIPSIS = "…"


def truncate(text: str, limit: int) -> str:
    """At most ``limit`` characters, and always encodable as UTF-8 (the report is JSON)."""
    cut = text if len(text) <= limit else text[: max(0, limit - 1)] + ELLIPSIS
    # Lone surrogates (from the standard-library JSON fallback) would break orjson.dumps.
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def render_value(value: Value | Missing, limit: int) -> str:
    """A short human-readable form; never renders more of a tensor than fits."""
    if isinstance(value, Missing):
        return "<missing>"
    if isinstance(value, Tensor):
        return _render_tensor(value, limit)
    if isinstance(value, bytes):
        return truncate(value[: limit * 4].decode("utf-8", "backslashreplace"), limit)
    if isinstance(value, Empty):
        return value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return truncate(value if isinstance(value, str) else repr(value), limit)


def _render_tensor(tensor: Tensor, limit: int) -> str:
    text = f"shape={list(tensor.shape)} ["
    for i, x in enumerate(tensor.values):
        if len(text) > limit:  # no closing bracket: truncate() marks the cut
            break
        text += (", " if i else "") + repr(x)
    else:
        text += "]"
    return truncate(text, limit)


@dataclass(frozen=True, slots=True)
class MismatchRecord:
    request_id: str
    field: str
    reason: str
    champion: str
    shadow: str


class MismatchRing:
    """The last ``capacity`` mismatching fields, values truncated to ``max_chars``.

    One answer contributes at most ``max_fields_per_answer`` records, so a single answer
    that differs everywhere can't flush the whole history. Small values are kept as they
    are and rendered only when the records are read (most are overwritten unread); a
    large one is rendered at once, so the ring never holds on to a big tensor or text.
    """

    def __init__(
        self, capacity: int = 50, max_chars: int = 256, max_fields_per_answer: int = 8
    ) -> None:
        if capacity < 1 or max_chars < 8 or max_fields_per_answer < 1:
            raise ValueError("capacity and max_fields_per_answer must be >= 1, max_chars >= 8")
        self.max_chars = max_chars
        self.max_fields_per_answer = max_fields_per_answer
        self._records: deque[MismatchRecord | tuple[str, FieldResult]] = deque(maxlen=capacity)

    def add(self, request_id: str, comparison: Comparison) -> None:
        if len(request_id) > self.max_chars:
            request_id = truncate(request_id, self.max_chars)
        for result in comparison.mismatches[: self.max_fields_per_answer]:
            if _small(result.champion, self.max_chars) and _small(result.shadow, self.max_chars):
                self._records.append((request_id, result))
            else:
                self._records.append(self._render(request_id, result))

    def records(self) -> tuple[MismatchRecord, ...]:
        """Oldest first."""
        return tuple(
            r if isinstance(r, MismatchRecord) else self._render(*r) for r in self._records
        )

    def _render(self, request_id: str, result: FieldResult) -> MismatchRecord:
        return MismatchRecord(
            request_id=truncate(request_id, self.max_chars),
            field=truncate(result.path, self.max_chars),
            reason=result.reason.value,
            champion=render_value(result.champion, self.max_chars),
            shadow=render_value(result.shadow, self.max_chars),
        )


def _small(value: Value | Missing, max_chars: int) -> bool:
    """Cheap to keep until rendered: at most a few kilobytes."""
    if isinstance(value, Tensor):
        return len(value.values) <= 64
    if isinstance(value, str | bytes):
        return len(value) <= 4 * max_chars
    return True


# --------------------------------------------------------------------------- per route


@dataclass(frozen=True, slots=True)
class StatsSettings:
    max_fields: int = 256
    latency_window: int = 1024
    last_mismatches: int = 50
    max_value_chars: int = 256
    max_fields_per_mismatch: int = 8
    confidence: float = 0.99
    min_samples: int = 20
    min_noise_samples: int = 0  # 0: no noise baseline configured
    min_net_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class ShadowReport:
    outcomes: dict[str, int]
    agreement_rate: float | None
    agreement_lower_bound: float | None
    noise_comparisons: int
    fields: tuple[FieldReport, ...]
    real_differences: tuple[str, ...]
    fields_overflow: int
    latency_delta: LatencySummary
    last_mismatches: tuple[MismatchRecord, ...]


class ShadowStats:
    """Everything the shadow report of one route needs, fed by the shadow runner."""

    def __init__(self, settings: StatsSettings | None = None) -> None:
        s = settings or StatsSettings()
        self.settings = s
        self.tally = OutcomeTally()
        self.baseline = NoiseBaseline(
            max_fields=s.max_fields,
            confidence=s.confidence,
            min_samples=s.min_samples,
            min_noise_samples=s.min_noise_samples,
            min_net_rate=s.min_net_rate,
        )
        self.latency = SlidingQuantiles(s.latency_window)
        self.mismatches = MismatchRing(
            s.last_mismatches, s.max_value_chars, s.max_fields_per_mismatch
        )
        # Champion-vs-champion comparisons that disagreed anywhere: the noise a canary's
        # shadow gate subtracts.
        self.noise_mismatches = 0

    def record(
        self, request_id: str, comparison: Comparison, latency_delta: float | None = None
    ) -> ShadowOutcome:
        """A completed champion-vs-shadow comparison; returns the outcome to count."""
        outcome = _OUTCOME_OF[comparison.outcome]
        self.tally.add(outcome)
        self.baseline.observe(comparison)
        if latency_delta is not None:
            self.latency.add(latency_delta)
        if outcome is ShadowOutcome.MISMATCH:
            self.mismatches.add(request_id, comparison)
        return outcome

    def record_noise(self, comparison: Comparison) -> None:
        self.baseline.observe_noise(comparison)
        self.noise_mismatches += comparison.outcome is Outcome.MISMATCH

    def record_failure(self, outcome: ShadowOutcome) -> None:
        """A sample that produced no comparison (error, timeout, dropped)."""
        if outcome in (ShadowOutcome.MATCH, ShadowOutcome.MISMATCH):
            raise ValueError(f"{outcome} comes from a comparison: use record()")
        self.tally.add(outcome)

    def snapshot(self) -> ShadowReport:
        fields = self.baseline.reports()
        return ShadowReport(
            outcomes={o.value: n for o, n in self.tally.counts.items()},
            agreement_rate=self.tally.agreement_rate,
            agreement_lower_bound=self.tally.agreement_lower_bound(self.settings.confidence),
            noise_comparisons=self.baseline.noise_comparisons,
            fields=fields,
            real_differences=tuple(r.field for r in fields if r.real),
            fields_overflow=self.baseline.overflow,
            latency_delta=self.latency.summary(),
            last_mismatches=self.mismatches.records(),
        )
