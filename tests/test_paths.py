"""Path confinement: normalisation (``gateway.core.paths``), request-target forms
(``gateway.pipeline.target``), prefix matching at segment boundaries, and the same
through a real gateway, whose backend must only ever see paths under the route's prefix."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.paths import BadPath, normalise_path, prefix_matches, replace_prefix
from gateway.pipeline.route import RouteMatcher, Router
from gateway.pipeline.target import parse_target
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app
from tests.helpers.raw import RawConnections, request
from tests.support import gateway_document

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/v1/models/a", "/v1/models/a"),
        ("/v1/models/a/../b", "/v1/models/b"),
        ("/v1/./models/./a", "/v1/models/a"),
        ("/v1/models/%61", "/v1/models/a"),  # unreserved: decoded
        ("/v1/%2e%2E/x", "/x"),  # encoded dots are dots
        ("/v1/models/a%3apredict", "/v1/models/a%3Apredict"),  # reserved: kept, uppercased
        ("/v1/%7Euser/%41-%5f", "/v1/~user/A-_"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a//b", "/a//b"),  # not merged: only dot segments are resolved
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a/..b/c.", "/a/..b/c."),  # dots inside a segment are a name
    ],
)
def test_paths_are_normalised(raw: str, normal: str) -> None:
    assert normalise_path(raw) == normal
    assert normalise_path(normal) == normal  # idempotent


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("/..", "climbs above"),
        ("/a/../..", "climbs above"),
        ("/a/%2e%2e/%2E%2E/x", "climbs above"),
        ("/a%2Fb", "encoded slash"),
        ("/a%2fb", "encoded slash"),
        ("/a%5Cb", "encoded backslash"),
        ("/a\\b", "may not contain"),
        ("/a%zz", "malformed"),
        ("/a%4", "malformed"),
        ("/a%", "malformed"),
        ("/a b", "may not contain ' '"),
        ("/a\x00", "may not contain"),
        ("/a#frag", "may not contain '#'"),
        ("relative", "start with '/'"),
    ],
)
def test_paths_that_cannot_be_normalised_are_refused(raw: str, why: str) -> None:
    with pytest.raises(BadPath, match=why):
        normalise_path(raw)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "%2e", "%2E%2e", "", "c%41"]), max_size=8))
def test_a_normalised_path_never_leaves_the_root_or_keeps_a_dot_segment(parts: list[str]) -> None:
    raw = "/" + "/".join(parts)
    try:
        normal = normalise_path(raw)
    except BadPath:
        return
    segments = normal.split("/")
    assert normal.startswith("/")
    assert "." not in segments and ".." not in segments
    assert normalise_path(normal) == normal


def test_request_targets_other_than_origin_form_are_refused() -> None:
    assert parse_target("/v1/x?q=%2F..").path == "/v1/x"
    assert parse_target("/v1/x?q=%2F..").upstream == "/v1/x?q=%2F.."  # query untouched
    assert parse_target("/v1/a/../x?q").upstream == "/v1/x?q"
    assert "absolute-form" in (parse_target("http://evil/v1/x").problem or "")
    assert "authority-form" in (parse_target("evil:443").problem or "")
    assert "climbs above" in (parse_target("/../etc/passwd").problem or "")


def test_prefixes_match_at_segment_boundaries() -> None:
    assert prefix_matches("/v2/models/iris", "/v2/models/iris")
    assert prefix_matches("/v2/models/iris", "/v2/models/iris/infer")
    assert not prefix_matches("/v2/models/iris", "/v2/models/iris-v1")
    assert not prefix_matches("/v2/models/iris", "/v2/models/irisx/infer")
    # TF Serving's verb suffix: ":" is a boundary too.
    assert prefix_matches("/v1/models/sentiment", "/v1/models/sentiment:predict")
    # A prefix ending in "/" matches what follows it.
    assert prefix_matches("/", "/anything")
    assert prefix_matches("/v1/", "/v1/x") and not prefix_matches("/v1/", "/v1")


def test_the_router_matches_at_segment_boundaries() -> None:
    router = Router(
        [
            RouteMatcher("/v2/models/iris", "iris"),
            RouteMatcher("/v2/models/iris-v1", "iris-v1"),
            RouteMatcher("/v1/models/sentiment", "sentiment"),
            RouteMatcher("/", "fallback"),
        ]
    )
    assert router.select("/v2/models/iris/infer", {}) == "iris"
    assert router.select("/v2/models/iris", {}) == "iris"
    assert router.select("/v2/models/iris-v1/infer", {}) == "iris-v1"
    assert router.select("/v2/models/iris-v2/infer", {}) == "fallback"  # not "iris"
    assert router.select("/v1/models/sentiment:predict", {}) == "sentiment"
    assert router.select("/v1/models/sentimental", {}) == "fallback"
    assert Router([RouteMatcher("/a", "a")]).select("/ab", {}) is None


def test_a_backend_prefix_replaces_what_the_route_matched() -> None:
    assert replace_prefix("/v1/models/s:predict", "/v1/models/s", "/v1/models/s-v2") == (
        "/v1/models/s-v2:predict"
    )
    assert replace_prefix("/v2/models/iris/infer", "/v2/models/iris", "/models/i") == (
        "/models/i/infer"
    )
    assert replace_prefix("/v1/chat", "/v1/chat", "/") == "/"
    assert replace_prefix("/x/y", "/", "/api") == "/api/x/y"
    assert replace_prefix("/v1/x", "/v1/", "/v2/") == "/v2/x"


# --- through a gateway ----------------------------------------------------------------


async def confined_gateway(
    start_app: StartApp, start_gateway: StartGateway
) -> tuple[Any, list[str]]:
    """Routes /public and /v2/models/iris on one backend, which records every path it
    is sent (and has other paths a client must not reach: /secret, /v2/models/iris-v1)."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"path": request.raw_path})

    upstream = await start_app(catch_all_app(record))
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": upstream}},
            [
                {"name": "public", "match": {"path_prefix": "/public"}, "champion": "one"},
                {"name": "iris", "match": {"path_prefix": "/v2/models/iris"}, "champion": "one"},
            ],
        )
    )
    return gateway, seen


