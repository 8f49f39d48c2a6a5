"""Shadow statistics: the noise baseline, latency quantiles, agreement, mismatch history."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.compare import (
    STATUS_FIELD,
    Answer,
    CompareSettings,
    Comparison,
    FieldResult,
    Outcome,
    Reason,
    compare,
)
from gateway.core.extract import FieldKind, Protocol, Tensor
from gateway.core.stats import (
    FieldVerdict,
    MismatchRing,
    NoiseBaseline,
    OutcomeTally,
    ShadowOutcome,
    ShadowStats,
    SlidingQuantiles,
    StatsSettings,
    render_value,
    wilson_interval,
    z_for,
)

Z99 = 2.3263478740408408  # one-sided 99 %: the normal quantile at 0.99


def comparison(**matched: bool) -> Comparison:
    """A comparison with the given fields matched or not (paths are the keyword names)."""
    fields = tuple(
        FieldResult(f"$.{name}", FieldKind.NUMBER, ok, Reason.AGREE if ok else Reason.VALUE, 1, 1)
        for name, ok in matched.items()
    )
    outcome = Outcome.MATCH if all(matched.values()) else Outcome.MISMATCH
    return Comparison(outcome, fields)


# --------------------------------------------------------------------------- Wilson bounds


def test_z_for_confidence() -> None:
    assert z_for(0.99) == pytest.approx(Z99)
    assert z_for(0.5) == 0.0
    with pytest.raises(ValueError, match="confidence"):
        z_for(1.0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=1, max_value=10_000), data=st.data())
def test_wilson_bounds_solve_the_score_equation(n: int, data: st.DataObject) -> None:
    # Each Wilson bound p is a root of (p_hat - p)^2 = z^2 p (1 - p) / n: check the
    # definition rather than a second copy of the closed form.
    k = data.draw(st.integers(min_value=0, max_value=n))
    p_hat = k / n
    low, high = wilson_interval(k, n, Z99)
    assert 0.0 <= low <= p_hat <= high <= 1.0
    for p in (low, high):
        assert (p_hat - p) ** 2 == pytest.approx(Z99**2 * p * (1 - p) / n, abs=1e-12)


def test_wilson_bounds_at_the_edges() -> None:
    # With no mismatches in n, the upper bound is z^2 / (n + z^2) (the score equation at
    # p_hat = 0); with all n, the lower bound is n / (n + z^2).
    assert wilson_interval(0, 200, Z99)[1] == pytest.approx(Z99**2 / (200 + Z99**2))
    assert wilson_interval(200, 200, Z99)[0] == pytest.approx(200 / (200 + Z99**2))
    assert wilson_interval(0, 0, Z99) == (0.0, 1.0)


# --------------------------------------------------------------------------- noise baseline


def test_verdicts() -> None:
    baseline = NoiseBaseline(min_samples=20)
    for i in range(40):
        baseline.observe(comparison(same=True, always=False, rare=i != 0))
    assert baseline.report("$.same") is not None
    assert baseline.report("$.same").verdict is FieldVerdict.AGREE  # type: ignore[union-attr]
    assert baseline.report("$.always").verdict is FieldVerdict.DIFFERENT  # type: ignore[union-attr]
    # Without a baseline any field that mismatches with a lower bound above 0 counts:
    # once in 40 is a rare but real difference.
    rare = baseline.report("$.rare")
    assert rare is not None
    assert wilson_interval(1, 40, Z99)[0] > 0
    assert rare.verdict is FieldVerdict.DIFFERENT
    assert baseline.real_differences() == ("$.always", "$.rare")


def test_too_few_samples_are_insufficient() -> None:
    baseline = NoiseBaseline(min_samples=20)
    for _ in range(19):
        baseline.observe(comparison(x=False))
    assert baseline.report("$.x").verdict is FieldVerdict.INSUFFICIENT  # type: ignore[union-attr]
    baseline.observe(comparison(x=False))
    assert baseline.report("$.x").verdict is FieldVerdict.DIFFERENT  # type: ignore[union-attr]


def test_with_a_baseline_configured_nothing_is_decided_before_noise_samples() -> None:
    baseline = NoiseBaseline(min_samples=5, min_noise_samples=10)
    for _ in range(50):
        baseline.observe(comparison(id=False))
    assert baseline.report("$.id").verdict is FieldVerdict.INSUFFICIENT  # type: ignore[union-attr]
    for _ in range(10):
        baseline.observe_noise(comparison(id=False))
    assert baseline.report("$.id").verdict is FieldVerdict.WITHIN_NOISE  # type: ignore[union-attr]


def test_too_few_samples_to_tell_noise_are_inconclusive() -> None:
    # Enough samples to decide by count, not by evidence: 4 mismatches in 12 against none
    # in 5 noise comparisons is neither a real difference nor shown to be noise.
    baseline = NoiseBaseline(min_samples=10, min_noise_samples=5)
    for i in range(12):
        baseline.observe(comparison(x=i % 3 != 0))
    for _ in range(5):
        baseline.observe_noise(comparison(x=True))
    report = baseline.report("$.x")
    assert report is not None and report.noise_mismatched == 0
    assert report.verdict is FieldVerdict.INCONCLUSIVE
    assert report.verdict.value == "inconclusive"
    # The champion turns out to disagree with itself as often: that is noise.
    for i in range(25):
        baseline.observe_noise(comparison(x=i % 3 != 0))
    assert baseline.report("$.x").verdict is FieldVerdict.WITHIN_NOISE  # type: ignore[union-attr]


def test_inconclusive_becomes_different_with_more_samples() -> None:
    baseline = NoiseBaseline(min_samples=10, min_noise_samples=5)
    for i in range(12):
        baseline.observe(comparison(x=i % 3 != 0))
    for _ in range(5):
        baseline.observe_noise(comparison(x=True))
    assert baseline.report("$.x").verdict is FieldVerdict.INCONCLUSIVE  # type: ignore[union-attr]
    for i in range(60):
        baseline.observe(comparison(x=i % 3 != 0))
        baseline.observe_noise(comparison(x=True))
    assert baseline.report("$.x").verdict is FieldVerdict.DIFFERENT  # type: ignore[union-attr]


def test_rates_and_net_rate() -> None:
    baseline = NoiseBaseline()
    for i in range(100):
        baseline.observe(comparison(a=i % 4 != 0, b=i % 2 != 0))  # a: 25 %, b: 50 %
        baseline.observe_noise(comparison(a=i % 2 != 0, b=i % 10 != 0))  # a: 50 %, b: 10 %
    a, b = baseline.report("$.a"), baseline.report("$.b")
    assert a is not None and b is not None
    assert (a.raw_rate, a.noise_rate, a.net_rate) == (0.25, 0.5, 0.0)  # never negative
    assert (b.raw_rate, b.noise_rate) == (0.5, 0.1)
    assert baseline.net_mismatch_rate("$.b") == pytest.approx(0.4)
    assert baseline.net_mismatch_rate("$.unknown") == 0.0
    assert [r.field for r in baseline.reports()] == ["$.b", "$.a"]  # biggest net first
    assert (a.verdict, b.verdict) == (FieldVerdict.WITHIN_NOISE, FieldVerdict.DIFFERENT)


def test_margin_blocks_small_real_differences() -> None:
    strict = NoiseBaseline(min_net_rate=0.2)
    lax = NoiseBaseline()
    for i in range(1000):
        for baseline in (strict, lax):
            baseline.observe(comparison(x=i % 10 != 0))  # 10 % mismatches, no noise
    assert lax.report("$.x").verdict is FieldVerdict.DIFFERENT  # type: ignore[union-attr]
    assert strict.report("$.x").verdict is FieldVerdict.WITHIN_NOISE  # type: ignore[union-attr]


def test_field_table_is_bounded_and_overflow_counted() -> None:
    baseline = NoiseBaseline(max_fields=3)
    baseline.observe(comparison(a=True, b=True, c=False, d=False, e=True))
    baseline.observe_noise(comparison(a=True, f=False))
    assert baseline.fields() == ("$.a", "$.b", "$.c")
    assert baseline.overflow == 3
    assert baseline.report("$.d") is None


def test_bad_baseline_parameters() -> None:
    with pytest.raises(ValueError):
        NoiseBaseline(max_fields=0)
    with pytest.raises(ValueError, match="min_net_rate"):
        NoiseBaseline(min_net_rate=1.0)


# --------------------------------------------------------------------------- acceptance

JSON_SETTINGS = CompareSettings(protocol=Protocol.JSON)  # keep id/created: no help from
# the extractor or from ignore patterns, the baseline alone must tell noise from change


def model_answer(rng: random.Random, score_shift: float = 0.0) -> Answer:
    """An answer whose envelope changes on every call, like most model servers'."""
    doc = {
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "created": 1_700_000_000 + rng.randrange(10**6),
        "model": "sentiment",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [1, 3],
                "data": [0.1, 0.7 - score_shift, 0.2 + score_shift],
            },
            {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["positive"]},
        ],
    }
    return Answer(200, "application/json", orjson.dumps(doc))


