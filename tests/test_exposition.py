"""The /metrics text made in slices is byte for byte what prometheus_client makes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.metrics import exposition


def registry_with(series: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("c", "a counter\nwith a second line", ["route", "code"], registry=registry)
    histogram = Histogram("h", "a histogram", ["route"], buckets=(0.1, 1.0), registry=registry)
    gauge = Gauge("g", 'a "gauge"', ["route"], registry=registry)
    Gauge("empty", "no series", ["route"], registry=registry)
    for i in range(series):
        counter.labels(f"r{i}", "200").inc(i)
        histogram.labels(f'r"{i}\\').observe(i / 7)
        gauge.labels(f"r{i}").set(-i)
    return registry


@pytest.mark.parametrize("series", [0, 1, 6, 7, 20])
@pytest.mark.parametrize("slice_size", [1, 2, 3, 5, 7, 100])
def test_the_text_in_slices_is_prometheus_clients(series: int, slice_size: int) -> None:
    registry = registry_with(series)
    assert b"".join(exposition(registry, slice_size)) == generate_latest(registry)
