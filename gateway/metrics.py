"""Every Prometheus metric of the gateway, defined in one place (their names are a
published contract).

Each gateway instance owns a ``CollectorRegistry`` so that several gateways can live in
one process (tests, ``gateway demo``). Requests are counted per route and variant in
plain numbers (``RouteMetrics``) and moved into the Prometheus metrics at each scrape, so
recording a request is a few integer additions.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

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

# Under --workers, how often each worker moves its counts into the shared metric files.
SYNC_SECONDS = 1.0

NO_ROUTE = ""

# A counter's or histogram's *_created series (its creation time) would double the series
# a scrape returns, and dashboards never use it. (A process-wide setting of the library.)
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Each metric's name (the contract's), labels and help, and what its kind needs.
        route, route_variant = ["route"], ["route", "variant"]

        def counter(name: str, labels: list[str], help_text: str) -> Counter:
            return Counter(name, help_text, labels, registry=r)

        def gauge(
            name: str,
            labels: list[str],
            help_text: str,
            mode: Literal["livesum", "livemostrecent", "livemin"],
        ) -> Gauge:
            # Under --workers: summed over the workers (in flight), the latest value a
            # live worker wrote (state every worker shares, such as a weight), or the
            # least (an endpoint any worker holds out shows 0).
            return Gauge(name, help_text, labels, registry=r, multiprocess_mode=mode)

        def histogram(name: str, labels: list[str], help_text: str, buckets: Any) -> Histogram:
            return Histogram(name, help_text, labels, buckets=buckets, registry=r)

        # fmt: off
        self.requests = counter("gateway_requests_total", [*route_variant, "code"],
                                "Answers to clients, by route, variant and status code.")
        self.duration = histogram("gateway_request_duration_seconds", route_variant,
                                  "From a request's arrival to its answer's last byte.",
                                  LATENCY_BUCKETS)
        self.in_flight = gauge("gateway_requests_in_flight", route_variant,
                               "Requests being proxied right now.", "livesum")
        self.upstream_errors = counter("gateway_upstream_errors_total",
                                       [*route_variant, "reason"],
                                       "Failures talking to a backend, by reason.")
        self.shadow_requests = counter("gateway_shadow_requests_total", [*route, "outcome"],
                                       "Mirrored requests by comparison outcome.")
        self.shadow_latency_delta = histogram(
            "gateway_shadow_latency_delta_seconds", route,
            "Shadow latency minus the latency of the answer the client got.", DELTA_BUCKETS)
        self.challenger_weight = gauge("gateway_challenger_weight", route,
                                       "Share of traffic the challenger gets.", "livemostrecent")
        self.canary_state = gauge("gateway_canary_state", [*route, "state"],
                                  "1 on the canary's current state, 0 on the others.",
                                  "livemostrecent")
        self.canary_step = gauge("gateway_canary_step", route,
                                 "Index of the canary's current step, -1 when idle.",
                                 "livemostrecent")
        self.canary_decisions = counter("gateway_canary_decisions_total", [*route, "decision"],
                                        "Canary decisions, counted by the process that took them.")
        self.canary_webhook_calls = counter(
            "gateway_canary_webhook_calls_total", [*route, "event", "outcome"],
            "Canary webhook calls by event and outcome (ok, refused, error, timeout).")
        self.trace_writes = counter("gateway_trace_writes_total", ["outcome"],
                                    "Trace window writes to Redis, by outcome.")
        self.rejected = counter(
            "gateway_requests_rejected_total", ["reason"],
            "Requests and connections turned away at the edge, by reason (header_timeout, "
            "idle_timeout, body_timeout, too_large, headers_too_large, bad_request, "
            "overloaded, max_connections).")
        backend_endpoint = ["backend", "endpoint"]
        self.endpoint_healthy = gauge(
            "gateway_endpoint_healthy", backend_endpoint,
            "1 while an endpoint is in rotation, 0 while ejected or failing its health checks.",
            "livemin")
        self.endpoint_ejections = counter(
            "gateway_endpoint_ejections_total", [*backend_endpoint, "reason"],
            "Endpoints taken out of rotation, by reason (consecutive_failures, health_check).")
        self.upstream_connections = gauge(
            "gateway_upstream_connections", ["backend"],
            "Open connections to a backend's endpoints, in use or idle.", "livesum")
        self.registry_alias_moves = counter(
            "gateway_registry_alias_moves_total", ["model", "alias"],
            "Model registry alias moves and deletions, counted by the process that made them.")
        self.registry_alias_target = gauge(
            "gateway_registry_alias_target", ["model", "alias", "version"],
            "1 on the version each alias of a model that routes reference points at.",
            "livemostrecent")
        # fmt: on
        # Every metric with a backend label: what forget_backend clears.
        self._by_backend: tuple[Counter | Gauge, ...] = (
            self.endpoint_healthy, self.endpoint_ejections, self.upstream_connections,
        )  # fmt: skip
        # Called at every sync: gauges of state kept elsewhere (endpoint health, open
        # connections) are read when they are reported, not on the request path.
        self._samplers: list[Callable[[], None]] = []

        # Every metric with a route label: what forget_route clears.
        self._by_route: tuple[Counter | Gauge | Histogram, ...] = (
            self.requests, self.duration, self.in_flight, self.upstream_errors,
            self.shadow_requests, self.shadow_latency_delta, self.challenger_weight,
            self.canary_state, self.canary_decisions, self.canary_step,
            self.canary_webhook_calls,
        )  # fmt: skip
        for metric in self._by_route:
            check_series_layout(metric)
        # One record per (route, variant) while the route exists: a reload builds new
        # routes while requests on the old ones finish, and both count into it.
        self._routes: dict[tuple[str, str], RouteMetrics] = {}

    def route(self, route: str, variant: Variant) -> RouteMetrics:
        return self._record(route, variant.value)

    def unrouted(self) -> RouteMetrics:
        """Metrics for answers given before a route (or a variant) was chosen."""
        return self._record(NO_ROUTE, "")

    def _record(self, route: str, variant: str) -> RouteMetrics:
        record = self._routes.get((route, variant))
        if record is None:
            record = self._routes[(route, variant)] = RouteMetrics(self, route, variant)
        return record

    def forget_route(self, route: str) -> None:
        """A route the config no longer has: its records and every series labelled with
        it go, so /metrics does not report it forever. (Under --workers the series live
        in the worker's metric files, which prometheus_client cannot remove from.)"""
        self.forget_records([route])
        self.forget_series([route])

    def forget_records(self, routes: Collection[str]) -> None:
        """The first half of forgetting routes: their records stop being synced (quick,
        on the event loop, once no new request can reach them)."""
        gone = set(routes)
        for key in [key for key in self._routes if key[0] in gone]:
            del self._routes[key]

    def forget_series(self, routes: Collection[str]) -> None:
        """The second half: every series labelled with one of ``routes`` goes. One pass
        over each metric's series, whatever the number of routes (prometheus_client's
        remove_by_labels passes over all of them for each route: 10,000 routes took
        minutes). Thread-safe, as prometheus_client is: a reload runs it off the loop."""
        if multiprocess_dir() is not None or not routes:
            return
        gone = set(routes)
        for metric in self._by_route:
            _remove_series(metric, "route", gone)

    def reject(self, reason: str) -> None:
        """A request or connection turned away at the edge (rare: counted as it happens)."""
        self.rejected.labels(reason).inc()

    def endpoint_ejected(self, backend: str, endpoint: str, reason: str) -> None:
        """An endpoint was taken out of rotation (rare: counted as it happens)."""
        self.endpoint_ejections.labels(backend, endpoint, reason).inc()

    def add_sampler(self, sampler: Callable[[], None]) -> None:
        """``sampler`` sets gauges of state kept elsewhere at every sync."""
        self._samplers.append(sampler)

    def forget_backend(self, backend: str, endpoints: Collection[str] | None = None) -> None:
        """A backend the config no longer has, or (with ``endpoints``) endpoints it no
        longer lists: their series go, as ``forget_route``'s do."""
        if multiprocess_dir() is not None:
            return
        if endpoints is None:
            for metric in self._by_backend:
                metric.remove_by_labels({"backend": backend})
            return
        for endpoint in endpoints:
            for metric in (self.endpoint_healthy, self.endpoint_ejections):
                metric.remove_by_labels({"backend": backend, "endpoint": endpoint})

    def sync(self) -> None:
        """Move the per-route counts into the Prometheus metrics."""
        for _ in self._sync_slices():
            pass

    def render(self) -> bytes:
        self.sync()
        return b"".join(self._text())

    async def render_off_loop(self) -> list[bytes]:
        """``render`` for the admin listener, in pieces to be written one after another
        (joined, tens of megabytes would be copied in one step). The counts are synced
        on the event loop (the request path writes them there) a slice of routes at a
        time, and the text is made in a thread. With 20,000 routes that text is tens of
        megabytes and seconds of CPU, during which the proxy would otherwise answer
        nothing."""
        for _ in self._sync_slices():
            await asyncio.sleep(0)
        return await asyncio.to_thread(self._text)

    def _sync_slices(self, size: int = 1000) -> Iterator[None]:
        for sampler in self._samplers:
            sampler()
        # A copy: a reload builds new routes' records in a thread meanwhile.
        records = list(self._routes.values())
        for start in range(0, len(records), size):
            for record in records[start : start + size]:
                record.sync()
            yield

    def _text(self) -> list[bytes]:
        if multiprocess_dir() is not None:
            # Under --workers each process writes its values to files; any worker
            # answers a scrape with the sum over all of them.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return exposition(registry)
        return exposition(self.registry)


class _Only:
    """A collector of metric families already collected (what generate_latest reads)."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family]


def exposition(registry: CollectorRegistry, slice_size: int = 5000) -> list[bytes]:
    """prometheus_client's text format of ``registry``, in pieces, made a slice of
    samples at a time so that no step holds the interpreter long. Made in a thread, the
    text still shares the one interpreter lock with the event loop, which gets it back
    between two bytecodes but not within one: freeing a family's 400,000 samples (a
    histogram of 20,000 routes) at once held it 60-150 ms."""
    pieces: list[bytes] = []
    for family in registry.collect():
        samples, family.samples = family.samples, []
        first = True
        while first or samples:
            part = Metric(family.name, family.documentation, family.type, family.unit)
            part.samples = samples[:slice_size]
            del samples[:slice_size]
            text = generate_latest(_Only(part))
            # Each part repeats the family's HELP and TYPE lines: once is the format.
            pieces.append(text if first else text.split(b"\n", 2)[2])
            del part.samples[:]  # the last references: freed a slice at a time
            first = False
    return pieces


async def sync_periodically(metrics: Metrics, interval: float = SYNC_SECONDS) -> None:
    """Under ``--workers`` another process may answer the scrape: this bounds how late
    it sees this one's requests."""
    while True:
        await asyncio.sleep(interval)
        metrics.sync()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


