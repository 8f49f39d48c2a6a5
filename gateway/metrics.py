"""Every Prometheus metric of the gateway, defined in one place (DESIGN section 4).

Each gateway instance owns a ``CollectorRegistry`` so that several gateways can live in
one process (tests, ``gateway demo``). Label children used on the hot path are bound
once per route and variant, so recording a request is a few attribute lookups.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics import MetricWrapperBase

from gateway.core.split import Variant

# Model servers answer in milliseconds (classifiers) to minutes (long LLM generations).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
DELTA_BUCKETS = (
    -10.0, -2.5, -1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, 0.0,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)  # fmt: skip

CANARY_STATES = ("idle", "progressing", "paused", "promoted", "rolled_back")
NO_ROUTE = ""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered by the gateway, by route, variant and status code.",
            ["route", "variant", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the answer.",
            ["route", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being proxied right now.",
            ["route", "variant"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failures talking to a backend, by reason.",
            ["route", "variant", "reason"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "gateway_shadow_requests_total",
            "Mirrored requests by comparison outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.shadow_latency_delta = Histogram(
            "gateway_shadow_latency_delta_seconds",
            "Shadow latency minus the latency of the answer the client got.",
            ["route"],
            buckets=DELTA_BUCKETS,
            registry=r,
        )
        self.challenger_weight = Gauge(
            "gateway_challenger_weight",
            "Share of traffic the challenger gets.",
            ["route"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.canary_state = Gauge(
            "gateway_canary_state",
            "1 on the canary's current state, 0 on the others.",
            ["route", "state"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.canary_decisions = Counter(
            "gateway_canary_decisions_total",
            "Canary controller decisions.",
            ["route", "decision"],
            registry=r,
        )
        self.trace_writes = Counter(
            "gateway_trace_writes_total",
            "Trace window writes to Redis, by outcome.",
            ["outcome"],
            registry=r,
        )

    def route(self, route: str, variant: Variant) -> RouteMetrics:
        return RouteMetrics(self, route, variant)

    def unrouted(self) -> RouteMetrics:
        """Metrics for answers given before a route (or a variant) was chosen."""
        return RouteMetrics(self, NO_ROUTE, None)

    def render(self) -> bytes:
        if multiprocess_dir() is not None:
            # Under --workers each process writes its values to files; any worker
            # answers a scrape with the sum over all of them.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class RouteMetrics:
    """Label children for one (route, variant), bound once."""

    __slots__ = ("_codes", "_errors", "_metrics", "_route", "_variant", "duration", "in_flight")

    def __init__(self, metrics: Metrics, route: str, variant: Variant | None) -> None:
        self._metrics = metrics
        self._route = route
        self._variant = variant.value if variant is not None else ""
        self.duration = metrics.duration.labels(route, self._variant)
        self.in_flight = metrics.in_flight.labels(route, self._variant)
        # Children per status code / error reason, created on first use: both sets are
        # small and bounded (HTTP codes, a fixed list of reasons).
        self._codes: dict[int, MetricWrapperBase] = {}
        self._errors: dict[str, MetricWrapperBase] = {}

    def count(self, code: int, seconds: float) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._metrics.requests.labels(
                self._route, self._variant, str(code)
            )
        child.inc()  # type: ignore[attr-defined]
        self.duration.observe(seconds)

    def upstream_error(self, reason: str) -> None:
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = self._metrics.upstream_errors.labels(
                self._route, self._variant, reason
            )
        child.inc()  # type: ignore[attr-defined]
