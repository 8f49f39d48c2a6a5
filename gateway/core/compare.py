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
import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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


class VectorMatch(enum.StrEnum):
    TOLERANCE = "tolerance"
    ARGMAX = "argmax"
    TOPK = "topk"
    COSINE = "cosine"


class TextMatch(enum.StrEnum):
    EXACT = "exact"
    WHITESPACE = "whitespace"


class Reason(enum.StrEnum):
    """Why a field matched or didn't."""

    AGREE = "agree"
    ONLY_CHAMPION = "only_champion"
    ONLY_SHADOW = "only_shadow"
    KIND = "kind"
    SHAPE = "shape"
    NON_FINITE = "non_finite"
    VALUE = "value"


class Missing(enum.Enum):
    """The value of a field on the side that doesn't have it."""

    MISSING = "missing"


MISSING = Missing.MISSING


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Metrics:
    """How far apart two values are; None where a metric doesn't apply."""

    abs_error: float | None = None
    rel_error: float | None = None
    max_abs_error: float | None = None
    mismatched_elements: int | None = None
    cosine: float | None = None
    argmax_agreement: float | None = None  # share of rows with the same argmax
    topk_agreement: float | None = None  # mean |top-k(a) & top-k(b)| / k over rows
    common_prefix: int | None = None  # characters (or bytes) before texts diverge


NO_METRICS = Metrics()


@dataclass(frozen=True, slots=True)
class FieldResult:
    path: str
    kind: FieldKind
    matched: bool
    reason: Reason
    champion: Value | Missing
    shadow: Value | Missing
    metrics: Metrics = NO_METRICS


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


DEFAULT_SETTINGS = CompareSettings()


def compare(
    champion: Answer, shadow: Answer, settings: CompareSettings = DEFAULT_SETTINGS
) -> Comparison:
    status = _compare_status(champion.status, shadow.status)
    if not status.matched:
        return Comparison(Outcome.MISMATCH, (status,))
    left = extract(champion.body, champion.content_type, settings.protocol)
    right = extract(shadow.body, shadow.content_type, settings.protocol)
    bodies = compare_extracted(left, right, settings)
    return Comparison(
        bodies.outcome, (status, *bodies.fields), bodies.champion_protocol, bodies.shadow_protocol
    )


def compare_extracted(
    champion: Extracted, shadow: Extracted, settings: CompareSettings = DEFAULT_SETTINGS
) -> Comparison:
    """Compare two already extracted bodies (no ``@status`` field)."""
    fields = diff_fields(champion.fields, shadow.fields, settings)
    outcome = Outcome.MATCH if all(f.matched for f in fields) else Outcome.MISMATCH
    return Comparison(outcome, fields, champion.protocol, shadow.protocol)


def _compare_status(champion: int, shadow: int) -> FieldResult:
    same = champion == shadow
    reason = Reason.AGREE if same else Reason.VALUE
    return FieldResult(STATUS_FIELD, FieldKind.NUMBER, same, reason, champion, shadow)


def diff_fields(
    champion: Mapping[str, Value], shadow: Mapping[str, Value], settings: CompareSettings
) -> tuple[FieldResult, ...]:
    """One result per field on either side, champion's order first, ignored fields left out."""
    ignored = settings.ignored
    results: list[FieldResult] = []
    for path, value in champion.items():
        if path in ignored:
            continue
        other = shadow.get(path, MISSING)
        if other is MISSING:
            results.append(_one_sided(path, value, Reason.ONLY_CHAMPION))
        else:
            results.append(compare_values(path, value, other, settings))
    for path, other in shadow.items():
        if path not in champion and path not in ignored:
            results.append(_one_sided(path, other, Reason.ONLY_SHADOW))
    return tuple(results)


def _one_sided(path: str, value: Value, reason: Reason) -> FieldResult:
    champion: Value | Missing = value if reason is Reason.ONLY_CHAMPION else MISSING
    shadow: Value | Missing = value if reason is Reason.ONLY_SHADOW else MISSING
    return FieldResult(path, kind_of(value), False, reason, champion, shadow)


