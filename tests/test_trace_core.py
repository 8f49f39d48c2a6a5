"""The pure trace core: bucketing, window alignment, straddling, pending, serialisation."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.trace import (
    _SMALL_COUNTS,
    ANSWER_BATCH,
    AnswerBatch,
    ModelTrace,
    exact_bucket,
    merge,
    round_half_away,
    serialize,
    token_bucket,
    trace_key,
    window_end,
)

META = {"meta_v": 3, "meta_precision": 10, "meta_interval_sec": 10}


def snapshot(pairs: dict[str, int], total: int, pending: int, interval: int = 10) -> dict[str, int]:
    return {**pairs, **META, "meta_interval_sec": interval, "meta_total_reqs": total,
            "meta_pending_reqs": pending}


# -- buckets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "bucket"),
    [
        (0, 0),  # contract: 0 for 0 tokens (log2 undefined)
        (1, 0),  # log2(1) = 0
        (2, 10),
        (3, 16),  # 15.85
        (20, 43),  # 43.22
        (100, 66),  # 66.44
        (1000, 100),  # 99.66: rounds up
        (2**20, 200),
    ],
)
def test_bucket_at_documented_points(tokens: int, bucket: int) -> None:
    assert token_bucket(tokens) == bucket


def test_negative_tokens_count_as_zero() -> None:
    assert token_bucket(-7) == 0


def test_lookup_table_for_small_counts_agrees_with_exact_arithmetic() -> None:
    # The request path looks small counts up by index; every entry must be the exact one,
    # and counts just past the table must go on without a step.
    for tokens in range(_SMALL_COUNTS + 64):
        assert token_bucket(tokens) == exact_bucket(tokens), tokens


def test_done_buckets_counts_inside_and_beyond_the_table_alike() -> None:
    trace = ModelTrace(10, 0.0)
    big = _SMALL_COUNTS + 5
    pairs = [(3, 7), (big, 7), (3, big), (-1, 7)]
    for pair in pairs:
        trace.add(1.0)
        trace.done(1.0, *pair)
    window = trace.take_finished(10.0)[0].trace
    expected = {f"{exact_bucket(max(i, 0))}:{exact_bucket(max(o, 0))}" for i, o in pairs}
    assert {k for k in window if not k.startswith("meta_")} == expected


@pytest.mark.parametrize(
    ("x", "expected"),
    [(0.5, 1), (1.5, 2), (2.5, 3), (-0.5, -1), (-2.5, -3), (2.4999999999999996, 2),
     (0.49999999999999994, 0), (-0.49999999999999994, 0), (7.0, 7), (0.0, 0)],
)
def test_round_half_away_from_zero(x: float, expected: int) -> None:
    # Python's round() is banker's rounding (round(2.5) == 2); the contract is Go's.
    assert round_half_away(x) == expected


def test_round_half_away_differs_from_bankers_rounding() -> None:
    assert round(2.5) == 2 and round_half_away(2.5) == 3


@pytest.mark.parametrize("k", [43, 66, 99, 100, 101, 199, 200, 401, 629])
def test_bucket_edges_around_half_way_points(k: int) -> None:
    # (From about 20 tokens up consecutive integers are less than a bucket apart.)
    # The tie between buckets k-1 and k is 10*log2(t) = k - 1/2, i.e. t**20 = 2**(2k-1).
    # No integer sits on it (t**20 would be an odd power of two); the integers either
    # side of it must land in k-1 and k.
    tie = 1 << (2 * k - 1)
    lo = math.floor(2 ** ((2 * k - 1) / 20))
    while (lo + 1) ** 20 <= tie:
        lo += 1
    while lo**20 >= tie:
        lo -= 1
    hi = lo + 1
    assert lo**20 < tie < hi**20
    assert (token_bucket(lo), token_bucket(hi)) == (k - 1, k)


def test_bucket_agrees_with_float_formula_near_every_tie_below_2_pow_20() -> None:
    # The float formula AIBrix's Go gateway uses, evaluated where it is closest to a tie.
    for t in range(1, 1 << 20):
        x = math.log2(t) / 0.1
        if abs(x - math.floor(x) - 0.5) < 1e-6:
            assert token_bucket(t) == round_half_away(x), t


@given(st.integers(min_value=0, max_value=1 << 70))
def test_bucket_is_the_exact_rounding(tokens: int) -> None:
    expected = 0 if tokens == 0 else (tokens**20).bit_length() // 2
    assert token_bucket(tokens) == expected
    if 0 < tokens < 1 << 53:
        x = math.log2(tokens) / 0.1
        if abs(x - math.floor(x) - 0.5) > 1e-9:
            assert token_bucket(tokens) == round_half_away(x)


@given(st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=0, max_value=1 << 40))
def test_bucket_is_monotone(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert token_bucket(lo) <= token_bucket(hi)


# -- windows -----------------------------------------------------------------------------


def test_window_end_alignment() -> None:
    assert window_end(1_700_000_003.2, 10) == 1_700_000_010
    assert window_end(1_700_000_009.999, 10) == 1_700_000_010
    # A time exactly on a boundary opens the window that starts there.
    assert window_end(1_700_000_010.0, 10) == 1_700_000_020
    assert window_end(0.0, 10) == 10
    assert window_end(59.5, 60) == 60


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.integers(1, 3600))
def test_window_contains_now(now: float, interval: int) -> None:
    end = window_end(now, interval)
    assert end % interval == 0
    assert end - interval <= now < end


def test_trace_key_format() -> None:
    key = trace_key("aibrix", "llama-7b", 1_700_000_010)
    assert key == "aibrix:llama-7b_request_trace_1700000010"


# -- the accumulator ---------------------------------------------------------------------


def test_counts_land_in_their_windows() -> None:
    t = ModelTrace(10, 1000.0)
    for _ in range(3):
        t.add(1001.0)
    t.done(1002.0, 100, 20)
    t.done(1003.0, 100, 20)
    t.done(1004.0, 0, 0)
    assert t.take_finished(1009.9) == []  # still open
    [w] = t.take_finished(1010.0)
    assert w.window_end == 1010
    assert w.trace == snapshot({"66:43": 2, "0:0": 1}, total=3, pending=0)
    assert t.take_finished(1030.0) == []  # each window is handed out once; idle => none


def test_request_straddling_a_boundary_counts_once_in_each_window() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1008.0)  # arrives in [1000, 1010)
    t.add(1009.0)
    t.done(1009.5, 2, 2)  # this one finishes in the same window
    t.done(1012.0, 1000, 3)  # this one finishes in [1010, 1020)
    first, second = t.take_finished(1020.0)
    assert first.window_end == 1010
    assert first.trace == snapshot({"10:10": 1}, total=2, pending=1)
    assert second.window_end == 1020
    # No arrivals in the second window, but its completion is counted there.
    assert second.trace == snapshot({"100:16": 1}, total=0, pending=0)


def test_pending_is_the_in_flight_count_at_the_boundary() -> None:
    t = ModelTrace(10, 1000.0)
    for _ in range(5):
        t.add(1001.0)
    t.done(1002.0, 1, 1)
    # Two more arrive right after the boundary, before anything reads the window: the
    # closed window still reports what was in flight at its end (4), not 6.
    t.add(1010.01)
    t.add(1010.02)
    [w] = t.take_finished(1010.05)
    assert w.trace["meta_pending_reqs"] == 4
    assert w.trace["meta_total_reqs"] == 5
    assert t.pending == 6
    # Open requests keep counting as pending in later windows until they finish.
    for _ in range(6):
        t.done(1015.0, 8, 8)
    [w2] = t.take_finished(1020.0)
    assert w2.trace == snapshot({"30:30": 6}, total=2, pending=0)


def test_window_with_only_open_requests_writes_nothing() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    [w] = t.take_finished(1010.0)
    assert w.trace["meta_pending_reqs"] == 1
    # Nothing arrived or finished in [1010, 1020): no window, as in AIBrix.
    assert t.take_finished(1020.0) == []
    assert t.pending == 1


def test_skipped_idle_windows_and_clock_steps_back() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    t.done(1001.5, 1, 1)
    t.add(1055.0)  # windows 1010..1050 were idle
    t.add(1049.0)  # wall clock stepped back: counted into the open window
    ends = [w.window_end for w in t.take_finished(1060.0)]
    assert ends == [1010, 1060]


def test_done_without_add_never_publishes_negative_pending() -> None:
    t = ModelTrace(10, 1000.0)
    t.done(1001.0, 1, 1)
    [w] = t.take_finished(1010.0)
    assert w.trace["meta_pending_reqs"] == 0


def test_discard_only_releases_pending() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    t.discard(1002.0)
    [w] = t.take_finished(1010.0)
    assert w.trace == snapshot({}, total=1, pending=0)


def test_take_open_keeps_the_window_identity() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    w = t.take_open()
    assert w is not None and w.window_end == 1010
    assert t.take_open() is None
    t.done(1002.0, 1, 1)
    [rest] = t.take_finished(1010.0)
    assert rest.window_end == 1010
    assert merge(w.trace, rest.trace)["meta_total_reqs"] == 1


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ModelTrace(0, 0.0)


@given(
    st.lists(
        st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0, 60, allow_nan=False),
                  st.integers(0, 5000), st.integers(0, 5000)),
        max_size=60,
    )
)
def test_every_request_counted_exactly_once(requests: list[tuple[float, float, int, int]]) -> None:
    """Arrivals and completions, replayed in time order, add up across all windows."""
    events: list[tuple[float, int, int, int]] = []  # (time, kind, in, out); kind 0 = add
    for start, duration, i, o in requests:
        events.append((start, 0, 0, 0))
        events.append((start + duration, 1, i, o))
    events.sort()
    t = ModelTrace(7, 0.0)
    windows = []
    for now, kind, i, o in events:
        if kind == 0:
            t.add(now)
        else:
            t.done(now, i, o)
        windows += t.take_finished(now)
    windows += t.take_finished(1000.0)
    assert sum(w.trace["meta_total_reqs"] for w in windows) == len(requests)
    pairs: dict[str, int] = {}
    for w in windows:
        assert w.window_end % 7 == 0
        for k, v in w.trace.items():
            if not k.startswith("meta_"):
                assert v > 0  # AIBrix rejects zero counts
                pairs[k] = pairs.get(k, 0) + v
    expected: dict[str, int] = {}
    for _, _, i, o in requests:
        key = f"{token_bucket(i)}:{token_bucket(o)}"
        expected[key] = expected.get(key, 0) + 1
    assert pairs == expected
    assert [w.window_end for w in windows] == sorted({w.window_end for w in windows})
    assert t.pending == 0


def answer(prompt: int, completion: int) -> bytes:
    return orjson.dumps(
        {"id": "x", "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )


def test_whole_answers_count_in_the_window_they_finished_in() -> None:
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    t.add(1002.0)
    t.done_answer(1009.9, answer(100, 20))  # read later, counted in [1000, 1010)
    t.done_answer(1010.5, b'{"predictions": [1]}')  # no usage: 0:0, in [1010, 1020)
    open_window = t.peek_open()
    assert open_window is not None and open_window.window_end == 1020
    assert open_window.trace == snapshot({"0:0": 1}, total=0, pending=0)
    [first] = t.take_finished(1010.6)
    assert first.trace == snapshot({"66:43": 1}, total=2, pending=1)


def test_an_absurd_count_from_a_broken_server_is_bucketed_not_raised_on() -> None:
    # msgspec reads integers of any length; a few hundred digits still fit a small answer.
    absurd = 10**300
    body = b'{"usage": {"prompt_tokens": ' + str(absurd).encode() + b', "completion_tokens": 2}}'
    t = ModelTrace(10, 1000.0)
    t.add(1001.0)
    t.done_answer(1002.0, body)
    [window] = t.take_finished(1010.5)
    assert window.trace == snapshot({f"{token_bucket(absurd)}:10": 1}, total=1, pending=0)


def test_whole_answers_are_held_a_batch_at_most() -> None:
    t = ModelTrace(10, 1000.0)
    body = answer(3, 4)
    for n in range(3 * ANSWER_BATCH + 1):
        t.add(1001.0)
        t.done_answer(1001.0, body)
        assert len(t._answers.answers) < ANSWER_BATCH, n  # read whenever a batch fills up
        assert t.pending == 0
    [w] = t.take_finished(1010.0)
    assert w.trace == snapshot({"16:20": 3 * ANSWER_BATCH + 1}, total=3 * ANSWER_BATCH + 1,
                               pending=0)  # fmt: skip


@settings(deadline=None)  # CPU-bound and bounded; a busy CI core must not fail it
@given(
    st.lists(
        st.tuples(st.floats(0, 50, allow_nan=False), st.floats(0, 30, allow_nan=False),
                  st.integers(0, 5000), st.integers(0, 5000), st.booleans(), st.booleans()),
        max_size=3 * ANSWER_BATCH,
    )
)
def test_done_answer_is_done_with_the_answers_counts(
    requests: list[tuple[float, float, int, int, bool, bool]],
) -> None:
    """Deferred reading changes nothing: the same events through done() and through
    done_answer() give the same windows, whenever they are taken or peeked at."""
    events: list[tuple[float, int, int, int, bool]] = []
    for start, duration, i, o, _, peek in requests:
        events.append((start, 0, 0, 0, peek))
        events.append((start + duration, 1, i, o, peek))
    events.sort()
    direct, deferred = ModelTrace(7, 0.0), ModelTrace(7, 0.0)
    taken: tuple[list[object], list[object]] = ([], [])
    for now, kind, i, o, peek in events:
        if kind == 0:
            direct.add(now)
            deferred.add(now)
        else:
            direct.done(now, i, o)
            deferred.done_answer(now, answer(i, o))
        if peek:
            assert direct.peek_open() == deferred.peek_open()
        taken[0].extend(direct.take_finished(now))
        taken[1].extend(deferred.take_finished(now))
    assert direct.take_open() == deferred.take_open()
    assert taken[0] == taken[1]


@settings(deadline=None)  # CPU-bound and bounded; a busy CI core must not fail it
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.floats(0, 50, allow_nan=False),
                  st.floats(0, 30, allow_nan=False), st.integers(0, 5000),
                  st.integers(0, 5000), st.booleans()),
        max_size=3 * ANSWER_BATCH,
    )
)
def test_models_sharing_a_batch_count_like_separate_done_calls(
    requests: list[tuple[int, float, float, int, int, bool]],
) -> None:
    """Three models share one batch of unread answers (as under one trace writer): each
    model's windows are what done() with the answer's counts gives, whichever model's
    window closes or is looked at first."""
    events: list[tuple[float, int, int, int, int, bool]] = []
    for model, start, duration, i, o, peek in requests:
        events.append((start, 0, model, 0, 0, peek))
        events.append((start + duration, 1, model, i, o, peek))
    events.sort()
    batch = AnswerBatch()
    direct = [ModelTrace(7, 0.0) for _ in range(3)]
    deferred = [ModelTrace(7, 0.0, batch) for _ in range(3)]
    taken: tuple[list[object], list[object]] = ([], [])
    for now, kind, model, i, o, peek in events:
        if kind == 0:
            direct[model].add(now)
            deferred[model].add(now)
        else:
            direct[model].done(now, i, o)
            deferred[model].done_answer(now, answer(i, o))
        assert len(batch.answers) < ANSWER_BATCH  # bounded across models
        if peek:
            other = (model + 1) % 3
            assert direct[other].peek_open() == deferred[other].peek_open()
        taken[0].extend(direct[model].take_finished(now))
        taken[1].extend(deferred[model].take_finished(now))
    for a, b in zip(direct, deferred, strict=True):
        taken[0].extend(a.take_finished(1e6))
        taken[1].extend(b.take_finished(1e6))
    assert taken[0] == taken[1]


# -- serialisation and merge -------------------------------------------------------------


def test_serialize_is_compact_sorted_json_like_go() -> None:
    snap = snapshot({"66:43": 2, "10:10": 1, "100:2": 5}, total=9, pending=2)
    # Byte for byte what AIBrix's Go json.Marshal of map[string]int produces.
    assert serialize(snap) == (
        b'{"100:2":5,"10:10":1,"66:43":2,"meta_interval_sec":10,"meta_pending_reqs":2,'
        b'"meta_precision":10,"meta_total_reqs":9,"meta_v":3}'
    )
    assert orjson.loads(serialize(snap)) == snap


def test_merge_adds_counts_and_keeps_format_fields() -> None:
    a = snapshot({"1:1": 2, "5:5": 1}, total=4, pending=1)
    b = snapshot({"1:1": 3, "7:7": 1}, total=6, pending=2)
    assert merge(a, b) == snapshot({"1:1": 5, "5:5": 1, "7:7": 1}, total=10, pending=3)
    assert merge({}, b) == b