@pytest.mark.parametrize("change_rate", [1.0, 0.3])
@pytest.mark.parametrize("noise_share", [1.0, 0.25])
def test_acceptance_only_the_real_field_is_a_difference(
    change_rate: float, noise_share: float
) -> None:
    rng = random.Random(4)
    stats = ShadowStats(StatsSettings(min_noise_samples=20))
    for i in range(200):
        champion = model_answer(rng)
        shift = 0.05 if rng.random() < change_rate else 0.0
        stats.record(f"req-{i}", compare(champion, model_answer(rng, shift), JSON_SETTINGS))
        if rng.random() < noise_share:
            stats.record_noise(compare(champion, model_answer(rng), JSON_SETTINGS))

    report = stats.snapshot()
    assert report.real_differences == ("$.outputs[0].data",)
    by_field = {r.field: r for r in report.fields}
    assert by_field["$.id"].raw_rate == 1.0  # mismatched every time...
    assert by_field["$.id"].verdict is FieldVerdict.WITHIN_NOISE  # ...as noise
    assert by_field["$.id"].net_rate == 0.0
    # Integer timestamps compare exactly (no relative tolerance), so "created" differs
    # every time too; still noise.
    assert by_field["$.created"].raw_rate == 1.0
    assert by_field["$.created"].verdict is FieldVerdict.WITHIN_NOISE
    assert by_field["$.outputs[1].data[0]"].verdict is FieldVerdict.AGREE
    assert by_field[STATUS_FIELD].verdict is FieldVerdict.AGREE
    assert report.agreement_rate == 0.0  # every raw comparison mismatched (ids)


