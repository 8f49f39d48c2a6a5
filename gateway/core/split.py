"""Deterministic champion/challenger split.

The rule is published (the README, "How a request is handled") so that other
implementations can reproduce it bit for bit:

    bucket = fnv1a_64(utf8(salt + key)) mod 10000
    challenger  iff  bucket < threshold(challenger_weight)

Because the bucket of a key never changes and the threshold only grows with the weight,
raising the weight can only move keys from champion to challenger, never back.
"""

from __future__ import annotations

import enum
import math

FNV64_OFFSET_BASIS = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF

BUCKETS = 10_000


class Variant(enum.StrEnum):
    CHAMPION = "champion"
    CHALLENGER = "challenger"


def fnv1a_64_python(data: bytes) -> int:
    """64-bit FNV-1a over ``data``: the reference, and what runs without ``fnv-c``."""
    h = FNV64_OFFSET_BASIS
    for byte in data:
        h = ((h ^ byte) * FNV64_PRIME) & _MASK64
    return h


# fnv-c's C loop takes 0.2 us for a 32-character request ID, the Python loop above 2.7
# us: with it the hash was the gateway's largest pure-Python cost per request. The
# tests check both give the same hash for every input they try.
try:
    from fnv_c import fnv1a_64 as _fnv1a_64_c  # type: ignore[import-untyped]
except ImportError:  # installed without its dependencies, or no wheel for this platform
    fnv1a_64 = fnv1a_64_python
else:
    fnv1a_64 = _fnv1a_64_c


def bucket_of(key: str, salt: str = "") -> int:
    """The key's bucket in ``[0, 10000)``."""
    return fnv1a_64((salt + key).encode("utf-8")) % BUCKETS


def weight_problem(weight: object, has_challenger: bool = True) -> str | None:
    """What is wrong with ``weight`` as a route's challenger weight, or None if nothing.

    The one rule for a weight, wherever it comes from (the config file, the admin API, a
    record in the state store): a number (not a boolean: YAML reads "yes" as true, and
    pydantic would take it as 1.0) between 0 and 1, and 0 for a route with no
    challenger, even a weight too small to move one bucket."""
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return f"must be a number between 0 and 1, got {weight!r}"
    if not 0.0 <= weight <= 1.0:  # also refuses NaN
        return f"must be between 0 and 1, got {weight}"
    if weight > 0 and not has_challenger:
        return f"a route without a challenger must have weight 0, got {weight}"
    return None


def threshold(weight: float) -> int:
    """Number of buckets (out of 10000) that go to the challenger.

    ``floor(weight * 10000)``, taken after rounding away binary floating point error so
    that a weight written as 0.29 means 2900 buckets and not 2899
    (``0.29 * 10000 == 2899.9999999999995`` in IEEE 754).
    """
    problem = weight_problem(weight)
    if problem is not None:
        raise ValueError(f"weight {problem}")
    return math.floor(round(weight * BUCKETS, 6))


# Module-level names for the members: ``Variant.CHAMPION`` is a lookup through the enum's
# metaclass, several times slower than a global, and this runs for every request.
CHAMPION = Variant.CHAMPION
CHALLENGER = Variant.CHALLENGER
# The header text of each variant: ``variant.value`` is a property call.
VARIANT_TEXT = {variant: variant.value for variant in Variant}


def choose(bucket: int, challenger_threshold: int) -> Variant:
    """Variant for a bucket, given the threshold from :func:`threshold`."""
    return CHALLENGER if bucket < challenger_threshold else CHAMPION


def parse_override(value: str | None) -> Variant | None:
    """Variant named by an ``X-Gateway-Variant`` request header, or None if it names none."""
    if value is None:
        return None
    try:
        return Variant(value.strip().lower())
    except ValueError:
        return None
