"""The split contract: FNV-1a 64, mod 10000, monotone in the weight."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.split import (
    BUCKETS,
    Variant,
    bucket_of,
    choose,
    fnv1a_64,
    fnv1a_64_python,
    parse_override,
    threshold,
)

# Published in docs/split.md so other implementations can check themselves.
# (key, salt, fnv1a_64(utf8(salt + key)), bucket)
TEST_VECTORS = [
    ("", "", 0xCBF29CE484222325, 6037),
    ("a", "", 0xAF63DC4C8601EC8C, 1996),
    ("foobar", "", 0x85944171F73967E8, 6968),
    ("user-42", "", 0x32C6D7A54D35DACB, 7419),
    ("req-0001", "", 0xA7D8DABE7EBD38ED, 8509),
    ("550e8400-e29b-41d4-a716-446655440000", "", 0xFBB0538EE83A5048, 4584),
    ("héllo", "", 0xA35FF71F960240E0, 2816),
    ("42", "user-", 0x32C6D7A54D35DACB, 7419),
]


@pytest.mark.parametrize(("key", "salt", "digest", "bucket"), TEST_VECTORS)
def test_vectors(key: str, salt: str, digest: int, bucket: int) -> None:
    assert fnv1a_64((salt + key).encode("utf-8")) == digest
    assert fnv1a_64_python((salt + key).encode("utf-8")) == digest
    assert bucket_of(key, salt) == bucket
    assert digest % BUCKETS == bucket


def test_fnv_reference_values() -> None:
    # The FNV reference suite's values for FNV-1a 64 (Fowler/Noll/Vo test vectors).
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_the_gateway_hashes_in_c_when_fnv_c_is_installed() -> None:
    # fnv-c is a dependency: without it the split silently costs 2.5 us more a request.
    import fnv_c  # type: ignore[import-untyped]

    assert fnv1a_64 is fnv_c.fnv1a_64


@given(st.binary(max_size=300))
def test_the_c_hash_is_the_reference_hash(data: bytes) -> None:
    assert fnv1a_64(data) == fnv1a_64_python(data)


@given(st.text(max_size=80), st.text(max_size=20))
def test_the_c_hash_is_the_reference_hash_for_keys(key: str, salt: str) -> None:
    data = (salt + key).encode("utf-8")
    assert fnv1a_64(data) == fnv1a_64_python(data)


def test_the_published_table_matches_the_test_vectors() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "docs" / "split.md").read_text(encoding="utf-8")
    for key, salt, digest, bucket in TEST_VECTORS:
        row = f"| `{key}` | `{salt}` | `0x{digest:016x}` | {bucket} |"
        assert row in readme, f"docs/split.md is missing the test vector row {row}"


@pytest.mark.parametrize(
    ("weight", "expected"),
    [(0.0, 0), (0.0001, 1), (0.01, 100), (0.1, 1000), (0.29, 2900), (0.5, 5000),
     (0.57, 5700), (0.99999, 9999), (0.999999, 9999), (1.0, 10000)],
)  # fmt: skip
def test_threshold(weight: float, expected: int) -> None:
    assert threshold(weight) == expected


@pytest.mark.parametrize("weight", [-0.01, 1.01, float("nan")])
def test_threshold_rejects_out_of_range(weight: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold(weight)


def test_choose_boundaries() -> None:
    assert choose(0, 0) is Variant.CHAMPION
    assert choose(0, 1) is Variant.CHALLENGER
    assert choose(999, 1000) is Variant.CHALLENGER
    assert choose(1000, 1000) is Variant.CHAMPION
    assert choose(9999, 10000) is Variant.CHALLENGER


@given(st.text(), st.text(max_size=8))
def test_bucket_is_deterministic_and_in_range(key: str, salt: str) -> None:
    first = bucket_of(key, salt)
    assert 0 <= first < BUCKETS
    assert bucket_of(key, salt) == first


@given(
    st.text(),
    st.floats(min_value=0, max_value=1),
    st.floats(min_value=0, max_value=1),
)
def test_raising_the_weight_never_moves_a_key_back_to_the_champion(
    key: str, w1: float, w2: float
) -> None:
    low, high = sorted((w1, w2))
    bucket = bucket_of(key)
    if choose(bucket, threshold(low)) is Variant.CHALLENGER:
        assert choose(bucket, threshold(high)) is Variant.CHALLENGER
    assert threshold(low) <= threshold(high)


@pytest.mark.parametrize("weight", [0.01, 0.1, 0.5])
def test_observed_share_is_within_one_point_of_the_weight(weight: float) -> None:
    n = 100_000
    cut = threshold(weight)
    challenger = sum(bucket_of(f"req-{i}") < cut for i in range(n))
    assert abs(challenger / n - weight) <= 0.01


@pytest.mark.parametrize("weight", [0.01, 0.1, 0.5])
def test_observed_share_with_uuid_keys(weight: float) -> None:
    import uuid

    n = 100_000
    cut = threshold(weight)
    # Deterministic UUID-shaped keys, as most clients send.
    keys = (str(uuid.UUID(int=i * 0x9E3779B97F4A7C15 % (1 << 128))) for i in range(n))
    challenger = sum(bucket_of(k) < cut for k in keys)
    assert abs(challenger / n - weight) <= 0.01


def test_salt_reshuffles_keys() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    cut = threshold(0.5)
    plain = {k for k in keys if bucket_of(k) < cut}
    salted = {k for k in keys if bucket_of(k, "experiment-7") < cut}
    # Independent halves overlap in about a quarter of keys, not all or none.
    overlap = len(plain & salted) / len(keys)
    assert 0.2 < overlap < 0.3


@pytest.mark.parametrize(
    ("header", "expected"),
    [("champion", Variant.CHAMPION), ("Challenger", Variant.CHALLENGER),
     (" challenger ", Variant.CHALLENGER), ("canary", None), ("", None), (None, None)],
)  # fmt: skip
def test_parse_override(header: str | None, expected: Variant | None) -> None:
    assert parse_override(header) is expected
