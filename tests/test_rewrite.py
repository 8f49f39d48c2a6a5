"""A backend's ``path_prefix`` and ``model_name``: what it is sent when it names things
differently from the route (``gateway.pipeline.rewrite``, ``gateway.core.jsonbody``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.jsonbody import ModelScan, Scan, replace_model
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(30)


# --- the body -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # model early: only its value changes, byte for byte
        (
            b'{"model": "llama", "messages": [{"x": 1.50}]}',
            b'{"model": "v2", "messages": [{"x": 1.50}]}',
        ),
        (b'{"stream":true,"model":"llama","n":1}', b'{"stream":true,"model":"v2","n":1}'),
        (
            b'{"model": "a", "n": 123456789012345678901234567890}',
            b'{"model": "v2", "n": 123456789012345678901234567890}',
        ),
        # model after a nested member: re-encoded, equal as JSON
        (b'{"messages": [1, 2], "model": "llama"}', b'{"messages":[1,2],"model":"v2"}'),
        # given twice (once escaped): one model, the new one
        (b'{"model": "a", "mod\\u0065l": "b"}', b'{"model":"v2"}'),
    ],
)
def test_the_model_is_replaced(body: bytes, expected: bytes) -> None:
    assert replace_model(body, "v2") == expected


@pytest.mark.parametrize("body", [b"[1, 2]", b'{"prompt": "x"}', b'{"model": 7}', b"not json", b""])
def test_a_body_without_a_string_model_is_left_alone(body: bytes) -> None:
    assert replace_model(body, "v2") is None


@given(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=5,
    ),
    st.text(min_size=1, max_size=10),
    st.booleans(),
)
def test_replacing_the_model_changes_the_model_and_nothing_else(
    document: dict[str, Any], name: str, model_first: bool
) -> None:
    document.pop("model", None)
    document = {"model": "old", **document} if model_first else {**document, "model": "old"}
    replaced = replace_model(orjson.dumps(document), name)
    assert replaced is not None
    assert orjson.loads(replaced) == {**document, "model": name}


def test_the_scan_finds_an_early_model_before_the_body_is_whole() -> None:
    body = b'{"stream": true, "model": "m\\u00e9", "messages": [' + b'{"c": "x"},' * 1000
    for size in range(1, len(body)):
        found = ModelScan().feed(body[:size])
        if found is not Scan.MORE:
            break
    assert found is Scan.FOUND
    assert size < 40  # decided from the first members, not the rest
    scan = ModelScan()
    assert scan.feed(body) is Scan.FOUND and scan.model == "mé"
    # A nested member first: only the whole body can tell.
    assert ModelScan().feed(b'{"messages": [{"role": "user"') is Scan.WHOLE
    assert ModelScan().feed(b'["model"]') is Scan.WHOLE
    empty = ModelScan()
    assert empty.feed(b'{"stream": false}') is Scan.FOUND and empty.model is None


# --- through a gateway ----------------------------------------------------------------


class Received:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.raw_path, dict(request.headers), body))
        return web.json_response({"ok": True})


def rewrite_document(champion: str, challenger: str, **route: Any) -> dict[str, Any]:
    backends = {
        "v1": {"url": champion},
        "v2": {
            "url": challenger,
            "path_prefix": "/v1/models/sentiment-v2",
            "model_name": "sentiment-v2",
        },
    }
    return gateway_document(
        backends,
        [
            {
                "name": "sentiment",
                "match": {"path_prefix": "/v1/models/sentiment"},
                "champion": "v1",
                "challenger": "v2",
                "split": {"challenger_weight": 0.0, "allow_override": True},
                **route,
            }
        ],
    )


async def test_a_backend_gets_its_own_path_and_model_name(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = Received(), Received()
    gateway = await start_gateway(
        rewrite_document(
            await start_app(catch_all_app(one.handle)), await start_app(catch_all_app(two.handle))
        )
    )
    body = b'{"model": "sentiment", "instances": ["I love this"]}'
    for variant in ("champion", "challenger"):
        async with http.post(
            proxy_url(gateway, "/v1/models/sentiment:predict?v=1"),
            data=body,
            headers={"X-Gateway-Variant": variant},
        ) as response:
            assert response.status == 200
            assert response.headers["X-Gateway-Variant"] == variant
    # The champion's backend names nothing differently: it gets the request as sent.
    path, headers, got = one.requests[0]
    assert (path, got) == ("/v1/models/sentiment:predict?v=1", body)
    # The challenger's gets its own path and model, with a Content-Length that fits.
    path, headers, got = two.requests[0]
    assert path == "/v1/models/sentiment-v2:predict?v=1"
    assert got == b'{"model": "sentiment-v2", "instances": ["I love this"]}'
    assert int(headers["Content-Length"]) == len(got)


async def test_a_streamed_body_is_rewritten_too(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    one, two = Received(), Received()
    gateway = await start_gateway(
        rewrite_document(
            await start_app(catch_all_app(one.handle)), await start_app(catch_all_app(two.handle))
        )
    )

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(50):
            await asyncio.sleep(0)
            yield b"[0.5, 0.25],"
        yield b'[1]], "model": "sentiment"}'

    async with http.post(
        proxy_url(gateway, "/v1/models/sentiment/infer"),
        data=chunked(),
        headers={"X-Gateway-Variant": "challenger"},
    ) as response:
        assert response.status == 200
    path, headers, got = two.requests[0]
    assert path == "/v1/models/sentiment-v2/infer"
    assert orjson.loads(got)["model"] == "sentiment-v2"
    assert len(orjson.loads(got)["inputs"]) == 51
    assert int(headers["Content-Length"]) == len(got)


async def test_the_shadow_gets_its_own_backends_names(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """The shadow is sent the client's body and path, rewritten for its own backend, not
    what the champion's backend was sent."""
    one, two = Received(), Received()
    document = rewrite_document(
        await start_app(catch_all_app(one.handle)),
        await start_app(catch_all_app(two.handle)),
        shadow={"target": "v2", "sample_rate": 1.0},
    )
    document["backends"]["v1"]["model_name"] = "sentiment-v1"
    gateway = await start_gateway(document)
    async with http.post(
        proxy_url(gateway, "/v1/models/sentiment:predict"), data=b'{"model": "sentiment"}'
    ) as response:
        assert response.status == 200
    await wait_until(lambda: len(two.requests) == 1, "the shadow call")
    assert one.requests[0][0] == "/v1/models/sentiment:predict"
    assert one.requests[0][2] == b'{"model": "sentiment-v1"}'
    path, headers, got = two.requests[0]
    assert headers["X-Gateway-Shadow"] == "1"
    assert path == "/v1/models/sentiment-v2:predict"
    assert got == b'{"model": "sentiment-v2"}'
    async with http.get(admin_url(gateway, "/api/v1/routes/sentiment/shadow")) as response:
        report = await response.json()
    assert report["outcomes"]["match"] == 1  # both answered {"ok": true}