def compare_values(path: str, a: Value, b: Value, settings: CompareSettings) -> FieldResult:
    kind = kind_of(a)
    if kind is not kind_of(b):
        return FieldResult(path, kind, False, Reason.KIND, a, b)
    if kind in (FieldKind.NULL, FieldKind.BOOL, FieldKind.OBJECT):
        # Singletons (None, True, False, Empty.OBJECT): identity is equality.
        matched = a is b
        reason, metrics = (Reason.AGREE if matched else Reason.VALUE), NO_METRICS
    elif isinstance(a, int | float) and isinstance(b, int | float):
        matched, reason, metrics = _compare_numbers(a, b, settings)
    elif isinstance(a, Tensor) and isinstance(b, Tensor):
        matched, reason, metrics = _compare_tensors(a, b, settings)
    elif isinstance(a, str) and isinstance(b, str):
        matched, reason, metrics = _compare_text(a, b, settings.text_match)
    elif isinstance(a, bytes) and isinstance(b, bytes):
        matched, reason, metrics = _compare_exact(a, b)
    else:  # pragma: no cover - kind_of() covers every Value
        raise TypeError(f"cannot compare {a!r} with {b!r}")
    return FieldResult(path, kind, matched, reason, a, b, metrics)


_Decision = tuple[bool, Reason, Metrics]


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


def _compare_numbers(a: float, b: float, s: CompareSettings) -> _Decision:
    abs_error, rel_error = _errors(a, b)
    metrics = Metrics(abs_error=abs_error, rel_error=rel_error)
    if numbers_close(a, b, s.abs_tol, s.rel_tol):
        return True, Reason.AGREE, metrics
    finite = math.isfinite(a) and math.isfinite(b)
    return False, (Reason.VALUE if finite else Reason.NON_FINITE), metrics


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


def _compare_tensors(a: Tensor, b: Tensor, s: CompareSettings) -> _Decision:
    if a.shape != b.shape:
        return False, Reason.SHAPE, NO_METRICS
    non_finite_agree = True
    max_abs = 0.0
    outside = 0
    for x, y in zip(a.values, b.values, strict=True):
        if math.isfinite(x) and math.isfinite(y):
            max_abs = max(max_abs, abs(x - y))
        elif not _same_non_finite(x, y):
            non_finite_agree = False
        if not numbers_close(x, y, s.abs_tol, s.rel_tol):
            outside += 1
    rows_a, rows_b = a.rows(), b.rows()
    k = min(s.top_k, a.row_length)
    argmax_same = [_argmax(x) == _argmax(y) for x, y in zip(rows_a, rows_b, strict=True)]
    overlaps = [len(_top_k(x, k) & _top_k(y, k)) / k for x, y in zip(rows_a, rows_b, strict=True)]
    metrics = Metrics(
        max_abs_error=max_abs,
        mismatched_elements=outside,
        cosine=cosine_similarity(a.values, b.values),
        # A tensor with no rows (an empty last axis) agrees vacuously.
        argmax_agreement=sum(argmax_same) / len(argmax_same) if argmax_same else 1.0,
        topk_agreement=sum(overlaps) / len(overlaps) if overlaps else 1.0,
    )
    if not non_finite_agree:
        return False, Reason.NON_FINITE, metrics
    matched = _vector_criterion(s, metrics)
    return matched, (Reason.AGREE if matched else Reason.VALUE), metrics


def _vector_criterion(s: CompareSettings, m: Metrics) -> bool:
    if s.vector_match is VectorMatch.TOLERANCE:
        return m.mismatched_elements == 0
    if s.vector_match is VectorMatch.ARGMAX:
        return m.argmax_agreement == 1.0
    if s.vector_match is VectorMatch.TOPK:
        return m.topk_agreement == 1.0
    return m.cosine is not None and m.cosine >= s.min_cosine


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


def _compare_text(a: str, b: str, mode: TextMatch) -> _Decision:
    if mode is TextMatch.WHITESPACE:
        a, b = " ".join(a.split()), " ".join(b.split())
    return _compare_exact(a, b)


def _compare_exact(a: str | bytes, b: str | bytes) -> _Decision:
    if a == b:
        return True, Reason.AGREE, NO_METRICS
    return False, Reason.VALUE, Metrics(common_prefix=_common_prefix(a, b))
