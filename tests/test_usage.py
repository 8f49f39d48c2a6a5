"""Token usage read from plain and streamed answers, bounded and without buffering."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.usage import HEAD_BYTES, NO_USAGE, TAIL_BYTES, Usage, UsageSniffer, find_usage


def sniff(chunks: list[bytes]) -> Usage:
    sniffer = UsageSniffer()
    for chunk in chunks:
        sniffer.feed(chunk)
    return sniffer.usage()


CHAT = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }
)  # fmt: skip


def sse(events: list[dict[str, object]]) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return body + b"data: [DONE]\n\n"


def test_plain_json_answer() -> None:
    assert sniff([CHAT]) == Usage(12, 34)


def test_plain_json_split_at_every_byte() -> None:
    for cut in range(1, len(CHAT)):
        assert sniff([CHAT[:cut], CHAT[cut:]]) == Usage(12, 34), cut


def test_streamed_answer_takes_the_last_usage() -> None:
    chunks = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(50)]
    final = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 50}}
    body = sse([*chunks, final])
    assert sniff([body]) == Usage(7, 50)
    # Event by event, as a server streams it.
    parts = [b"data: " + orjson.dumps(e) + b"\n\n" for e in [*chunks, final]] + [
        b"data: [DONE]\n\n"
    ]
    assert sniff(parts) == Usage(7, 50)


def test_answer_without_usage_counts_zero() -> None:
    assert sniff([b'{"predictions": [[0.1, 0.9]]}']) == NO_USAGE
    assert sniff([b"not json at all"]) == NO_USAGE
    assert sniff([]) == NO_USAGE
    assert sniff([b'{"usage": null}']) == NO_USAGE


def test_usage_inside_a_string_is_not_taken() -> None:
    body = orjson.dumps(
        {"text": 'say "usage": {"prompt_tokens": 99}', "usage": {"prompt_tokens": 1}}
    )
    assert find_usage(body) == Usage(1, 0)
    only_in_string = orjson.dumps({"text": '"usage": {"prompt_tokens": 99}'})
    # The escaped quotes inside a JSON string never form the literal "usage" key.
    assert find_usage(only_in_string) is None


def test_bad_counts_are_zero() -> None:
    assert find_usage(b'{"usage": {"prompt_tokens": -3, "completion_tokens": true}}') == Usage(0, 0)
    assert find_usage(b'{"usage": {"prompt_tokens": "5", "completion_tokens": 2.5}}') == Usage(0, 0)


def test_large_answer_keeps_only_head_and_tail() -> None:
    filler = [b"x" * 1000 for _ in range(500)]  # 500 kB of content
    sniffer = UsageSniffer()
    for chunk in [
        b'{"content": "',
        *filler,
        b'", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
    ]:
        sniffer.feed(chunk)
        assert sniffer.kept_bytes <= HEAD_BYTES + TAIL_BYTES + 2000
    assert sniffer.usage() == Usage(3, 4)


def test_usage_at_the_start_of_a_large_answer() -> None:
    first = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 6}, "data": "'
    chunks = [first, *(b"y" * 1000 for _ in range(100)), b'"}']
    assert sniff(chunks) == Usage(5, 6)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 4096])
def test_chunking_does_not_matter(chunk_size: int) -> None:
    final = {"choices": [], "usage": {"prompt_tokens": 70, "completion_tokens": 500}}
    body = sse([{"choices": [{"delta": {"content": "a" * 80}}]} for _ in range(300)] + [final])
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    assert sniff(chunks) == Usage(70, 500)


@given(st.integers(0, 10**7), st.integers(0, 10**7), st.lists(st.integers(1, 64), max_size=20))
def test_any_split_of_a_json_answer(prompt: int, completion: int, cuts: list[int]) -> None:
    body = orjson.dumps(
        {"x": [1, 2], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    )
    chunks, position = [], 0
    for cut in cuts:
        chunks.append(body[position : position + cut])
        position += cut
    chunks.append(body[position:])
    assert sniff([c for c in chunks if c]) == Usage(prompt, completion)
