"""One route's shadow settings and statistics: which requests are mirrored, how answers
are compared, and the tallies. Built at config load and kept across reloads that leave
the route's shadow as it was."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ShadowConfig
from gateway.core.compare import CompareSettings, Comparison, TextMatch, VectorMatch
from gateway.core.extract import Protocol
from gateway.core.split import bucket_of, threshold
from gateway.core.stats import ShadowOutcome, ShadowStats, StatsSettings
from gateway.metrics import Metrics
from gateway.upstream import BackendPool

SAFE_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})
ALL_METHODS = SAFE_METHODS | {"PUT", "PATCH", "DELETE"}


def compare_settings(config: ShadowConfig) -> CompareSettings:
    c = config.compare
    return CompareSettings(
        protocol=Protocol(c.protocol),
        ignore=tuple(c.ignore),
        abs_tol=c.abs_tol,
        rel_tol=c.rel_tol,
        vector_match=VectorMatch(c.vector_match),
        min_cosine=c.min_cosine,
        top_k=c.top_k,
        text_match=TextMatch(c.text_match),
    )


def stats_settings(config: ShadowConfig) -> StatsSettings:
    r, b = config.report, config.baseline
    return StatsSettings(
        max_fields=r.max_fields,
        latency_window=r.latency_window,
        last_mismatches=r.last_mismatches,
        max_value_chars=r.max_value_chars,
        confidence=b.confidence,
        min_samples=b.min_samples,
        min_noise_samples=b.min_noise_samples if b.sample_rate > 0 else 0,
        min_net_rate=b.min_net_rate,
    )


@dataclass(slots=True)
class ShadowPolicy:
    """One route's shadow settings and state, built at config load.

    A reload that leaves the route's shadow section, its target and its champion as they
    were keeps this object, and with it the statistics gathered so far."""

    route: str
    config: ShadowConfig
    target: BackendPool
    champion: BackendPool
    metrics: Metrics
    rng: random.Random = field(default_factory=random.Random)
    stats: ShadowStats = field(init=False)
    settings: CompareSettings = field(init=False)
    timeout_seconds: float = field(init=False)
    methods: frozenset[str] = field(init=False)
    cut: int = field(init=False)
    in_flight: int = 0
    _outcomes: dict[ShadowOutcome, Any] = field(init=False)
    _latency_delta: Any = field(init=False)

    def __post_init__(self) -> None:
        self.stats = ShadowStats(stats_settings(self.config))
        self.settings = compare_settings(self.config)
        self.timeout_seconds = self.config.timeout_seconds or self.target.timeout_seconds
        self.methods = ALL_METHODS if self.config.allow_side_effects else SAFE_METHODS
        self.cut = threshold(self.config.sample_rate)
        self._outcomes = {
            o: self.metrics.shadow_requests.labels(self.route, o.value) for o in ShadowOutcome
        }
        self._latency_delta = self.metrics.shadow_latency_delta.labels(self.route)

    def samples(self, method: str, key: str) -> bool:
        """Whether this champion-answered request is mirrored."""
        if self.cut <= 0 or method not in self.methods:
            return False
        if self.config.sampling == "key":
            # A salt of its own: with the split's buckets, the sampled keys would be the
            # challenger's keys, which are never mirrored.
            return bucket_of(key, "shadow:") < self.cut
        return self.rng.random() * 10_000 < self.cut

    def compared(
        self, request_id: str, comparison: Comparison, latency_delta: float
    ) -> ShadowOutcome:
        """Record a compared answer; returns its outcome (match or mismatch)."""
        outcome = self.stats.record(request_id, comparison, latency_delta)
        self._outcomes[outcome].inc()
        self._latency_delta.observe(latency_delta)
        return outcome

    def fail(self, outcome: ShadowOutcome) -> None:
        """Record a mirrored request that produced nothing to compare."""
        self.stats.record_failure(outcome)
        self._outcomes[outcome].inc()

    def same_as(self, config: ShadowConfig, target: BackendPool, champion: BackendPool) -> bool:
        """Whether a reload that asks for this shadow can keep this policy."""
        return self.config == config and self.target is target and self.champion is champion