async def test_a_client_cannot_leave_a_routes_prefix(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway, seen = await confined_gateway(start_app, start_gateway)
    cases = {
        # target: (status, what the backend sees, or None when it sees nothing)
        "/public/a": (200, "/public/a"),
        "/public/./a/../b?x=1": (200, "/public/b?x=1"),  # normalised, and sent normalised
        "/public/%61": (200, "/public/a"),
        "/public/../secret": (404, None),  # normalised to /secret: no route
        "/public/%2e%2e/secret": (404, None),
        "/public/%2E%2e%2Fsecret": (400, None),  # an encoded slash
        "/public%2F..%2Fsecret": (400, None),
        "/public/..%5Csecret": (400, None),
        "/public/../../secret": (400, None),  # above the root
        "/v2/models/iris/infer": (200, "/v2/models/iris/infer"),
        "/v2/models/iris-v1/infer": (404, None),  # the prefix trap
        "http://backend.internal/secret": (400, None),  # absolute-form
        "http://gateway.test/public/a": (400, None),
    }
    for target, (status, upstream_path) in cases.items():
        seen.clear()
        conn = await raw.open(gateway.proxy_port)
        await conn.send(request("GET", target))
        answer = await conn.answer()
        assert answer.status == status, target
        if status >= 400:
            code = {400: "bad_request", 404: "no_route"}[status]
            assert answer.json()["error"]["code"] == code, target
        assert seen == ([upstream_path] if upstream_path else []), target


async def test_options_asterisk_is_answered_and_connect_is_refused(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    gateway, seen = await confined_gateway(start_app, start_gateway)
    conn = await raw.open(gateway.proxy_port)
    await conn.send(request("OPTIONS", "*"))
    answer = await conn.answer()
    assert answer.status == 200 and "POST" in answer.headers["allow"]
    await conn.send(request("GET", "/public/x"))  # the connection carries on
    assert (await conn.answer()).status == 200
    conn = await raw.open(gateway.proxy_port)
    await conn.send(b"CONNECT backend.internal:443 HTTP/1.1\r\nHost: backend.internal:443\r\n\r\n")
    answer = await conn.answer()
    assert answer.status == 400 and answer.json()["error"]["code"] == "bad_request"
    assert await conn.closed_within(2.0) is not None
    assert seen == ["/public/x"]
