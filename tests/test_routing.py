"""Route selection (``gateway.pipeline.route``): pure, no sockets."""

from __future__ import annotations

from gateway.pipeline.route import PATH_CACHE_SIZE, RouteMatcher, Router


def router() -> Router[str]:
    return Router(
        [
            RouteMatcher("/v1", "v1-anything"),
            RouteMatcher("/v1/chat", "chat-llama", model="llama"),
            RouteMatcher("/v1/chat", "chat-default"),
            RouteMatcher("/v1/chat", "chat-canary", header_name="x-canary", header_value="1"),
            RouteMatcher("/v2/models/a", "a"),
        ]
    )


def test_longest_prefix_first_with_shorter_ones_as_fallbacks() -> None:
    r = router()
    match = r.match("/v1/chat/completions")
    assert [[m.target for m in g.matchers] for g in match.groups] == [
        ["chat-llama", "chat-canary", "chat-default"],  # more conditions first, then order
        ["v1-anything"],
    ]
    assert match.needs_body  # a /v1/chat route matches on the body's model
    assert not r.match("/v1/embeddings").needs_body
    assert r.match("/v3").groups == ()
    assert r.select("/v1/chat/completions", {}, "llama") == "chat-llama"
    assert r.select("/v1/chat/completions", {"x-canary": "1"}, "other") == "chat-canary"
    assert r.select("/v1/chat/completions", {}, None) == "chat-default"
    assert r.select("/v2/models/a:predict", {}, None) == "a"
    assert r.select("/v2/models/b:predict", {}, None) is None
    # A longer prefix whose routes all decline hands the request to a shorter one.
    fallback = Router(
        [RouteMatcher("/v1", "any"), RouteMatcher("/v1/chat", "llama", model="llama")]
    )
    assert fallback.select("/v1/chat/completions", {}, "other") == "any"
    assert fallback.select("/v1/chat/completions", {}, "llama") == "llama"


def test_only_route_when_the_path_alone_decides() -> None:
    r = router()
    assert r.match("/v2/models/a:predict").only == "a"
    # A longer prefix with conditions comes first: headers or the body decide.
    assert r.match("/v1/chat/completions").only is None
    # The longest prefix's routes are all unconditional: its first one takes everything,
    # however many shorter prefixes also match.
    assert r.match("/v1/embeddings").only == "v1-anything"
    assert r.match("/v3").only is None
    canary = RouteMatcher("/m", "canary", header_name="x", header_value="1")
    assert Router([RouteMatcher("/m", "plain"), canary]).match("/m").only is None
    # Whenever there is an only route, it is what the groups would pick for any request.
    for path in ("/v2/models/a:predict", "/v1/embeddings", "/v1"):
        match = r.match(path)
        assert match.only is not None
        for headers, model in (({}, None), ({"x-canary": "1"}, "llama")):
            walked = [g.select(headers, model) for g in match.groups]
            assert next(t for t in walked if t is not None) == match.only
            assert r.select(path, headers, model) == match.only


def test_remembered_matches_equal_fresh_ones_and_stay_bounded() -> None:
    r, fresh = router(), router()
    paths = [
        f"/v1/chat/{i}" if i % 3 else f"/v2/models/a{i}" for i in range(PATH_CACHE_SIZE * 2 + 7)
    ]
    for path in paths + paths[::-1]:
        assert r.match(path) == fresh._match(path)
        assert len(r._matches) <= PATH_CACHE_SIZE
    assert r.match("/v1/chat/1") is r.match("/v1/chat/1")  # the same object when remembered
