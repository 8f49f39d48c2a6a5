"""Token usage read from plain and streamed answers, bounded and without buffering."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import usage as usage_module
from gateway.core.usage import (
    HEAD_BYTES,
    NO_USAGE,
    OPEN_USAGE_BYTES,
    SMALL_ANSWER_BYTES,
    TokenCounts,
    UsageSniffer,
    find_usage,
    usage_from_end,
    usage_of_answer,
    usage_of_answers,
)


def sniff(chunks: list[bytes]) -> TokenCounts:
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
    assert sniff([CHAT]) == (12, 34)


def test_plain_json_split_at_every_byte() -> None:
    for cut in range(1, len(CHAT)):
        assert sniff([CHAT[:cut], CHAT[cut:]]) == (12, 34), cut


def test_streamed_answer_takes_the_last_usage() -> None:
    chunks = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(50)]
    final = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 50}}
    body = sse([*chunks, final])
    assert sniff([body]) == (7, 50)
    # Event by event, as a server streams it.
    parts = [b"data: " + orjson.dumps(e) + b"\n\n" for e in [*chunks, final]] + [
        b"data: [DONE]\n\n"
    ]
    assert sniff(parts) == (7, 50)


def test_answer_without_usage_counts_zero() -> None:
    assert sniff([b'{"predictions": [[0.1, 0.9]]}']) == NO_USAGE
    assert sniff([b"not json at all"]) == NO_USAGE
    assert sniff([]) == NO_USAGE
    assert sniff([b'{"usage": null}']) == NO_USAGE


def test_usage_inside_a_string_is_not_taken() -> None:
    body = orjson.dumps(
        {"text": 'say "usage": {"prompt_tokens": 99}', "usage": {"prompt_tokens": 1}}
    )
    assert find_usage(body) == (1, 0)
    only_in_string = orjson.dumps({"text": '"usage": {"prompt_tokens": 99}'})
    # The escaped quotes inside a JSON string never form the literal "usage" key.
    assert find_usage(only_in_string) is None


@pytest.mark.parametrize(
    "usage",
    [
        b'{"prompt_tokens": 5, "completion_tokens": 2}',  # flat: its end found at once
        b'{"note": "a}b", "prompt_tokens": 5, "completion_tokens": 2}',  # "}" in a string
        b'{"note": "a{b", "prompt_tokens": 5, "completion_tokens": 2}',  # "{" in a string
        b'{"prompt_tokens": 5, "details": {"cached": 1}, "completion_tokens": 2}',  # nested
    ],
)
def test_usage_objects_of_every_shape_are_read_whole(usage: bytes) -> None:
    assert find_usage(b'data: {"choices": [], "usage": ' + usage + b"}\n\n") == (5, 2)
    assert find_usage(b'{"usage": ' + usage) == (5, 2)  # the answer cut off after it


def test_bad_counts_are_zero() -> None:
    assert find_usage(b'{"usage": {"prompt_tokens": -3, "completion_tokens": true}}') == (0, 0)
    assert find_usage(b'{"usage": {"prompt_tokens": "5", "completion_tokens": 2.5}}') == (0, 0)


def test_large_answer_keeps_only_head_and_tail() -> None:
    filler = [b"x" * 1000 for _ in range(500)]  # 500 kB of content
    sniffer = UsageSniffer()
    for chunk in [
        b'{"content": "',
        *filler,
        b'", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
    ]:
        sniffer.feed(chunk)
        assert sniffer.kept_bytes <= HEAD_BYTES + OPEN_USAGE_BYTES
    assert sniffer.usage() == (3, 4)


def test_usage_at_the_start_of_a_large_answer() -> None:
    first = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 6}, "data": "'
    chunks = [first, *(b"y" * 1000 for _ in range(100)), b'"}']
    assert sniff(chunks) == (5, 6)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 4096])
def test_chunking_does_not_matter(chunk_size: int) -> None:
    final = {"choices": [], "usage": {"prompt_tokens": 70, "completion_tokens": 500}}
    body = sse([{"choices": [{"delta": {"content": "a" * 80}}]} for _ in range(300)] + [final])
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    assert sniff(chunks) == (70, 500)


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
    assert sniff([c for c in chunks if c]) == (prompt, completion)


def expected_counts(document: object) -> TokenCounts:
    """What a top-level ``usage`` holds, read from the parsed document (the reference)."""
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return NO_USAGE
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if type(prompt) is int and prompt > 0 else 0,
        completion if type(completion) is int and completion > 0 else 0,
    )


_text = st.sampled_from(["usage", '"usage"', '"usage": {"prompt_tokens": 9}', "}", "\\", "x"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | _text,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["usage", "a", "prompt_tokens", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_counts = st.one_of(st.integers(-3, 10**9), st.none(), st.booleans(), st.just("5"), st.just(2.5))
_usage = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": _counts,
        "completion_tokens": _counts,
        "prompt_tokens_details": _json,
        "total_tokens": _counts,
    },
)


ABSENT = object()


@settings(deadline=None)  # CPU-bound and bounded; a busy CI core must not fail it
@given(
    st.dictionaries(st.sampled_from(["id", "choices", "a", "x"]), _json, max_size=4),
    st.one_of(st.just(ABSENT), _usage, _json),
    st.booleans(),
    st.booleans(),
)
def test_whole_answer_reads_the_top_level_usage(
    members: dict[str, object], usage: object, usage_last: bool, indent: bool
) -> None:
    """The shortcut (parse only a trailing ``usage`` member) agrees with a full parse
    wherever ``usage`` sits, whatever the other members hold, compact or indented."""
    document = dict(members)
    if usage is not ABSENT:
        if usage_last:
            document["usage"] = usage
        else:
            document = {"usage": usage, **members}
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else 0)
    expected = expected_counts(document)
    assert usage_of_answer(body) == expected
    assert usage_of_answer(body + b"\n") == expected
    # Both readers, whichever of them the size picks: small answers are decoded whole,
    # the others read from the end.
    assert usage_from_end(body) == expected
    assert usage_from_end(body + b"\n") == expected


@pytest.mark.parametrize(
    "cut",
    [b'{"usage"', b'{"usage":', b'{"usage":{', b'{"usage":{}', b'{"a": "usage"'],
)
def test_answer_cut_short_after_usage_has_none(cut: bytes) -> None:
    assert usage_of_answer(cut) == NO_USAGE


def test_compact_and_spaced_usage_read_alike() -> None:
    compact = b'{"id":"a","usage":{"prompt_tokens":3,"completion_tokens":4}}'
    spaced = b'{"id": "a", "usage" :\n {"prompt_tokens": 3, "completion_tokens": 4} }\n'
    assert usage_of_answer(compact) == usage_of_answer(spaced) == (3, 4)


def test_whole_answer_with_usage_last_or_not() -> None:
    last = b'{"id": "a", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    first = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "id": "a"}'
    nested = b'{"choices": [{"usage": {"prompt_tokens": 8}}], "usage": null}'
    in_key = b'{"x\\"usage": {"prompt_tokens": 8}}'
    assert usage_of_answer(last) == usage_of_answer(first) == (3, 4)
    assert usage_of_answer(nested) == NO_USAGE
    assert usage_of_answer(b'{"usage": null, "x": {"prompt_tokens": 5}}') == NO_USAGE
    assert usage_of_answer(b'{"usage": 7, "x": {"prompt_tokens": 5}}') == NO_USAGE
    assert orjson.loads(in_key) == {'x"usage': {"prompt_tokens": 8}}
    assert usage_of_answer(in_key) == NO_USAGE
    assert usage_of_answer(b'{"predictions": [[0.1, 0.9]]}') == NO_USAGE


def test_small_answers_are_decoded_whole_without_reading_from_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_called(data: bytes) -> TokenCounts:
        raise AssertionError(f"read from the end: {data!r}")

    monkeypatch.setattr(usage_module, "usage_from_end", not_called)
    assert usage_of_answer(CHAT) == (12, 34)
    assert usage_of_answer(b'{"predictions": [[0.1, 0.9]]}') == NO_USAGE
    assert usage_of_answer(b'{"usage": null}') == NO_USAGE
    assert usage_of_answer(b'{"usage": {"prompt_tokens": -4, "completion_tokens": 2}}') == (0, 2)
    # Duplicate members: the last one counts, as in a full parse.
    assert usage_of_answer(b'{"usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}') == (
        2,
        0,
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"usage": {"prompt_tokens": 2.5, "completion_tokens": 3}}', (0, 3)),  # not an int
        (b'{"usage": {"prompt_tokens": true, "completion_tokens": 3}}', (0, 3)),  # a bool
        (b'{"usage": {"prompt_tokens": null, "completion_tokens": 3}}', (0, 3)),
        (b'data: {"usage": {"prompt_tokens": 0, "completion_tokens": 3}}\n\n', (0, 3)),
        # Python's json.dumps writes NaN; no JSON parser here reads it.
        (b'{"usage": {"prompt_tokens": NaN, "completion_tokens": 3}}', NO_USAGE),
    ],
)
def test_small_answers_msgspec_cannot_read_are_read_from_the_end(
    body: bytes, expected: TokenCounts
) -> None:
    assert len(body) <= SMALL_ANSWER_BYTES
    assert usage_of_answer(body) == usage_from_end(body) == expected


@pytest.mark.parametrize(
    "size", [SMALL_ANSWER_BYTES - 1, SMALL_ANSWER_BYTES, SMALL_ANSWER_BYTES + 1]
)
def test_answers_either_side_of_the_small_bound(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    tail = b'"usage": {"prompt_tokens": 7, "completion_tokens": 8}}'
    head = b'{"text": "'
    body = head + b"x" * (size - len(head) - len(b'", ') - len(tail)) + b'", ' + tail
    assert len(body) == size
    read_from_end: list[bytes] = []

    def recording(data: bytes) -> TokenCounts:
        read_from_end.append(data)
        return usage_from_end(data)

    monkeypatch.setattr(usage_module, "usage_from_end", recording)
    assert usage_of_answer(body) == (7, 8)
    assert read_from_end == ([body] if size > SMALL_ANSWER_BYTES else [])


def test_a_batch_reads_each_answer_in_order() -> None:
    large = orjson.dumps({"text": "x" * SMALL_ANSWER_BYTES, "usage": {"prompt_tokens": 5}})
    batch = [
        CHAT,  # small, decoded whole
        large,  # read from the end
        b'{"usage": {"prompt_tokens": true, "completion_tokens": 3}}',  # msgspec refuses
        sse([{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}]),  # not one object
        b"\x89PNG",  # not JSON
        b"",
    ]
    assert usage_of_answers(batch) == [(12, 34), (5, 0), (0, 3), (1, 2), NO_USAGE, NO_USAGE]
    assert usage_of_answers([]) == []


def openai_stream(tokens: int, prompt: int = 17) -> list[bytes]:
    """An OpenAI chat stream event by event: every chunk says ``"usage":null``
    (``stream_options.include_usage``), the last one before ``[DONE]`` has the counts."""
    events = [
        {"object": "chat.completion.chunk", "choices": [{"delta": {"content": f" t{i}"}}],
         "usage": None}
        for i in range(tokens)
    ]  # fmt: skip
    final = {"object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": prompt, "completion_tokens": tokens,
                       "total_tokens": prompt + tokens}}  # fmt: skip
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in [*events, final]] + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("tokens", [1, 30, 100, 2000])
def test_long_event_stream_counts_exactly_and_keeps_a_few_kilobytes(tokens: int) -> None:
    sniffer = UsageSniffer()
    for event in openai_stream(tokens):
        sniffer.feed(event)
        # An event stream's head is its first event: from the second on it keeps its
        # tail alone (thousands are open at a time).
        assert sniffer.kept_bytes <= OPEN_USAGE_BYTES, sniffer.kept_bytes
    assert sniffer.usage() == (17, tokens)


def test_an_answer_that_is_not_an_event_stream_keeps_its_head() -> None:
    """A JSON answer may carry its usage first, before a long body: its head is kept
    until HEAD_BYTES have come, and the usage found there."""
    body = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}, "text": "' + b"x" * 50_000
    body += b'"}'
    sniffer = UsageSniffer()
    for i in range(0, len(body), 200):
        sniffer.feed(body[i : i + 200])
        if i + 200 < HEAD_BYTES:
            assert sniffer.kept_bytes == i + 200
    assert sniffer.kept_bytes <= OPEN_USAGE_BYTES
    assert sniffer.usage() == (3, 4)


def test_usage_in_the_first_event_of_a_stream_is_kept() -> None:
    first = b'data: {"usage": {"prompt_tokens": 6, "completion_tokens": 7}}\n\n'
    events = [first] + [b'data: {"choices": [], "usage": null}\n\n'] * 200
    assert sniff(events) == (6, 7)


@given(st.integers(0, 400), st.lists(st.integers(1, 700), min_size=1, max_size=60))
@settings(max_examples=150, deadline=None)
def test_any_chunking_of_an_event_stream(tokens: int, sizes: list[int]) -> None:
    body = b"".join(openai_stream(tokens, prompt=5))
    chunks, position, index = [], 0, 0
    while position < len(body):
        size = sizes[index % len(sizes)]
        chunks.append(body[position : position + size])
        position += size
        index += 1
    assert sniff(chunks) == (5, tokens)


@pytest.mark.parametrize("at", range(HEAD_BYTES - 80, HEAD_BYTES, 3))
def test_usage_across_the_end_of_the_head(at: int) -> None:
    """A usage object that starts in the head and ends after it is read whole."""
    usage = b'"usage": {"prompt_tokens": 8, "completion_tokens": 9}'
    start = b'{"a": "' + b"x" * (at - 9) + b'", '
    body = start + usage + b', "b": "' + b"y" * 50_000 + b'"}'
    assert body.index(b'"usage"') == at + 1
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    assert sniff(chunks) == (8, 9)


@pytest.mark.parametrize("at", range(HEAD_BYTES - 20, HEAD_BYTES + 20))
def test_usage_key_cut_at_the_end_of_the_head_of_a_short_answer(at: int) -> None:
    body = b'{"a": "' + b"x" * at + b'", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    assert sniff(chunks) == (1, 2)


def test_a_stream_keeps_nothing_between_its_events() -> None:
    """Past its first event, an event stream whose chunks end between events holds no
    bytes at all: each chunk is read as it comes and let go of."""
    sniffer = UsageSniffer()
    for index, event in enumerate(openai_stream(300)):
        sniffer.feed(event)
        if index >= 1:
            assert sniffer.kept_bytes == 0, index
    assert sniffer.usage() == (17, 300)


def test_a_usage_object_before_later_nulls_still_counts() -> None:
    """The last usage *object* counts, wherever it came: ``"usage": null`` after it, in
    the same chunk or in later ones, leaves it be."""
    real = b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}}\n\n'
    null = b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
    filler = [null] * 200  # past the head, into the part read chunk by chunk
    assert sniff([*filler, real, *filler]) == (4, 5)
    assert sniff([*filler, real + null + null, *filler]) == (4, 5)
    assert sniff([*filler, null + real + null]) == (4, 5)


def test_an_open_usage_object_is_held_only_so_far() -> None:
    """A ``"usage"`` whose object never closes is let go of once it is OPEN_USAGE_BYTES
    long; an earlier complete one still counts."""
    real = b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'
    sniffer = UsageSniffer()
    for chunk in [b"data: {}\n\n", real, b'data: {"usage": {"note": "', *[b"z" * 100] * 100]:
        sniffer.feed(chunk)
        assert sniffer.kept_bytes <= OPEN_USAGE_BYTES
    assert sniffer.usage() == (1, 2)


_TEXT = st.text(alphabet='ab{}[]":, \\u', max_size=30)
_EVENTS = st.one_of(
    st.builds(lambda text: {"choices": [{"delta": {"content": text}}], "usage": None}, _TEXT),
    st.builds(lambda text: {"text": text, "note": '"usage": {"prompt_tokens": 99}'}, _TEXT),
    st.builds(
        lambda p, c: {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}},
        st.integers(0, 10**6), st.integers(0, 10**6),
    ),
    st.builds(
        lambda p, c: {"usage": {"prompt_tokens": p, "details": {"x": [1, {}]},
                                "completion_tokens": c}},
        st.integers(0, 10**6), st.integers(0, 10**6),
    ),
)  # fmt: skip


@given(
    st.lists(_EVENTS, max_size=40),
    st.lists(st.integers(1, 300), min_size=1, max_size=30),
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_read_as_it_comes_equals_read_whole(
    events: list[dict[str, object]], sizes: list[int], spaced: bool
) -> None:
    """However a stream is cut into chunks, reading it chunk by chunk gives the counts
    reading it whole gives: those of its last usage object. Compact JSON as most servers
    write it, or spaced as Python's json.dumps does."""
    padding = [b'data: {"choices": [{"delta": {"content": "pad"}}]}\n\n'] * 200  # past the head
    dumps = (lambda e: json.dumps(e).encode()) if spaced else orjson.dumps
    body = b"".join([*padding, *(b"data: " + dumps(e) + b"\n\n" for e in events)])
    chunks, position, index = [], 0, 0
    while position < len(body):
        chunks.append(body[position : position + sizes[index % len(sizes)]])
        position += sizes[index % len(sizes)]
        index += 1
    assert sniff(chunks) == (find_usage(body) or NO_USAGE)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b'{"usage":{"prompt_tokens":3,"usage"', b':null}}'),
        (b'{"usage":{"prompt_tokens":3,"kind":"usage"', b"}}"),
        (b'{"usage":{"prompt_tokens":3,"meta":{"usage":', b"null}}}"),
    ],
)
def test_a_key_inside_an_open_usage_object_leaves_it_open(first: bytes, second: bytes) -> None:
    """A ``"usage"`` inside a usage object still open at a chunk's end (a nested key, or
    a string) does not take its place as what waits for the next chunk."""
    filler = b"x" * HEAD_BYTES  # the head, let go of at the next chunk
    assert sniff([filler, first, second]) == find_usage(filler + first + second) == (3, 0)


def test_an_open_usage_object_is_not_read_again_for_every_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Trickled byte by byte, an open usage object is read again only when a chunk could
    end it (a closing brace) or start a key, not for every byte."""
    reads = 0
    read = UsageSniffer._read

    def counted(self: UsageSniffer, data: bytes) -> None:
        nonlocal reads
        reads += 1
        read(self, data)

    monkeypatch.setattr(UsageSniffer, "_read", counted)
    usage = b'"usage": {"prompt_tokens": 1234567, "completion_tokens": 7654321}'
    body = b"x" * HEAD_BYTES + b"{" + usage + b"}"
    sniffer = UsageSniffer()
    sniffer.feed(body[:HEAD_BYTES])
    for index in range(HEAD_BYTES, len(body)):
        sniffer.feed(body[index : index + 1])
    assert sniffer.usage() == (1234567, 7654321)
    assert reads <= 20, reads  # the head, the key, quotes, the brace: not every byte