# The third label of a per-route counter: a status code or an error reason.
_Label = int | str


class RouteMetrics:
    """One (route, variant)'s request counts, kept as plain numbers.

    Recording a request here is a few integer additions. Recording it straight into
    prometheus_client's children takes five locked updates and about ten Python calls,
    which cost more than all the rest of the gateway's bookkeeping per request, and with
    many routes the children of all of them compete for the CPU's caches.
    ``Metrics.sync()`` moves the counts into the Prometheus metrics: before every scrape,
    and on a timer under ``--workers`` (where another process may answer the scrape).
    """

    __slots__ = (
        "_buckets",
        "_code_children",
        "_codes",
        "_duration",
        "_error_children",
        "_errors",
        "_in_flight_child",
        "_metrics",
        "_seconds",
        "_synced",
        "_synced_in_flight",
        "cut_off",
        "in_flight",
        "route",
        "variant",
    )

    def __init__(self, metrics: Metrics, route: str, variant: str) -> None:
        self._metrics = metrics
        self.route = route
        self.variant = variant
        self.in_flight = 0  # the proxy adds and subtracts directly: no call per request
        # Counts since the gateway started (never reset: both the Prometheus sync and the
        # canary's counting take what is new since they last looked).
        self._codes: dict[_Label, int] = {}  # by status code, but for 200 (see count)
        self._errors: dict[_Label, int] = {}  # by reason, since the last sync
        # Observations per latency bucket, the last one past the largest bound (+Inf).
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._seconds = 0.0
        self.cut_off = 0  # answers below 500 the upstream broke off mid-stream
        # What the last sync had moved into Prometheus: (codes, buckets, seconds).
        self._synced: tuple[dict[_Label, int], list[int], float] = ({}, list(self._buckets), 0.0)
        self._duration = metrics.duration.labels(route, variant)
        check_histogram_layout(self._duration, LATENCY_BUCKETS)
        self._in_flight_child = metrics.in_flight.labels(route, variant)
        self._synced_in_flight = 0
        # Prometheus children per status code / error reason, made at the first sync
        # that needs them: both sets are small and bounded.
        self._code_children: dict[_Label, Counter] = {}
        self._error_children: dict[_Label, Counter] = {}

    def count(self, code: int, seconds: float) -> None:
        if code != 200:
            # Every answer is counted in the latency buckets, so the usual 200s need no
            # count of their own: sync() takes them as the rest (a dict update less on
            # nearly every request).
            codes = self._codes
            codes[code] = codes.get(code, 0) + 1
        self._seconds += seconds
        # Prometheus buckets are "less than or equal": the first bound >= seconds.
        self._buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def upstream_error(self, reason: str) -> None:
        errors = self._errors
        errors[reason] = errors.get(reason, 0) + 1

    def totals(self) -> tuple[int, int, tuple[int, ...]]:
        """Since the gateway started: answers, failures (5xx, gateway-made or not, and
        answers cut off) and answers per latency bucket."""
        failures = sum(n for code, n in self._codes.items() if int(code) >= 500)
        buckets = tuple(self._buckets)
        answers = sum(buckets)
        return answers, min(failures + self.cut_off, answers), buckets

    def sync(self) -> None:
        """Add what was counted since the last sync to the Prometheus metrics."""
        synced_codes, synced_buckets, synced_seconds = self._synced
        if (
            self._buckets == synced_buckets
            and not self._errors
            and self.in_flight == self._synced_in_flight
        ):
            # Nothing answered since (every answer is counted in a bucket): with
            # thousands of routes, most are idle between two scrapes.
            return
        buckets = [now - then for now, then in zip(self._buckets, synced_buckets, strict=True)]
        answered = sum(buckets)
        if answered:
            codes = {c: n - synced_codes.get(c, 0) for c, n in self._codes.items()}
            codes = {c: n for c, n in codes.items() if n}
            ok = answered - sum(codes.values())
            if ok:
                codes[200] = ok
            self._add_to_counter(self._metrics.requests, self._code_children, codes)
            add_to_histogram(self._duration, buckets, self._seconds - synced_seconds)
            self._synced = (dict(self._codes), list(self._buckets), self._seconds)
        if self._errors:
            errors, self._errors = self._errors, {}
            self._add_to_counter(self._metrics.upstream_errors, self._error_children, errors)
        if self.in_flight != self._synced_in_flight:
            self._synced_in_flight = self.in_flight
            self._in_flight_child.set(self.in_flight)

    def _add_to_counter(
        self, counter: Counter, children: dict[_Label, Counter], counts: dict[_Label, int]
    ) -> None:
        """Add ``counts`` to ``counter``'s children labelled (route, variant, key)."""
        for key, n in counts.items():
            child = children.get(key)
            if child is None:
                child = children[key] = counter.labels(self.route, self.variant, str(key))
            child.inc(n)