def test_acceptance_fails_without_the_baseline() -> None:
    # The same traffic without champion-vs-champion samples flags the envelope too: the
    # acceptance test above passes because of the baseline, not by construction.
    rng = random.Random(4)
    stats = ShadowStats()
    for i in range(200):
        champion = model_answer(rng)
        stats.record(f"req-{i}", compare(champion, model_answer(rng, 0.05), JSON_SETTINGS))
    assert set(stats.snapshot().real_differences) == {"$.id", "$.created", "$.outputs[0].data"}


def test_sampling_noise_in_text_is_not_a_difference() -> None:
    # An LLM at temperature > 0: the champion disagrees with itself half the time, and so
    # does the challenger; only its changed finish reason is real.
    rng = random.Random(7)

    def chat(finish: str) -> Answer:
        content = rng.choice(["Paris.", "It is Paris."])
        doc = {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish,
                }
            ],
        }
        return Answer(200, "application/json", orjson.dumps(doc))

    stats = ShadowStats(StatsSettings(min_noise_samples=20))
    for i in range(300):
        champion = chat("stop")
        stats.record(f"r{i}", compare(champion, chat("length")))
        stats.record_noise(compare(champion, chat("stop")))
    report = stats.snapshot()
    assert report.real_differences == ("$.choices[0].finish_reason",)
    content = next(r for r in report.fields if r.field == "$.choices[0].message.content")
    assert 0.35 < content.raw_rate < 0.65
    assert content.verdict is FieldVerdict.WITHIN_NOISE


# --------------------------------------------------------------------------- latency


def test_quantiles_match_the_standard_library() -> None:
    window = SlidingQuantiles(capacity=1000)
    values = [float(v) for v in range(1, 101)]
    random.Random(1).shuffle(values)
    for v in values:
        window.add(v)
    # statistics.quantiles(method="inclusive") is the same type-7 interpolation.
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    assert window.quantiles((0.5, 0.9, 0.99)) == pytest.approx((cuts[49], cuts[89], cuts[98]))
    assert window.summary().p50 == pytest.approx(50.5)
    assert window.quantile(0.0) == 1.0
    assert window.quantile(1.0) == 100.0


def test_window_slides_and_stays_bounded() -> None:
    window = SlidingQuantiles(capacity=10)
    for v in range(1000):
        window.add(float(v))
    assert len(window) == 10
    assert window.total == 1000
    assert window.quantile(0.0) == 990.0  # only the last 10 remain
    assert window.quantile(1.0) == 999.0


def test_negative_deltas_and_rejected_values() -> None:
    window = SlidingQuantiles(capacity=4)
    assert window.summary().p50 is None
    for v in (-0.2, math.nan, 0.1, math.inf):
        window.add(v)
    assert (len(window), window.rejected) == (2, 2)
    assert window.quantile(0.5) == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="quantile"):
        window.quantile(1.5)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-10, max_value=10), min_size=1, max_size=50),
    capacity=st.integers(min_value=1, max_value=20),
    q=st.floats(min_value=0, max_value=1),
)
def test_window_quantile_is_the_quantile_of_the_last_values(
    values: list[float], capacity: int, q: float
) -> None:
    window = SlidingQuantiles(capacity)
    for v in values:
        window.add(v)
    recent = sorted(values[-capacity:])
    got = window.quantile(q)
    assert got is not None
    assert recent[0] <= got <= recent[-1]
    if len(recent) > 1:
        expected = statistics.quantiles(recent, n=4, method="inclusive")[1]
        assert window.quantile(0.5) == pytest.approx(expected)


