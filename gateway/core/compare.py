"""Compare a shadow's answer with the champion's, the way ML engineers compare models.

``compare(champion, shadow, settings)`` checks status codes first (different codes: a
mismatch, and the bodies aren't read: a 500's body says nothing about the model), then
extracts both bodies (:mod:`gateway.core.extract`) and compares them field by field. Every
field present on either side gets a :class:`FieldResult`, matched or not, so that the
noise baseline can count comparisons per field; the pseudo-field ``@status`` (not a JSON
path, so it can't collide with one) carries the status codes.

Decisions, per kind of field:

- **numbers**: match iff ``|a - b| <= max(abs_tol, rel_tol * max(|a|, |b|))``, exactly
  :func:`math.isclose` (symmetric, ``<=`` so a difference of exactly the tolerance
  matches). Two JSON integers (class IDs, token counts, timestamps) match only within
  ``abs_tol``: no relative tolerance. Relative tolerance alone never matches anything
  against 0: use ``abs_tol`` for outputs that can be 0. NaN matches NaN (the models
  agree that the output is undefined, and ``compare(x, x)`` must match), ``inf`` matches
  only the same ``inf``.
- **vectors** (:class:`Tensor`): shapes must be equal and non-finite entries must sit at
  the same places with the same values; then ``vector_match`` decides: ``tolerance``
  (every element as a number), ``argmax`` (same argmax in every row of the last axis),
  ``topk`` (same set of ``top_k`` indices in every row, order ignored; ``k`` is capped at
  the row length), ``cosine`` (cosine similarity over the finite entries ``>= min_cosine``).
  All metrics are reported whichever criterion decides. Ties rank the lower index first,
  NaN ranks lowest.
- **text**: equal, after collapsing runs of whitespace if ``text_match: whitespace``.
- **bytes, booleans, null, {}**: equal. Different kinds never match (``1`` is not ``true``,
  ``0.5`` is not ``[0.5]``).
"""

from __future__ import annotations

import enum
import functools
import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, cast

from gateway.core.extract import (
    Extracted,
    FieldKind,
    PathMatcher,
    Protocol,
    Tensor,
    Value,
    extract,
    kind_of,
)

STATUS_FIELD = "@status"


