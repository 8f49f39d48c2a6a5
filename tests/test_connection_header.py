"""Which headers a Connection header names hop-by-hop: parsed once per distinct value."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline import forward
from gateway.pipeline.forward import connection_listed


def listed_by_the_rfc(values: list[str]) -> frozenset[str]:
    """RFC 9110 7.6.1, written out plainly: comma-separated tokens, any case, trimmed."""
    names: set[str] = set()
    for value in values:
        for token in value.split(","):
            name = token.strip().lower()
            if name and name not in ("close", "keep-alive"):
                names.add(name)
    return frozenset(names)


_TOKENS = st.sampled_from(["keep-alive", "Keep-Alive", "close", "X-Hop", "x-hop", "TE", ""])
_VALUES = st.lists(
    st.lists(_TOKENS, min_size=1, max_size=4).map(lambda tokens: " , ".join(tokens)),
    max_size=3,
)


@given(st.lists(_VALUES, min_size=1, max_size=5))
def test_same_names_as_the_rfc_on_first_and_repeated_values(calls: list[list[str]]) -> None:
    for values in calls + calls:  # the second time round, single values come from memory
        assert connection_listed(values) == listed_by_the_rfc(values)


def test_remembered_values_are_bounded() -> None:
    bound = forward._listed_in.cache_parameters()["maxsize"]
    assert bound is not None
    for n in range(3 * bound):
        assert connection_listed([f"x-hop-{n}"]) == {f"x-hop-{n}"}
        assert forward._listed_in.cache_info().currsize <= bound
    assert connection_listed(["keep-alive"]) == frozenset()


class _Answer:
    """What copy_response_headers reads of an upstream answer: its header list."""

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers


def test_listed_headers_are_dropped_before_and_after_their_connection_header() -> None:
    from multidict import CIMultiDict

    from gateway.core.split import Variant
    from gateway.pipeline.forward import copy_response_headers

    answer = _Answer(
        [
            ("X-Before", "1"),
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive, x-before"),
            ("X-After", "2"),
            ("Keep-Alive", "timeout=5"),
            ("connection", "X-AFTER"),
            ("X-Kept", "a"),
            ("X-Kept", "b"),
        ]
    )
    headers: CIMultiDict[str] = CIMultiDict()
    copy_response_headers(answer, headers, "X-Request-ID", "rid", Variant.CHALLENGER)  # type: ignore[arg-type]
    assert list(headers.items()) == [
        ("Content-Type", "application/json"),
        ("X-Kept", "a"),
        ("X-Kept", "b"),
        ("X-Request-ID", "rid"),
        ("X-Gateway-Variant", "challenger"),
    ]