def _remove_series(
    metric: Counter | Gauge | Histogram, label: str, values: Collection[str]
) -> None:
    """Remove every series of ``metric`` whose ``label`` is one of ``values``, in one pass
    (under the metric's own lock, on its own table of children: see check_series_layout)."""
    position = metric._labelnames.index(label)
    with metric._lock:
        children = metric._metrics
        for key in [key for key in children if key[position] in values]:
            del children[key]


def check_series_layout(metric: Counter | Gauge | Histogram) -> None:
    """Fail at start-up if prometheus_client no longer keeps a labelled metric's children
    in a dict by label values, under a lock (what _remove_series relies on)."""
    if not (
        isinstance(getattr(metric, "_metrics", None), dict)
        and hasattr(getattr(metric, "_lock", None), "__enter__")
        and isinstance(getattr(metric, "_labelnames", None), tuple)
    ):
        raise RuntimeError(
            "this prometheus-client keeps labelled series in an unexpected layout; "
            "install a version this gateway supports (see pyproject.toml)"
        )


def add_to_histogram(child: Histogram, bucket_counts: list[int], total: float) -> None:
    """Add many observations to a histogram child at once: ``bucket_counts[i]`` of them
    in bucket ``i`` (not cumulative), summing to ``total``.

    prometheus_client has no public call for this (``observe`` takes one value), so this
    adds to the child's own bucket and sum values. ``check_histogram_layout`` verifies at
    start-up that the installed version still keeps them that way."""
    values = child._buckets
    for i, n in enumerate(bucket_counts):
        if n:
            values[i].inc(n)
    child._sum.inc(total)


def check_histogram_layout(child: Histogram, bounds: tuple[float, ...]) -> None:
    """Fail at start-up, not at the first scrape, if prometheus_client's histogram
    children no longer keep one value per bucket and one for the sum."""
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (
        not isinstance(buckets, list)
        or len(buckets) != len(bounds) + 1
        or not all(hasattr(value, "inc") for value in buckets)
        or not hasattr(total, "inc")
    ):
        raise RuntimeError(
            "this prometheus-client keeps histograms in an unexpected layout; "
            "install a version this gateway supports (see pyproject.toml)"
        )