class Outcome(enum.StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"


class Reason(enum.StrEnum):
    """Why a field matched or didn't."""

    AGREE = "agree"
    ONLY_CHAMPION = "only_champion"
    ONLY_SHADOW = "only_shadow"
    KIND = "kind"
    SHAPE = "shape"
    NON_FINITE = "non_finite"
    VALUE = "value"


# When two vectors count as the same answer (``compare.vector_match``).
class VectorMatch(enum.StrEnum):
    TOLERANCE = "tolerance"
    ARGMAX = "argmax"
    TOPK = "topk"
    COSINE = "cosine"


# When two texts count as the same answer (``compare.text_match``).
class TextMatch(enum.StrEnum):
    EXACT = "exact"
    WHITESPACE = "whitespace"


# The value of a field on the side that doesn't have it.
class Missing(enum.Enum):
    MISSING = "missing"


MISSING = Missing.MISSING

# Enum members the per-field code uses, as module constants: on Python 3.11 reading
# ``Reason.AGREE`` costs about ten times a global lookup, and these run for every field
# of every mirrored answer.
_AGREE, _VALUE, _KIND = Reason.AGREE, Reason.VALUE, Reason.KIND
_SHAPE, _NON_FINITE = Reason.SHAPE, Reason.NON_FINITE
_ONLY_CHAMPION, _ONLY_SHADOW = Reason.ONLY_CHAMPION, Reason.ONLY_SHADOW
_NUMBER, _VECTOR, _TEXT = FieldKind.NUMBER, FieldKind.VECTOR, FieldKind.TEXT
_TOLERANCE, _ARGMAX, _TOPK = VectorMatch.TOLERANCE, VectorMatch.ARGMAX, VectorMatch.TOPK
_WHITESPACE = TextMatch.WHITESPACE


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Distance:
    """How far apart two values are; None where a metric doesn't apply."""

    abs_error: float | None = None
    rel_error: float | None = None
    max_abs_error: float | None = None
    mismatched_elements: int | None = None
    cosine: float | None = None
    argmax_agreement: float | None = None  # share of rows with the same argmax
    topk_agreement: float | None = None  # mean |top-k(a) & top-k(b)| / k over rows
    common_prefix: int | None = None  # characters (or bytes) before texts diverge


NO_DISTANCE = Distance()


@dataclass(frozen=True, slots=True)
class Comparison:
    outcome: Outcome
    fields: tuple[FieldResult, ...]
    # None when the status codes differed and the bodies were not extracted.
    champion_protocol: Protocol | None = None
    shadow_protocol: Protocol | None = None

    @property
    def mismatches(self) -> tuple[FieldResult, ...]:
        return tuple(f for f in self.fields if not f.matched)


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """Comparison settings of one route, built once at config load."""

    protocol: Protocol = Protocol.AUTO
    ignore: tuple[str, ...] = ()
    abs_tol: float = 1e-6
    rel_tol: float = 1e-5
    vector_match: VectorMatch = VectorMatch.TOLERANCE
    min_cosine: float = 0.999
    top_k: int = 5
    text_match: TextMatch = TextMatch.EXACT
    ignored: PathMatcher = field(init=False, repr=False, compare=False)
    # math.isclose with these tolerances, for all-finite vectors (map() calls it from C).
    isclose: Callable[[float, float], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("abs_tol", "rel_tol"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine: must be between -1 and 1, got {self.min_cosine}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be at least 1, got {self.top_k}")
        # Frozen, so the derived matcher is set the way dataclasses set fields themselves.
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "ignored", PathMatcher(self.ignore))
        object.__setattr__(
            self,
            "isclose",
            functools.partial(math.isclose, rel_tol=self.rel_tol, abs_tol=self.abs_tol),
        )


DEFAULT_SETTINGS = CompareSettings()


class FieldResult(NamedTuple):
    """One field's verdict.

    A tuple rather than a dataclass: a comparison builds one per field, on the event
    loop. How far apart the values are (``metrics``) is worked out only when asked for;
    deciding ``matched`` needs just the configured criterion.
    """

    path: str
    kind: FieldKind
    matched: bool
    reason: Reason
    champion: Value | Missing
    shadow: Value | Missing
    settings: CompareSettings = DEFAULT_SETTINGS

    @property
    def metrics(self) -> Distance:
        return measure(self)


def compare(
    champion: Answer, shadow: Answer, settings: CompareSettings = DEFAULT_SETTINGS
) -> Comparison:
    status = _compare_status(champion.status, shadow.status)
    if not status.matched:
        return Comparison(Outcome.MISMATCH, (status,))
    left = extract(champion.body, champion.content_type, settings.protocol)
    right = extract(shadow.body, shadow.content_type, settings.protocol)
    fields = (status, *diff_fields(left.fields, right.fields, settings))
    return Comparison(_outcome(fields), fields, left.protocol, right.protocol)


def compare_extracted(
    champion: Extracted, shadow: Extracted, settings: CompareSettings = DEFAULT_SETTINGS
) -> Comparison:
    """Compare two already extracted bodies (no ``@status`` field)."""
    fields = diff_fields(champion.fields, shadow.fields, settings)
    return Comparison(_outcome(fields), fields, champion.protocol, shadow.protocol)


def _outcome(fields: tuple[FieldResult, ...]) -> Outcome:
    for result in fields:
        if not result.matched:
            return Outcome.MISMATCH
    return Outcome.MATCH


def _compare_status(champion: int, shadow: int) -> FieldResult:
    same = champion == shadow
    reason = _AGREE if same else _VALUE
    return FieldResult(STATUS_FIELD, _NUMBER, same, reason, champion, shadow)


def diff_fields(
    champion: Mapping[str, Value], shadow: Mapping[str, Value], settings: CompareSettings
) -> tuple[FieldResult, ...]:
    """One result per field on either side, champion's order first, ignored fields left out."""
    ignored = settings.ignored if settings.ignore else None
    results: list[FieldResult] = []
    for path, value in champion.items():
        if ignored is not None and path in ignored:
            continue
        other = shadow.get(path, MISSING)
        if other is MISSING:
            results.append(_one_sided(path, value, _ONLY_CHAMPION, settings))
        else:
            results.append(compare_values(path, value, other, settings))
    for path, other in shadow.items():
        if path not in champion and (ignored is None or path not in ignored):
            results.append(_one_sided(path, other, _ONLY_SHADOW, settings))
    return tuple(results)


def _one_sided(path: str, value: Value, reason: Reason, settings: CompareSettings) -> FieldResult:
    champion: Value | Missing = value if reason is _ONLY_CHAMPION else MISSING
    shadow: Value | Missing = value if reason is _ONLY_SHADOW else MISSING
    return FieldResult(path, kind_of(value), False, reason, champion, shadow, settings)


def compare_values(path: str, a: Value, b: Value, settings: CompareSettings) -> FieldResult:
    kind = kind_of(a)
    if kind is not kind_of(b):
        return FieldResult(path, kind, False, _KIND, a, b, settings)
    if a == b:
        # Equal values agree under every criterion. (NaN never equals itself, and tensors
        # of different shapes are unequal: both take the long way below.)
        return FieldResult(path, kind, True, _AGREE, a, b, settings)
    if kind is _NUMBER:
        matched, reason = _decide_numbers(cast(float, a), cast(float, b), settings)
    elif kind is _VECTOR:
        matched, reason = _decide_tensors(cast(Tensor, a), cast(Tensor, b), settings)
    elif kind is _TEXT and settings.text_match is _WHITESPACE:
        matched = _normalize(cast(str, a), _WHITESPACE) == _normalize(cast(str, b), _WHITESPACE)
        reason = _AGREE if matched else _VALUE
    else:
        # Unequal bytes or text; null, booleans and {} are singletons, so unequal ones
        # are different values.
        matched, reason = False, _VALUE
    return FieldResult(path, kind, matched, reason, a, b, settings)


def measure(result: FieldResult) -> Distance:
    """How far apart a field's two values are (for reports; ``matched`` is decided
    without this)."""
    a, b, s = result.champion, result.shadow, result.settings
    if result.reason in (Reason.KIND, Reason.ONLY_CHAMPION, Reason.ONLY_SHADOW, Reason.SHAPE):
        return NO_DISTANCE
    if result.path == STATUS_FIELD:
        return NO_DISTANCE
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return _tensor_metrics(a, b, s)
    if result.kind is FieldKind.NUMBER:
        assert isinstance(a, int | float) and isinstance(b, int | float)
        abs_error, rel_error = _errors(a, b)
        return Distance(abs_error=abs_error, rel_error=rel_error)
    if isinstance(a, str) and isinstance(b, str):
        a, b = _normalize(a, s.text_match), _normalize(b, s.text_match)
    if isinstance(a, str | bytes) and isinstance(b, str | bytes) and a != b:
        return Distance(common_prefix=_common_prefix(a, b))
    return NO_DISTANCE


_Decision = tuple[bool, Reason]


# --------------------------------------------------------------------------- numbers


def numbers_close(a: float, b: float, abs_tol: float, rel_tol: float) -> bool:
    if a == b:
        return True
    if type(a) is int and type(b) is int:
        return _integers_close(a, b, abs_tol, rel_tol)
    if math.isnan(a) and math.isnan(b):
        return True
    try:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    except OverflowError:  # integers beyond float range that aren't equal
        return False


def _integers_close(a: int, b: int, abs_tol: float, rel_tol: float) -> bool:
    # Integers in model answers are class IDs, token IDs and counts, timestamps: a
    # relative tolerance would call label 123456789 "close" to 123456780, or two
    # timestamps hours apart equal. Only the absolute tolerance applies to them.
    # (Python compares an int with a float exactly, so no rounding happens here.)
    return abs(a - b) <= abs_tol


def _errors(a: float, b: float) -> tuple[float | None, float | None]:
    try:
        if not (math.isfinite(a) and math.isfinite(b)):
            return None, None
        diff = float(abs(a - b))
        scale = float(max(abs(a), abs(b)))
    except OverflowError:
        return None, None
    return diff, (diff / scale if scale else 0.0)


def _decide_numbers(a: float, b: float, s: CompareSettings) -> _Decision:
    if numbers_close(a, b, s.abs_tol, s.rel_tol):
        return True, _AGREE
    finite = math.isfinite(a) and math.isfinite(b)
    return False, (_VALUE if finite else _NON_FINITE)


# --------------------------------------------------------------------------- vectors


def _same_non_finite(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def _rank_key(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _argmax(row: tuple[float, ...]) -> int:
    # max() keeps the first of equal keys: ties go to the lower index, deterministically.
    return max(range(len(row)), key=lambda i: _rank_key(row[i]))


def _top_k(row: tuple[float, ...], k: int) -> set[int]:
    # nlargest is sorted()[:k], which is stable: ties again go to the lower index.
    return set(heapq.nlargest(k, range(len(row)), key=lambda i: _rank_key(row[i])))


def cosine_similarity(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Cosine over positions where both are finite; 1.0 for two zero (or empty) vectors.

    Each vector is first scaled by its largest magnitude (cosine doesn't change) so that
    squares of large scores can't overflow; identical vectors give exactly 1.0.
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if all(x == y for x, y in pairs):
        return 1.0
    scale_a = max((abs(x) for x, _ in pairs), default=0.0)
    scale_b = max((abs(y) for _, y in pairs), default=0.0)
    if scale_a == 0.0 or scale_b == 0.0:
        return 0.0  # exactly one side is the zero vector (both zero returned 1.0 above)
    dot = norm_a = norm_b = 0.0
    for x, y in pairs:
        x, y = x / scale_a, y / scale_b
        dot += x * y
        norm_a += x * x
        norm_b += y * y
    return max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))


def _decide_tensors(a: Tensor, b: Tensor, s: CompareSettings) -> _Decision:
    """Shape, then non-finite entries, then only the configured criterion."""
    if a.shape != b.shape:
        return False, _SHAPE
    x, y = a.values, b.values
    if x == y:
        # Equal element by element (a NaN never equals itself, so none is here): every
        # criterion agrees, and no Python-level loop is needed to say so.
        return True, _AGREE
    # A finite sum (computed in C) means every entry is finite; only an overflow or a
    # non-finite entry sends us through the per-element check.
    all_finite = math.isfinite(sum(x)) and math.isfinite(sum(y))
    if not all_finite and not all(map(_same_non_finite_or_finite, x, y)):
        return False, _NON_FINITE
    criterion = s.vector_match
    if criterion is _TOLERANCE:
        # Entries of a tensor are floats: for finite ones, numbers_close is math.isclose.
        matched = all(map(s.isclose, x, y)) if all_finite else _mismatched_elements(x, y, s) == 0
    elif criterion is _ARGMAX:
        matched = _argmax_agreement(a, b) == 1.0
    elif criterion is _TOPK:
        matched = _topk_agreement(a, b, s.top_k) == 1.0
    else:
        matched = cosine_similarity(x, y) >= s.min_cosine
    return matched, (_AGREE if matched else _VALUE)


def _same_non_finite_or_finite(x: float, y: float) -> bool:
    return (math.isfinite(x) and math.isfinite(y)) or _same_non_finite(x, y)


def _mismatched_elements(x: tuple[float, ...], y: tuple[float, ...], s: CompareSettings) -> int:
    return sum(not numbers_close(p, q, s.abs_tol, s.rel_tol) for p, q in zip(x, y, strict=True))


def _argmax_agreement(a: Tensor, b: Tensor) -> float:
    same = [_argmax(x) == _argmax(y) for x, y in zip(a.rows(), b.rows(), strict=True)]
    # A tensor with no rows (an empty last axis) agrees vacuously.
    return sum(same) / len(same) if same else 1.0


def _topk_agreement(a: Tensor, b: Tensor, top_k: int) -> float:
    k = min(top_k, a.row_length)
    overlaps = [
        len(_top_k(x, k) & _top_k(y, k)) / k for x, y in zip(a.rows(), b.rows(), strict=True)
    ]
    return sum(overlaps) / len(overlaps) if overlaps else 1.0


def _tensor_metrics(a: Tensor, b: Tensor, s: CompareSettings) -> Distance:
    finite = [
        abs(x - y) for x, y in zip(a.values, b.values, strict=True)
        if math.isfinite(x) and math.isfinite(y)
    ]  # fmt: skip
    return Distance(
        max_abs_error=max(finite, default=0.0),
        mismatched_elements=_mismatched_elements(a.values, b.values, s),
        cosine=cosine_similarity(a.values, b.values),
        argmax_agreement=_argmax_agreement(a, b),
        topk_agreement=_topk_agreement(a, b, s.top_k),
    )


# --------------------------------------------------------------------------- text, bytes


def _common_prefix(a: str | bytes, b: str | bytes) -> int:
    # Binary search on slice equality: the comparisons run in C, not per character.
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _normalize(text: str, mode: TextMatch) -> str:
    return " ".join(text.split()) if mode is TextMatch.WHITESPACE else text
