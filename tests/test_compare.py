"""Model-aware comparison of two answers: statuses, tolerances, vectors, text, ignores."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.core.compare import (
    MISSING,
    STATUS_FIELD,
    Answer,
    CompareSettings,
    Comparison,
    Distance,
    FieldResult,
    Outcome,
    Reason,
    TextMatch,
    VectorMatch,
    compare,
    compare_extracted,
    compare_values,
    cosine_similarity,
    numbers_close,
)
from gateway.core.extract import FieldKind, Protocol, Tensor, extract

JSON_CT = "application/json"


def answer(doc: Any, status: int = 200) -> Answer:
    return Answer(status, JSON_CT, orjson.dumps(doc))


def field(comparison: Comparison, path: str) -> FieldResult:
    matches = [f for f in comparison.fields if f.path == path]
    assert len(matches) == 1, [f.path for f in comparison.fields]
    return matches[0]


def paths(results: tuple[FieldResult, ...]) -> set[str]:
    return {f.path for f in results}


def oip(scores: list[float], shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "model_name": "sentiment",
        "model_version": "1",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": shape or [len(scores)],
                "data": scores,
            }
        ],
    }


# --------------------------------------------------------------------------- status, basics


def test_identical_answers_match_field_by_field() -> None:
    result = compare(answer(oip([0.1, 0.7, 0.2])), answer(oip([0.1, 0.7, 0.2])))
    assert result.outcome is Outcome.MATCH
    assert result.mismatches == ()
    assert paths(result.fields) == {
        STATUS_FIELD,
        "$.outputs[0].name",
        "$.outputs[0].datatype",
        "$.outputs[0].data",
    }
    assert result.champion_protocol is result.shadow_protocol is Protocol.OIP


def test_status_codes_are_compared_first_and_bodies_then_ignored() -> None:
    result = compare(answer(oip([0.1, 0.9])), answer({"error": "boom"}, status=500))
    assert result.outcome is Outcome.MISMATCH
    assert result.fields == (
        FieldResult(STATUS_FIELD, FieldKind.NUMBER, False, Reason.VALUE, 200, 500),
    )
    assert result.champion_protocol is None


def test_same_error_status_compares_the_error_bodies() -> None:
    a = compare(answer({"error": "x"}, 503), answer({"error": "x"}, 503))
    b = compare(answer({"error": "x"}, 503), answer({"error": "y"}, 503))
    assert a.outcome is Outcome.MATCH
    assert b.outcome is Outcome.MISMATCH
    assert paths(b.mismatches) == {"$.error"}


def test_fields_on_one_side_only_are_mismatches() -> None:
    result = compare(answer({"a": 1, "b": 2}), answer({"a": 1, "c": None}))
    assert result.outcome is Outcome.MISMATCH
    b, c = field(result, "$.b"), field(result, "$.c")
    assert (b.reason, b.champion, b.shadow) == (Reason.ONLY_CHAMPION, 2, MISSING)
    assert (c.reason, c.champion, c.shadow) == (Reason.ONLY_SHADOW, MISSING, None)
    assert field(result, "$.a").matched


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (True, 1),  # booleans are not numbers
        (None, 0),
        (0.5, [0.5]),  # a scalar is not a vector of one
        ("1", 1),
        ({}, None),
    ],
)
def test_different_kinds_never_match(left: Any, right: Any) -> None:
    result = compare(answer({"v": left}), answer({"v": right}))
    assert field(result, "$.v").reason is Reason.KIND
    assert result.outcome is Outcome.MISMATCH


@pytest.mark.parametrize(("left", "right"), [(True, False), (None, None), ({}, {})])
def test_singletons(left: Any, right: Any) -> None:
    result = compare(answer({"v": left}), answer({"v": right}))
    assert field(result, "$.v").matched is (left == right)


# --------------------------------------------------------------------------- numbers

# Tolerances are powers of two and values exactly representable, so "exactly at the
# tolerance" really is exact in binary floating point.
NEXT_UP = math.nextafter(1.5, math.inf)
NEXT_DOWN_3 = math.nextafter(3.0, -math.inf)


@pytest.mark.parametrize(
    ("a", "b", "abs_tol", "rel_tol", "matched"),
    [
        (1.0, 1.5, 0.5, 0.0, True),  # |diff| == abs_tol: <= matches
        (1.0, NEXT_UP, 0.5, 0.0, False),  # one ulp past it
        (4.0, 3.0, 0.0, 0.25, True),  # |diff| == rel_tol * max(|a|, |b|) = 1
        (4.0, NEXT_DOWN_3, 0.0, 0.25, False),
        (3.0, 4.0, 0.0, 0.25, True),  # relative to the larger magnitude: symmetric
        (-4.0, -3.0, 0.0, 0.25, True),  # negatives by magnitude
        (-1.0, 1.0, 0.0, 1.0, False),  # |2| > 1.0 * max(1, 1): opposite signs differ
        (-1.0, 1.0, 0.0, 2.0, True),  # |2| <= 2.0 * 1
        (0.0, 0.0, 0.0, 0.0, True),
        (0.0, -0.0, 0.0, 0.0, True),
        (0.0, 1e-300, 0.0, 0.5, False),  # relative tolerance alone never reaches 0
        (0.0, 1e-300, 1e-12, 0.0, True),  # abs_tol does
        (1.0, 1.25, 0.25, 0.1, True),  # max(abs, rel*1.25=0.125) = 0.25
        (1.0, 1.25, 0.125, 0.2, True),  # max(0.125, rel*1.25=0.25) = 0.25
        (1.0, 1.25, 0.125, 0.1, False),  # max(0.125, 0.125) < 0.25
        (1, 1.0, 0.0, 0.0, True),  # an integer and its float are the same number
        (10**17, 10**17 + 1, 0.0, 0.0, False),  # big integers compare exactly
        (10**17, 10**17 + 1, 1.0, 0.0, True),
        # Integers ignore rel_tol (IDs, counts, timestamps), even beyond float range.
        (10**400, 2 * 10**400, 0.0, 0.5, False),
        (10**400, 10**400 + 1, 1.0, 0.0, True),
        (math.nan, math.nan, 0.0, 0.0, True),  # both undefined: same behaviour
        (math.nan, 0.0, 1e300, 1.0, False),
        (math.inf, math.inf, 0.0, 0.0, True),
        (math.inf, -math.inf, 1e300, 1.0, False),
        (math.inf, 1e308, 1e300, 1.0, False),  # inf is close only to itself
    ],
)
def test_number_tolerance(
    a: float, b: float, abs_tol: float, rel_tol: float, matched: bool
) -> None:
    assert numbers_close(a, b, abs_tol, rel_tol) is matched
    assert numbers_close(b, a, abs_tol, rel_tol) is matched


def test_number_fields_report_their_errors() -> None:
    tight = CompareSettings(abs_tol=0.0, rel_tol=0.0)
    result = compare(answer({"score": 0.5}), answer({"score": 0.625}), tight)
    score = field(result, "$.score")
    assert (score.matched, score.reason) == (False, Reason.VALUE)
    assert score.metrics.abs_error == 0.125
    assert score.metrics.rel_error == 0.125 / 0.625
    loose = compare(
        answer({"score": 0.5}), answer({"score": 0.625}), CompareSettings(abs_tol=0.125)
    )
    assert loose.outcome is Outcome.MATCH


def test_non_finite_numbers_from_python_servers() -> None:
    nan_body = Answer(200, JSON_CT, b'{"loss": NaN}')
    assert compare(nan_body, nan_body).outcome is Outcome.MATCH
    result = compare(nan_body, answer({"loss": 0.0}))
    assert field(result, "$.loss").reason is Reason.NON_FINITE
    assert field(result, "$.loss").metrics.abs_error is None


def test_token_usage_is_compared_as_numbers() -> None:
    def chat(completion_tokens: int) -> dict[str, Any]:
        return {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": completion_tokens},
        }

    result = compare(answer(chat(5)), answer(chat(7)))
    usage = field(result, "$.usage.completion_tokens")
    assert (usage.kind, usage.matched, usage.metrics.abs_error) == (FieldKind.NUMBER, False, 2.0)
    assert compare(answer(chat(5)), answer(chat(7)), CompareSettings(abs_tol=2)).outcome is (
        Outcome.MATCH
    )


# --------------------------------------------------------------------------- vectors


def vec(values: list[float], shape: tuple[int, ...] | None = None) -> Tensor:
    return Tensor(tuple(values), shape or (len(values),))


def cmp(a: Tensor, b: Tensor, **kwargs: Any) -> FieldResult:
    return compare_values("$.v", a, b, CompareSettings(**kwargs))


def test_vector_tolerance_reports_max_abs_error_and_count() -> None:
    result = cmp(vec([0.1, 0.7, 0.2]), vec([0.1, 0.75, 0.15]), abs_tol=0.01, rel_tol=0.0)
    assert (result.matched, result.reason) == (False, Reason.VALUE)
    assert result.metrics.max_abs_error == pytest.approx(0.05)
    assert result.metrics.mismatched_elements == 2
    assert result.metrics.argmax_agreement == 1.0
    within = cmp(vec([0.1, 0.7, 0.2]), vec([0.1, 0.75, 0.15]), abs_tol=0.051, rel_tol=0.0)
    assert within.matched


def test_vector_shapes_must_agree() -> None:
    result = cmp(vec([1, 2, 3, 4], (2, 2)), vec([1, 2, 3, 4], (4,)))
    assert (result.matched, result.reason) == (False, Reason.SHAPE)


def test_argmax_is_per_row_of_the_last_axis() -> None:
    champion = vec([0.1, 0.7, 0.2, 0.8, 0.1, 0.1], (2, 3))
    # Row 0 keeps its argmax (1), row 1 moves from 0 to 2.
    shadow = vec([0.2, 0.5, 0.3, 0.3, 0.1, 0.6], (2, 3))
    result = cmp(champion, shadow, vector_match=VectorMatch.ARGMAX)
    assert result.metrics.argmax_agreement == 0.5
    assert not result.matched
    # Flattened, both argmaxes would be index 3 (0.8) vs index 5 (0.6): per row matters.
    same_rows = vec([0.2, 0.6, 0.2, 0.5, 0.3, 0.2], (2, 3))
    assert cmp(champion, same_rows, vector_match=VectorMatch.ARGMAX).matched
    assert not cmp(champion, same_rows, vector_match=VectorMatch.TOLERANCE).matched


def test_argmax_ties_go_to_the_lower_index_on_both_sides() -> None:
    result = cmp(vec([0.5, 0.5, 0.0]), vec([0.5, 0.5, 0.0]), vector_match=VectorMatch.ARGMAX)
    assert result.matched
    flipped = cmp(vec([0.5, 0.5, 0.0]), vec([0.4, 0.5, 0.0]), vector_match=VectorMatch.ARGMAX)
    assert not flipped.matched


def test_topk_ignores_order_within_the_top_k() -> None:
    champion = vec([0.40, 0.30, 0.20, 0.06, 0.04])
    reordered = vec([0.20, 0.30, 0.40, 0.06, 0.04])  # same top 3 {0,1,2}, other order
    swapped = vec([0.40, 0.30, 0.04, 0.06, 0.20])  # top 3 {0,1,4}
    same = cmp(champion, reordered, vector_match=VectorMatch.TOPK, top_k=3)
    assert (same.matched, same.metrics.topk_agreement) == (True, 1.0)
    assert same.metrics.argmax_agreement == 0.0
    other = cmp(champion, swapped, vector_match=VectorMatch.TOPK, top_k=3)
    assert (other.matched, other.metrics.topk_agreement) == (False, 2 / 3)


def test_topk_larger_than_the_row_is_capped() -> None:
    result = cmp(vec([0.9, 0.1]), vec([0.1, 0.9]), vector_match=VectorMatch.TOPK, top_k=5)
    # k = 2 = every class: the sets always agree; use argmax for two-class heads.
    assert result.matched
    assert result.metrics.topk_agreement == 1.0


def test_topk_averages_over_rows() -> None:
    champion = vec([3, 2, 1, 0, 3, 2, 1, 0], (2, 4))
    shadow = vec([3, 2, 1, 0, 0, 1, 2, 3], (2, 4))  # row 1: top 2 {0,1} vs {3,2}
    result = cmp(champion, shadow, vector_match=VectorMatch.TOPK, top_k=2)
    assert result.metrics.topk_agreement == 0.5
    assert result.metrics.argmax_agreement == 0.5


def test_cosine_criterion_accepts_scaling_and_rejects_direction_changes() -> None:
    champion = vec([1.0, 2.0, 3.0])
    scaled = vec([2.0, 4.0, 6.0])
    scaled_result = cmp(champion, scaled, vector_match=VectorMatch.COSINE, min_cosine=0.999)
    assert scaled_result.matched
    assert scaled_result.metrics.cosine == pytest.approx(1.0)
    assert not cmp(champion, scaled, vector_match=VectorMatch.TOLERANCE).matched
    orthogonal = cmp(vec([1.0, 0.0]), vec([0.0, 1.0]), vector_match=VectorMatch.COSINE)
    assert (orthogonal.matched, orthogonal.metrics.cosine) == (False, 0.0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([3.0, 4.0], [4.0, 3.0], 24 / 25),  # (12 + 12) / (5 * 5)
        ([1.0, 0.0], [-1.0, 0.0], -1.0),
        ([0.0, 0.0], [0.0, 0.0], 1.0),  # two zero vectors are identical
        ([0.0, 0.0], [1.0, 0.0], 0.0),
        ([], [], 1.0),
        ([1e300, 1e300], [1e300, 1e300], 1.0),  # squares overflow without scaling
        ([1e300, 0.0], [1e300, 1e300], 1 / math.sqrt(2)),
        ([1e-320, 0.0], [1e-320, 1e-320], 1 / math.sqrt(2)),  # subnormals too
    ],
)
def test_cosine_similarity(a: list[float], b: list[float], expected: float) -> None:
    assert cosine_similarity(tuple(a), tuple(b)) == pytest.approx(expected, abs=1e-12)


def test_nan_in_the_same_place_is_agreement_elsewhere_a_non_finite_mismatch() -> None:
    nan = math.nan
    same = cmp(vec([nan, 0.5, 0.5]), vec([nan, 0.5, 0.5]), vector_match=VectorMatch.COSINE)
    assert same.matched
    for criterion in VectorMatch:
        moved = cmp(vec([nan, 0.9, 0.1]), vec([0.0, 0.9, 0.1]), vector_match=criterion)
        assert (moved.matched, moved.reason) == (False, Reason.NON_FINITE), criterion
    infinite = cmp(vec([math.inf, 1.0]), vec([-math.inf, 1.0]), vector_match=VectorMatch.ARGMAX)
    assert infinite.reason is Reason.NON_FINITE


def test_oip_answers_end_to_end_with_class_scores() -> None:
    champion = answer(oip([0.1, 0.7, 0.2, 0.8, 0.15, 0.05], [2, 3]))
    nudged = answer(oip([0.12, 0.68, 0.2, 0.79, 0.16, 0.05], [2, 3]))
    flipped = answer(oip([0.1, 0.2, 0.7, 0.8, 0.15, 0.05], [2, 3]))
    argmax = CompareSettings(vector_match=VectorMatch.ARGMAX)
    assert compare(champion, nudged).outcome is Outcome.MISMATCH  # default: 1e-6 tolerance
    assert compare(champion, nudged, argmax).outcome is Outcome.MATCH
    result = compare(champion, flipped, argmax)
    assert paths(result.mismatches) == {"$.outputs[0].data"}
    assert field(result, "$.outputs[0].data").metrics.argmax_agreement == 0.5


# --------------------------------------------------------------------------- text, bytes


def test_text_is_exact_by_default_and_whitespace_normalised_on_request() -> None:
    a, b = "The  answer is\n42.", "The answer is 42. "
    exact = compare_values("$.t", a, b, CompareSettings())
    assert (exact.matched, exact.metrics.common_prefix) == (False, 4)
    assert compare_values("$.t", a, b, CompareSettings(text_match=TextMatch.WHITESPACE)).matched
    assert not compare_values(
        "$.t", "a", "A", CompareSettings(text_match=TextMatch.WHITESPACE)
    ).matched


def test_chat_answers_differing_in_content_only() -> None:
    def chat(content: str, **envelope: Any) -> dict[str, Any]:
        return {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            **envelope,
        }

    same = compare(
        answer(chat("Paris", id="a", created=1)), answer(chat("Paris", id="b", created=2))
    )
    assert same.outcome is Outcome.MATCH  # the OpenAI envelope isn't content
    result = compare(answer(chat("Paris.")), answer(chat("Paris is the capital.")))
    assert paths(result.mismatches) == {"$.choices[0].message.content"}
    assert field(result, "$.choices[0].message.content").metrics.common_prefix == 5


def test_streamed_champion_matches_non_streamed_shadow() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Par"}}]},
        {"choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}},
    ]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    whole = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }
    result = compare(Answer(200, "text/event-stream", stream.encode()), answer(whole))
    assert result.outcome is Outcome.MATCH, result.mismatches


def test_bytes_bodies() -> None:
    png = Answer(200, "image/png", b"\x89PNG\r\n\x1a\n-one")
    other = Answer(200, "image/png", b"\x89PNG\r\n\x1a\n-two")
    assert compare(png, png).outcome is Outcome.MATCH
    result = compare(png, other)
    assert field(result, "$").metrics.common_prefix == 9
    assert field(result, "$").kind is FieldKind.BYTES
    # A JSON answer against a text one: different kinds at the root.
    mixed = compare(Answer(200, "text/plain", b"oops"), answer([1]))
    assert field(mixed, "$").reason is Reason.KIND


# --------------------------------------------------------------------------- ignoring


def test_ignored_fields_are_left_out() -> None:
    def chat(id_: str, created: int, finish: str, content: str) -> dict[str, Any]:
        return {
            "id": id_,
            "created": created,
            "choices": [
                {"index": 0, "message": {"content": content}, "finish_reason": finish},
                {"index": 1, "message": {"content": content}, "finish_reason": finish},
            ],
            "usage": {"prompt_tokens": 3},
        }

    ignore = CompareSettings(
        protocol=Protocol.JSON,
        ignore=("$.id", "$.created", "$.choices[*].finish_reason", "$.usage"),
    )
    a, b = answer(chat("x", 1, "stop", "hi")), answer(chat("y", 2, "length", "hi"))
    assert compare(a, b, CompareSettings(protocol=Protocol.JSON)).outcome is Outcome.MISMATCH
    result = compare(a, b, ignore)
    assert result.outcome is Outcome.MATCH
    assert not any(f.path.startswith(("$.id", "$.created", "$.usage")) for f in result.fields)
    assert "$.choices[1].message.content" in paths(result.fields)
    # Ignoring doesn't hide real differences elsewhere, nor a field present on one side.
    c = answer({**chat("z", 3, "stop", "bye"), "extra": 1})
    assert paths(compare(a, c, ignore).mismatches) == {
        "$.choices[0].message.content",
        "$.choices[1].message.content",
        "$.extra",
    }


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"abs_tol": -1e-9}, "abs_tol"),
        ({"rel_tol": math.nan}, "rel_tol"),
        ({"abs_tol": math.inf}, "abs_tol"),
        ({"min_cosine": 1.5}, "min_cosine"),
        ({"top_k": 0}, "top_k"),
        ({"ignore": ("id",)}, "pattern"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompareSettings(**kwargs)


def test_settings_are_frozen_and_patterns_precompiled() -> None:
    s = CompareSettings(ignore=("$.id",))
    assert "$.id" in s.ignored
    with pytest.raises(AttributeError):
        s.abs_tol = 1.0  # type: ignore[misc]
    assert s == CompareSettings(ignore=("$.id",))


# --------------------------------------------------------------------------- properties

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | floats
    | st.text(max_size=6)
)
json_docs = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
all_settings = st.builds(
    CompareSettings,
    protocol=st.sampled_from(list(Protocol)),
    abs_tol=st.floats(min_value=0, max_value=1),
    rel_tol=st.floats(min_value=0, max_value=1),
    vector_match=st.sampled_from(list(VectorMatch)),
    min_cosine=st.floats(min_value=-1, max_value=1),
    top_k=st.integers(min_value=1, max_value=4),
    text_match=st.sampled_from(list(TextMatch)),
)


def as_answer(doc: Any, status: int = 200) -> Answer:
    # The standard library writes NaN/Infinity the way Python model servers do.
    return Answer(status, JSON_CT, json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(doc=json_docs, s=all_settings)
def test_an_answer_always_matches_itself(doc: Any, s: CompareSettings) -> None:
    # Decoded twice, as the gateway does: NaNs are distinct objects on each side.
    result = compare(as_answer(doc), as_answer(doc), s)
    assert result.outcome is Outcome.MATCH, result.mismatches


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=40), content_type=st.sampled_from(["", JSON_CT, "text/plain"]))
def test_any_bytes_match_themselves(raw: bytes, content_type: str) -> None:
    a = Answer(200, content_type, raw)
    assert compare(a, Answer(200, content_type, bytes(raw))).outcome is Outcome.MATCH


@settings(max_examples=300, deadline=None)
@given(
    a=json_docs,
    b=json_docs,
    status=st.sampled_from([200, 200, 500]),
    s=all_settings,
)
def test_comparison_is_symmetric(a: Any, b: Any, status: int, s: CompareSettings) -> None:
    forward = compare(as_answer(a), as_answer(b, status), s)
    backward = compare(as_answer(b, status), as_answer(a), s)
    assert forward.outcome is backward.outcome
    assert {(f.path, f.matched) for f in forward.fields} == {
        (f.path, f.matched) for f in backward.fields
    }


tolerances = st.floats(min_value=0, max_value=10)


@settings(max_examples=300, deadline=None)
@given(
    a=floats,
    b=floats,
    abs_tols=st.tuples(tolerances, tolerances),
    rel_tols=st.tuples(tolerances, tolerances),
)
def test_number_tolerance_is_monotone(
    a: float, b: float, abs_tols: tuple[float, float], rel_tols: tuple[float, float]
) -> None:
    (abs_lo, abs_hi), (rel_lo, rel_hi) = sorted(abs_tols), sorted(rel_tols)
    if numbers_close(a, b, abs_lo, rel_lo):
        assert numbers_close(a, b, abs_hi, rel_hi)
        assert numbers_close(a, b, abs_hi, rel_lo)
        assert numbers_close(a, b, abs_lo, rel_hi)


finite = st.floats(min_value=-1e6, max_value=1e6)


@settings(max_examples=200, deadline=None)
@given(
    pair=st.integers(min_value=1, max_value=6).flatmap(
        lambda n: st.tuples(
            st.lists(finite, min_size=n, max_size=n), st.lists(finite, min_size=n, max_size=n)
        )
    ),
    cosines=st.tuples(st.floats(min_value=-1, max_value=1), st.floats(min_value=-1, max_value=1)),
    tols=st.tuples(tolerances, tolerances),
)
def test_vector_criteria_are_monotone_in_their_thresholds(
    pair: tuple[list[float], list[float]],
    cosines: tuple[float, float],
    tols: tuple[float, float],
) -> None:
    a, b = vec(pair[0]), vec(pair[1])
    strict_cos, loose_cos = sorted(cosines, reverse=True)
    if cmp(a, b, vector_match=VectorMatch.COSINE, min_cosine=strict_cos).matched:
        assert cmp(a, b, vector_match=VectorMatch.COSINE, min_cosine=loose_cos).matched
    low, high = sorted(tols)
    if cmp(a, b, abs_tol=low, rel_tol=low).matched:
        assert cmp(a, b, abs_tol=high, rel_tol=high).matched


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(finite, min_size=1, max_size=8), scale=st.floats(min_value=1e-3, max_value=1e3)
)
def test_scaling_a_vector_keeps_its_ranking_and_direction(
    values: list[float], scale: float
) -> None:
    assume(any(values))
    # Scaling must not underflow to 0 or lose a subnormal's precision: that changes
    # the direction for real (5e-324 * 0.5 == 0.0).
    assume(all(v == 0 or abs(v) >= 1e-300 for v in values))
    a, b = vec(values), vec([v * scale for v in values])
    result = cmp(a, b, vector_match=VectorMatch.COSINE, min_cosine=0.999999)
    assert result.matched
    assert result.metrics.argmax_agreement == 1.0


def test_compare_extracted_reuses_extractions_without_a_status_field() -> None:
    champion = extract(orjson.dumps({"predictions": [0.1, 0.9]}))
    result = compare_extracted(champion, extract(orjson.dumps({"predictions": [0.9, 0.1]})))
    assert paths(result.fields) == {"$.predictions"}
    assert result.outcome is Outcome.MISMATCH
    assert compare_extracted(champion, champion).outcome is Outcome.MATCH


# Entries that exercise every branch of the vector decision: equal, close, far, huge
# (the sum overflows though every entry is finite), and non-finite ones.
vector_entries = st.sampled_from([0.0, 0.5, 0.5000001, 1.0, -2.0, 1e308, -1e308]) | st.floats(
    allow_nan=True, allow_infinity=True
)


@settings(max_examples=400, deadline=None)
@given(
    pair=st.integers(min_value=1, max_value=6).flatmap(
        lambda n: st.tuples(
            st.lists(vector_entries, min_size=n, max_size=n),
            st.lists(vector_entries, min_size=n, max_size=n),
        )
    ),
    s=all_settings,
)
def test_vector_decision_agrees_with_the_full_metrics(
    pair: tuple[list[float], list[float]], s: CompareSettings
) -> None:
    # The hot path decides from the configured criterion alone (with shortcuts for equal
    # and all-finite vectors); the metrics, computed on demand, must tell the same story.
    a, b = vec(pair[0]), vec(pair[1])
    result = compare_values("$.v", a, b, s)
    metrics = result.metrics
    non_finite_disagree = any(
        not (math.isfinite(x) and math.isfinite(y))
        and not (x == y or (math.isnan(x) and math.isnan(y)))
        for x, y in zip(a.values, b.values, strict=True)
    )
    if non_finite_disagree:
        assert (result.matched, result.reason) == (False, Reason.NON_FINITE)
        return
    expected = {
        VectorMatch.TOLERANCE: metrics.mismatched_elements == 0,
        VectorMatch.ARGMAX: metrics.argmax_agreement == 1.0,
        VectorMatch.TOPK: metrics.topk_agreement == 1.0,
        VectorMatch.COSINE: metrics.cosine is not None and metrics.cosine >= s.min_cosine,
    }[s.vector_match]
    assert result.matched is expected
    assert result.reason is (Reason.AGREE if expected else Reason.VALUE)


def test_metrics_are_worked_out_only_for_what_has_them() -> None:
    tight = CompareSettings(abs_tol=0.0, rel_tol=0.0)
    status = compare(answer({"x": 1}, 200), answer({"x": 1}, 500), tight).fields[0]
    assert status.path == STATUS_FIELD and status.metrics == Distance()
    text = compare_values("$.t", "hello world", "hello there", tight)
    assert text.metrics.common_prefix == 6
    assert compare_values("$.t", "same", "same", tight).metrics == Distance()
    kind = compare_values("$.k", 1.0, "1", tight)
    assert (kind.reason, kind.metrics) == (Reason.KIND, Distance())
    equal = compare_values("$.v", vec([0.2, 0.8]), vec([0.2, 0.8]), tight)
    assert equal.matched
    assert (equal.metrics.cosine, equal.metrics.mismatched_elements) == (1.0, 0)
