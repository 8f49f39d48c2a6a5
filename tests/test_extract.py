"""Protocol-aware extraction: realistic answers of each protocol, detection, paths."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.extract import (
    Empty,
    FieldKind,
    PathMatcher,
    Protocol,
    Tensor,
    extract,
    flatten,
    key_path,
    kind_of,
    pattern_regex,
    reassemble_openai_stream,
)

JSON_CT = "application/json"
SSE_CT = "text/event-stream"


def body(doc: Any) -> bytes:
    return orjson.dumps(doc)


def sse(*chunks: Any, done: bool = True, newline: str = "\n") -> bytes:
    """An SSE body the way OpenAI and vLLM write it: one ``data:`` line per chunk."""
    events = [f"data: {json.dumps(c, separators=(',', ':'))}" for c in chunks]
    if done:
        events.append("data: [DONE]")
    return "".join(e + newline + newline for e in events).encode()


# --------------------------------------------------------------------------- OIP

# A KServe v2 answer of a batch-of-2 classifier with a label output (Triton shape).
OIP_ANSWER = {
    "model_name": "sentiment",
    "model_version": "2",
    "id": "5f1c7c2e-6d0e-4c1a-9a3e-1d2b3c4d5e6f",
    "parameters": {"batched": True},
    "outputs": [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [2, 3],
            "data": [0.1, 0.7, 0.2, 0.8, 0.15, 0.05],
        },
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["positive", "negative"]},
    ],
}


def test_oip_outputs_become_shaped_tensors_and_identity_is_dropped() -> None:
    got = extract(body(OIP_ANSWER), JSON_CT)
    assert got.protocol is Protocol.OIP
    assert dict(got.fields) == {
        "$.outputs[0].name": "probabilities",
        "$.outputs[0].datatype": "FP32",
        "$.outputs[0].data": Tensor((0.1, 0.7, 0.2, 0.8, 0.15, 0.05), (2, 3)),
        "$.outputs[1].name": "label",
        "$.outputs[1].datatype": "BYTES",
        "$.outputs[1].data[0]": "positive",
        "$.outputs[1].data[1]": "negative",
        "$.outputs[1].shape": "[2]",
        "$.parameters.batched": True,
    }
    assert got.vectors == frozenset({"$.outputs[0].data"})


def test_oip_nested_data_and_null_parameters() -> None:
    # Some servers nest data instead of sending it flat, and KServe writes null parameters.
    doc = {
        "model_name": "iris",
        "model_version": None,
        "id": "x",
        "parameters": None,
        "outputs": [
            {
                "name": "scores",
                "shape": [1, 3],
                "datatype": "FP64",
                "parameters": None,
                "data": [[0.9, 0.05, 0.05]],
            }
        ],
    }
    got = extract(body(doc), JSON_CT)
    assert got.protocol is Protocol.OIP
    assert dict(got.fields) == {
        "$.outputs[0].name": "scores",
        "$.outputs[0].datatype": "FP64",
        "$.outputs[0].data": Tensor((0.9, 0.05, 0.05), (1, 3)),
    }


def test_oip_shape_that_contradicts_the_data_is_replaced_by_the_data_shape() -> None:
    doc = {"outputs": [{"name": "y", "datatype": "INT64", "shape": [4], "data": [1, 2, 3]}]}
    tensor = extract(body(doc)).fields["$.outputs[0].data"]
    assert tensor == Tensor((1.0, 2.0, 3.0), (3,))


def test_oip_bool_output_is_compared_per_element() -> None:
    doc = {"outputs": [{"name": "y", "datatype": "BOOL", "shape": [2], "data": [True, False]}]}
    fields = extract(body(doc)).fields
    assert fields["$.outputs[0].data[0]"] is True
    assert fields["$.outputs[0].data[1]"] is False
    assert fields["$.outputs[0].shape"] == "[2]"


# --------------------------------------------------------------------------- TF Serving


def test_tfserving_row_format_batch_is_one_2d_tensor() -> None:
    got = extract(body({"predictions": [[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]]}), JSON_CT)
    assert got.protocol is Protocol.TFSERVING
    assert dict(got.fields) == {
        "$.predictions": Tensor((0.1, 0.7, 0.2, 0.8, 0.1, 0.1), (2, 3)),
    }


def test_tfserving_row_format_with_named_outputs() -> None:
    doc = {
        "predictions": [
            {"scores": [0.2, 0.8], "classes": ["cat", "dog"]},
            {"scores": [0.6, 0.4], "classes": ["cat", "dog"]},
        ]
    }
    fields = extract(body(doc)).fields
    assert fields["$.predictions[0].scores"] == Tensor((0.2, 0.8), (2,))
    assert fields["$.predictions[1].classes[1]"] == "dog"
    assert len(fields) == 6


def test_tfserving_columnar_outputs() -> None:
    doc = {"outputs": {"scores": [[0.2, 0.8]], "embedding": [[1, 2], [3, 4]]}}
    got = extract(body(doc))
    assert got.protocol is Protocol.TFSERVING
    assert got.fields["$.outputs.scores"] == Tensor((0.2, 0.8), (1, 2))
    assert got.fields["$.outputs.embedding"] == Tensor((1.0, 2.0, 3.0, 4.0), (2, 2))
    # A columnar list output isn't mistaken for OIP's list of output objects.
    assert extract(body({"outputs": [[1.0, 2.0]]})).protocol is Protocol.TFSERVING


# --------------------------------------------------------------------------- OpenAI

CHAT_ANSWER = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_44709d6fcb",
}

CHAT_FIELDS = {
    "$.choices[0].message.role": "assistant",
    "$.choices[0].message.content": "Hello! How can I assist you today?",
    "$.choices[0].finish_reason": "stop",
    "$.usage.prompt_tokens": 19,
    "$.usage.completion_tokens": 10,
    "$.usage.total_tokens": 29,
    "$.usage.prompt_tokens_details.cached_tokens": 0,
    "$.usage.prompt_tokens_details.audio_tokens": 0,
}


def test_openai_chat_keeps_content_and_usage_and_drops_the_envelope() -> None:
    got = extract(body(CHAT_ANSWER), "application/json; charset=utf-8")
    assert got.protocol is Protocol.OPENAI
    assert dict(got.fields) == CHAT_FIELDS
    assert kind_of(got.fields["$.usage.total_tokens"]) is FieldKind.NUMBER


def test_openai_chat_choices_are_ordered_by_index() -> None:
    doc = {
        "object": "chat.completion",
        "choices": [
            {"index": 1, "message": {"role": "assistant", "content": "B"}, "finish_reason": "stop"},
            {"index": 0, "message": {"role": "assistant", "content": "A"}, "finish_reason": "stop"},
        ],
    }
    fields = extract(body(doc)).fields
    assert fields["$.choices[0].message.content"] == "A"
    assert fields["$.choices[1].message.content"] == "B"


TOOL_ANSWER = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1699896916,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{\n"location": "Boston, MA",\n"unit": "celsius"\n}',
                        },
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
}

TOOL_FIELDS = {
    "$.choices[0].message.role": "assistant",
    "$.choices[0].message.content": "",
    "$.choices[0].message.tool_calls[0].type": "function",
    "$.choices[0].message.tool_calls[0].function.name": "get_current_weather",
    "$.choices[0].message.tool_calls[0].function.arguments.location": "Boston, MA",
    "$.choices[0].message.tool_calls[0].function.arguments.unit": "celsius",
    "$.choices[0].finish_reason": "tool_calls",
    "$.usage.prompt_tokens": 82,
    "$.usage.completion_tokens": 17,
    "$.usage.total_tokens": 99,
}


def test_openai_tool_calls_compare_parsed_arguments_without_call_ids() -> None:
    assert dict(extract(body(TOOL_ANSWER)).fields) == TOOL_FIELDS


def test_openai_tool_call_arguments_that_are_not_json_stay_text() -> None:
    doc = json.loads(json.dumps(TOOL_ANSWER))
    doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "{broken"
    fields = extract(body(doc)).fields
    assert fields["$.choices[0].message.tool_calls[0].function.arguments"] == "{broken"


COMPLETION_ANSWER = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "meta-llama/Llama-3.1-8B",
    "choices": [
        {
            "text": "\n\nThis is indeed a test",
            "index": 0,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

COMPLETION_FIELDS = {
    "$.choices[0].text": "\n\nThis is indeed a test",
    "$.choices[0].finish_reason": "length",
    "$.usage.prompt_tokens": 5,
    "$.usage.completion_tokens": 7,
    "$.usage.total_tokens": 12,
}


def test_openai_completion() -> None:
    got = extract(body(COMPLETION_ANSWER), JSON_CT)
    assert got.protocol is Protocol.OPENAI
    assert dict(got.fields) == COMPLETION_FIELDS


def test_openai_embeddings_are_vectors() -> None:
    doc = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.0023, -0.0093, 0.0158], "index": 0}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    got = extract(body(doc))
    assert got.protocol is Protocol.OPENAI
    assert dict(got.fields) == {
        "$.data[0].embedding": Tensor((0.0023, -0.0093, 0.0158), (3,)),
        "$.usage.prompt_tokens": 8,
        "$.usage.total_tokens": 8,
    }


# --------------------------------------------------------------------------- streams


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


CHAT_STREAM_CHUNKS = [
    chat_chunk({"role": "assistant", "content": "", "refusal": None}),
    chat_chunk({"content": "Hello!"}),
    chat_chunk({"content": " How can I"}),
    chat_chunk({"content": " assist you today?"}),
    chat_chunk({}, finish="stop"),
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        },
    },
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_streamed_chat_reassembles_to_the_non_streamed_fields(newline: str) -> None:
    got = extract(sse(*CHAT_STREAM_CHUNKS, newline=newline), SSE_CT)
    assert got.protocol is Protocol.OPENAI
    assert dict(got.fields) == CHAT_FIELDS


def test_stream_is_detected_without_content_type_and_tolerates_comments() -> None:
    raw = b": keep-alive\n\n" + sse(*CHAT_STREAM_CHUNKS).replace(b"data: ", b"data:")
    got = extract(raw, "")
    assert dict(got.fields) == CHAT_FIELDS


def test_stream_without_done_marker_or_final_blank_line_keeps_its_content() -> None:
    raw = sse(*CHAT_STREAM_CHUNKS, done=False).rstrip(b"\n")
    assert dict(extract(raw, SSE_CT).fields) == CHAT_FIELDS


def test_streamed_tool_call_fragments_reassemble() -> None:
    fragments = ['{"', "location", '":"', "Boston, MA", '","unit":"celsius"}']
    chunks = [
        chat_chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                        "type": "function",
                        "function": {"name": "get_current_weather", "arguments": ""},
                    }
                ],
                "refusal": None,
            }
        ),
        *(
            chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            for part in fragments
        ),
        chat_chunk({}, finish="tool_calls"),
        {
            "choices": [],
            "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
        },
    ]
    assert dict(extract(sse(*chunks), SSE_CT).fields) == TOOL_FIELDS


def test_streamed_completion_with_usage_in_the_last_chunk() -> None:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "meta-llama/Llama-3.1-8B",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    raw = sse(
        chunk("\n\nThis"),
        chunk(" is indeed"),
        chunk(" a test", finish="length"),
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        },
    )
    assert dict(extract(raw, SSE_CT).fields) == COMPLETION_FIELDS


def test_stream_with_several_choices_keeps_them_apart() -> None:
    def chunk(index: int, text: str) -> dict[str, Any]:
        return {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}

    doc = reassemble_openai_stream(sse(chunk(1, "b1"), chunk(0, "a1"), chunk(1, "b2")))
    assert doc is not None
    assert [c["message"]["content"] for c in doc["choices"]] == ["a1", "b1b2"]


def test_continuous_usage_stats_keep_the_last_usage() -> None:
    first = chat_chunk({"role": "assistant", "content": "Hi"})
    first["usage"] = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    last = chat_chunk({"content": " there"}, finish="stop")
    last["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    fields = extract(sse(first, last), SSE_CT).fields
    assert fields["$.choices[0].message.content"] == "Hi there"
    assert fields["$.usage.completion_tokens"] == 2


def test_stream_error_event_is_content() -> None:
    raw = sse(chat_chunk({"content": "Hel"}), {"error": {"message": "overloaded", "code": 503}})
    fields = extract(raw, SSE_CT).fields
    assert fields["$.error.message"] == "overloaded"


@pytest.mark.parametrize(
    "raw",
    [
        b"data: not json\n\n",
        b'data: {"event": "tick"}\n\n',
        b"event: ping\n\n",
    ],
)
def test_streams_that_are_not_openai_compare_as_bytes(raw: bytes) -> None:
    got = extract(raw, SSE_CT)
    assert got.protocol is Protocol.BYTES
    assert dict(got.fields) == {"$": raw}


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    finish=st.sampled_from(["stop", "length"]),
)
def test_any_chunking_of_a_streamed_text_gives_the_non_streamed_fields(
    text: str, cuts: list[int], finish: str
) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    chunks = [chat_chunk({"role": "assistant", "content": ""})]
    chunks += [chat_chunk({"content": p}) for p in pieces]
    chunks.append(chat_chunk({}, finish=finish))
    whole = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        ],
    }
    assert dict(extract(sse(*chunks), SSE_CT).fields) == dict(extract(body(whole)).fields)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (OIP_ANSWER, Protocol.OIP),
        ({"predictions": [1.0]}, Protocol.TFSERVING),
        ({"outputs": {"y": [1.0]}}, Protocol.TFSERVING),
        (CHAT_ANSWER, Protocol.OPENAI),
        (COMPLETION_ANSWER, Protocol.OPENAI),
        ({"object": "chat.completion", "choices": []}, Protocol.OPENAI),
        ({"choices": ["a", "b"]}, Protocol.JSON),  # choices, but not OpenAI's
        ({"outputs": [{"name": "y"}]}, Protocol.TFSERVING),  # no data: not an OIP output
        ({"error": "model not loaded"}, Protocol.JSON),
        ([1, 2, 3], Protocol.JSON),
        (3.5, Protocol.JSON),
    ],
)
def test_auto_detection(doc: Any, expected: Protocol) -> None:
    assert extract(body(doc), JSON_CT).protocol is expected


def test_forced_protocol_falls_back_to_json_for_a_body_of_another_shape() -> None:
    error = body({"error": "model not loaded", "id": "r1"})
    got = extract(error, JSON_CT, Protocol.OIP)
    assert got.protocol is Protocol.JSON
    assert dict(got.fields) == {"$.error": "model not loaded", "$.id": "r1"}


def test_forced_json_keeps_the_envelope_fields() -> None:
    fields = extract(body(CHAT_ANSWER), JSON_CT, Protocol.JSON).fields
    assert fields["$.id"] == CHAT_ANSWER["id"]
    assert fields["$.created"] == CHAT_ANSWER["created"]
    assert fields["$.choices[0].message.annotations"] == Tensor((), (0,))


def test_forced_bytes() -> None:
    raw = body(CHAT_ANSWER)
    assert dict(extract(raw, JSON_CT, Protocol.BYTES).fields) == {"$": raw}


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"positive", "text/plain"),
        (b"123", "text/plain"),  # JSON-looking text that isn't declared as JSON
        (b"{not json", JSON_CT),
        (b"", ""),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image/png"),
        (b'{"a": "\xff"}', JSON_CT),  # invalid UTF-8
    ],
)
def test_bodies_that_are_not_json_are_bytes(raw: bytes, content_type: str) -> None:
    got = extract(raw, content_type)
    assert got.protocol is Protocol.BYTES
    assert dict(got.fields) == {"$": raw}


def test_undeclared_document_is_still_read_as_json() -> None:
    assert extract(b'{"predictions": [1]}', "text/plain").protocol is Protocol.TFSERVING


def test_python_nan_and_infinity_literals_are_read() -> None:
    raw = b'{"predictions": [NaN, Infinity, -Infinity, 1.5]}'
    tensor = extract(raw, JSON_CT).fields["$.predictions"]
    assert isinstance(tensor, Tensor)
    assert math.isnan(tensor.values[0])
    assert tensor.values[1:] == (math.inf, -math.inf, 1.5)


# --------------------------------------------------------------------------- flattening


def flat(doc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    flatten(doc, "$", out)
    return out


def test_flatten_leaves_and_special_keys() -> None:
    doc = {"a": {}, "b": [], "c": [[1, 2], [3]], "d": [1, "x"], "e": [True, False], "f-g": 1}
    assert flat(doc) == {
        "$.a": Empty.OBJECT,
        "$.b": Tensor((), (0,)),
        "$.c[0]": Tensor((1.0, 2.0), (2,)),  # ragged: rows separately
        "$.c[1]": Tensor((3.0,), (1,)),
        "$.d[0]": 1,
        "$.d[1]": "x",
        "$.e[0]": True,  # booleans are not numbers
        "$.e[1]": False,
        '$["f-g"]': 1,
    }


def test_flatten_keeps_document_order() -> None:
    assert list(flat({"z": 1, "a": {"y": 2, "b": 3}, "m": 4})) == ["$.z", "$.a.y", "$.a.b", "$.m"]


def test_deep_nesting_does_not_hit_the_recursion_limit() -> None:
    depth = 1000  # orjson's own limit is 1024
    raw = b'{"a":' * depth + b"1" + b"}" * depth
    fields = extract(raw, JSON_CT).fields
    assert fields == {"$" + ".a" * depth: 1}


def test_tensor_rows_cut_along_the_last_axis() -> None:
    t = Tensor((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), (2, 3))
    assert t.rows() == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)]
    assert Tensor((), (2, 0)).rows() == []


# --------------------------------------------------------------------------- path patterns


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("$.id", "$.id", True),
        ("$.id", "$.idx", False),  # a pattern stops at a segment boundary
        ("$.usage", "$.usage.prompt_tokens", True),  # and covers what is below it
        ("$.choices[*].finish_reason", "$.choices[3].finish_reason", True),
        ("$.choices[*].finish_reason", "$.choices[3].text", False),
        ("$.choices[1].text", "$.choices[10].text", False),
        ("$.*.created", "$.meta.created", True),
        ("$.*.created", '$["x-y"].created', True),
        ("$.*_tokens", "$.prompt_tokens", True),
        ("$.*_tokens", "$.prompt_tokens_details", False),
        ("$.**.id", "$.id", True),
        ("$.**.id", "$.choices[0].message.tool_calls[2].id", True),
        ("$.**.id", "$.choices[0].identity", False),
        ('$["model-name"]', '$["model-name"]', True),
        ('$["id"]', "$.id", True),  # a quoted identifier is the dotted key
        ("$.model-name", '$["model-name"]', True),
        ("$", "$.anything", True),
    ],
)
def test_path_patterns(pattern: str, path: str, expected: bool) -> None:
    assert (path in PathMatcher((pattern,))) is expected


@pytest.mark.parametrize("bad", ["id", "$.", "$[x]", '$["unterminated]', "$.a..b", "$[-1]"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        pattern_regex(bad)


def test_empty_matcher_matches_nothing() -> None:
    assert "$.id" not in PathMatcher(())


keys = st.text(min_size=0, max_size=8)


@settings(max_examples=100, deadline=None)
@given(segments=st.lists(keys | st.integers(min_value=0, max_value=50), max_size=5))
def test_every_rendered_path_is_a_pattern_matching_itself_and_below(
    segments: list[str | int],
) -> None:
    path = "$"
    for segment in segments:
        path = f"{path}[{segment}]" if isinstance(segment, int) else key_path(path, segment)
    matcher = PathMatcher((path,))
    assert path in matcher
    assert key_path(path, "child") in matcher
    assert f"{path}[0]" in matcher
    assert key_path(path, "child") not in PathMatcher((key_path(path, "chil"),))


# --------------------------------------------------------------------------- robustness

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["choices", "delta", "message", "text", "outputs", "data", "index"])
            | st.text(max_size=6),
            children,
            max_size=4,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(doc=json_values, protocol=st.sampled_from(list(Protocol)))
def test_extraction_never_fails_and_tensors_are_consistent(doc: Any, protocol: Protocol) -> None:
    for raw in (body(doc), sse(doc), sse({"choices": [doc]})):
        got = extract(raw, "", protocol)
        for value in got.fields.values():
            if isinstance(value, Tensor):
                assert math.prod(value.shape) == len(value.values)


def test_lone_surrogates_from_the_fallback_decoder_do_not_break_paths() -> None:
    raw = b'{"\\ud800": [NaN], "ok": "\\udfff"}'
    fields = extract(raw, JSON_CT).fields
    (path,) = [p for p in fields if p != "$.ok"]
    assert path in PathMatcher((path,))
    assert fields["$.ok"] == "\udfff"
