"""The per-route counts (``RouteMetrics``) add up to what prometheus_client would show had
every request been recorded into it directly, however the syncs fall between them."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.core.split import Variant
from gateway.metrics import LATENCY_BUCKETS, Metrics, check_histogram_layout

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CODES = st.sampled_from((200, 200, 200, 404, 500, 502, 504))
# Latencies on and around every bucket bound, as well as anywhere in range.
SECONDS = st.one_of(
    st.sampled_from(LATENCY_BUCKETS),
    st.sampled_from([math.nextafter(b, math.inf) for b in LATENCY_BUCKETS]),
    st.floats(min_value=0.0, max_value=400.0, allow_nan=False),
)
# A request (code, seconds), an upstream error (reason) or a sync.
EVENTS = st.lists(
    st.one_of(
        st.tuples(CODES, SECONDS),
        st.sampled_from(("timeout", "connect", "stream_reset")),
        st.just("sync"),
    ),
    max_size=60,
)


def samples(registry: CollectorRegistry, *names: str) -> Samples:
    out: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in names:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@settings(deadline=None, max_examples=200)
@given(EVENTS)
def test_synced_counts_equal_direct_recording(events: list[object]) -> None:
    metrics = Metrics()
    record = metrics.route("r", Variant.CHALLENGER)
    reference = CollectorRegistry()
    requests = Counter("ref_requests", "", ["code"], registry=reference)
    duration = Histogram("ref_duration", "", buckets=LATENCY_BUCKETS, registry=reference)
    errors = Counter("ref_errors", "", ["reason"], registry=reference)
    for event in events:
        if event == "sync":
            metrics.sync()
        elif isinstance(event, str):
            record.upstream_error(event)
            errors.labels(event).inc()
        else:
            assert isinstance(event, tuple)
            code, seconds = event
            record.count(code, seconds)
            requests.labels(str(code)).inc()
            duration.observe(seconds)
    metrics.sync()

    got = samples(
        metrics.registry,
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_request_duration_seconds_count",
        "gateway_upstream_errors_total",
    )
    want = samples(
        reference,
        "ref_requests_total",
        "ref_duration_bucket",
        "ref_duration_count",
        "ref_errors_total",
    )
    route_labels = (("route", "r"), ("variant", "challenger"))
    renamed = {
        "ref_requests_total": "gateway_requests_total",
        "ref_duration_bucket": "gateway_request_duration_seconds_bucket",
        "ref_duration_count": "gateway_request_duration_seconds_count",
        "ref_errors_total": "gateway_upstream_errors_total",
    }
    expected = {
        (renamed[name], tuple(sorted(labels + route_labels))): value
        for (name, labels), value in want.items()
    }
    # A histogram with no observation yet shows zeros; the record's appears at start too.
    assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}
    got_sum = samples(metrics.registry, "gateway_request_duration_seconds_sum")
    want_sum = samples(reference, "ref_duration_sum")
    assert sum(got_sum.values()) == pytest.approx(sum(want_sum.values()), rel=1e-9, abs=1e-12)


def test_a_route_keeps_one_record_across_reloads() -> None:
    """A reload builds new routes while requests on the old ones finish: both must count
    into the same numbers, or a sync would lose or double some."""
    metrics = Metrics()
    before = metrics.route("r", Variant.CHAMPION)
    after = metrics.route("r", Variant.CHAMPION)
    assert before is after
    assert metrics.route("r", Variant.CHALLENGER) is not before
    assert metrics.unrouted() is metrics.unrouted()


def test_in_flight_is_shown_as_of_the_last_sync() -> None:
    metrics = Metrics()
    record = metrics.route("r", Variant.CHAMPION)
    gauge = metrics.in_flight.labels("r", "champion")
    record.in_flight += 3
    assert gauge._value.get() == 0
    metrics.sync()
    assert (
        samples(metrics.registry, "gateway_requests_in_flight")[
            ("gateway_requests_in_flight", (("route", "r"), ("variant", "champion")))
        ]
        == 3
    )
    record.in_flight -= 3
    metrics.render()  # a scrape syncs first
    assert (
        samples(metrics.registry, "gateway_requests_in_flight")[
            ("gateway_requests_in_flight", (("route", "r"), ("variant", "champion")))
        ]
        == 0
    )


def test_an_unexpected_histogram_layout_fails_at_start() -> None:
    old_layout = SimpleNamespace(_buckets=[object()])
    with pytest.raises(RuntimeError, match="prometheus-client"):
        check_histogram_layout(old_layout, LATENCY_BUCKETS)  # type: ignore[arg-type]
    registry = CollectorRegistry()
    child = Histogram("h", "", buckets=LATENCY_BUCKETS, registry=registry)
    check_histogram_layout(child, LATENCY_BUCKETS)
    with pytest.raises(RuntimeError):
        check_histogram_layout(child, LATENCY_BUCKETS[:-1])


@given(st.lists(st.tuples(CODES, st.booleans()), max_size=40), st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_canary_totals_count_each_failed_answer_once(
    answers: list[tuple[int, bool]], synced_after: int
) -> None:
    """What the canary reads (``totals``): answers, failures (5xx, or cut off below 500:
    a 5xx cut off is one failure, not two) and latency buckets, since the start, whatever
    the Prometheus syncs in between."""
    from gateway.pipeline.forward import _cut_off

    record = Metrics().route("r", Variant.CHALLENGER)
    for i, (code, cut) in enumerate(answers):
        record.count(code, 0.01)
        if cut:
            _cut_off(record, code)
        if i == synced_after:
            record.sync()
    requests, failures, buckets = record.totals()
    assert requests == len(answers) == sum(buckets)
    assert failures == sum(1 for code, cut in answers if code >= 500 or cut)
    assert failures <= requests