# --------------------------------------------------------------------------- agreement


def test_agreement_counts_only_comparisons() -> None:
    tally = OutcomeTally()
    assert tally.agreement_rate is None
    assert tally.agreement_lower_bound() is None
    for outcome, n in [
        (ShadowOutcome.MATCH, 90),
        (ShadowOutcome.MISMATCH, 10),
        (ShadowOutcome.TIMEOUT, 50),
        (ShadowOutcome.ERROR, 5),
        (ShadowOutcome.DROPPED, 7),
    ]:
        for _ in range(n):
            tally.add(outcome)
    assert tally.compared == 100
    assert tally.agreement_rate == 0.9
    low = tally.agreement_lower_bound(0.99)
    assert low == pytest.approx(wilson_interval(90, 100, Z99)[0])
    assert low is not None and 0.8 < low < 0.9


# --------------------------------------------------------------------------- mismatch ring


def test_ring_keeps_the_last_n_and_caps_per_answer() -> None:
    ring = MismatchRing(capacity=5, max_chars=64, max_fields_per_answer=2)
    ring.add("first", comparison(a=False, b=False, c=False))
    assert [(r.request_id, r.field) for r in ring.records()] == [("first", "$.a"), ("first", "$.b")]
    for i in range(10):
        ring.add(f"r{i}", comparison(x=False, y=True))
    assert [r.request_id for r in ring.records()] == ["r5", "r6", "r7", "r8", "r9"]


def test_values_are_truncated() -> None:
    long_text = "x" * 1000
    result = FieldResult("$.t", FieldKind.TEXT, False, Reason.VALUE, long_text, "y")
    ring = MismatchRing(capacity=2, max_chars=20)
    ring.add("r" * 500, Comparison(Outcome.MISMATCH, (result,)))
    (record,) = ring.records()
    assert record.champion == "x" * 19 + "…"
    assert len(record.request_id) == 20
    assert (record.shadow, record.reason) == ("y", "value")


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (Tensor((0.5, 1.0), (2,)), "shape=[2] [0.5, 1.0]"),
        (Tensor(tuple(float(i) for i in range(10**6)), (10**6,)), "shape=[1000000] [0.0, 1.0, 2.…"),
        (b"\xffab", "\\xffab"),
        (None, "null"),
        (True, "true"),
        (1.5, "1.5"),
    ],
)
def test_render_value(value: Any, rendered: str) -> None:
    assert render_value(value, 30) == rendered


def test_shadow_stats_snapshot_is_plain_data() -> None:
    stats = ShadowStats(StatsSettings(latency_window=8, last_mismatches=3))
    a = Answer(200, "application/json", b'{"y": [0.1, 0.9]}')
    b = Answer(200, "application/json", b'{"y": [0.9, 0.1]}')
    assert stats.record("r1", compare(a, a), latency_delta=0.010) is ShadowOutcome.MATCH
    assert stats.record("r2", compare(a, b), latency_delta=0.030) is ShadowOutcome.MISMATCH
    stats.record_failure(ShadowOutcome.TIMEOUT)
    with pytest.raises(ValueError):
        stats.record_failure(ShadowOutcome.MATCH)
    report = stats.snapshot()
    assert report.outcomes == {"match": 1, "mismatch": 1, "error": 0, "timeout": 1, "dropped": 0}
    assert report.agreement_rate == 0.5
    assert report.latency_delta.count == 2
    assert report.latency_delta.p50 == pytest.approx(0.020)
    assert [(m.request_id, m.field) for m in report.last_mismatches] == [("r2", "$.y")]
    # The admin API serialises it as is.
    decoded = orjson.loads(orjson.dumps(dataclasses.asdict(report)))
    assert decoded["fields"][0]["field"] in {"$.y", STATUS_FIELD}


def test_rendered_values_are_always_valid_utf8() -> None:
    result = FieldResult("$.t", FieldKind.TEXT, False, Reason.VALUE, "a\udfffb", "c")
    ring = MismatchRing()
    ring.add("id\ud800", Comparison(Outcome.MISMATCH, (result,)))
    (record,) = ring.records()
    assert (record.champion, record.request_id) == ("a\\udfffb", "id\\ud800")
    orjson.dumps(dataclasses.asdict(record))  # would raise on a lone surrogate
