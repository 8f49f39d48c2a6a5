"""POST /api/v1/reload: a good file takes effect, a bad one is refused and changes nothing;
what the new file leaves as it was keeps its runtime state, what it removes is gone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.core.split import bucket_of
from gateway.core.stats import ShadowOutcome
from tests.conftest import StartApp, StartGateway
from tests.shadow_support import Recorder, scrape, settle, tfserving_app
from tests.support import admin_url, gateway_document, named_app, proxy_url


async def _backend(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.post(url, headers={"X-Request-ID": "same-key"}) as response:
        return response.status, await response.json(content_type=None)


async def test_reload_applies_a_good_file_and_refuses_a_bad_one(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    one, two = await start_app(named_app("one")), await start_app(named_app("two"))
    backends = {"one": {"url": one}, "two": {"url": two}}
    routes: list[dict[str, Any]] = [
        {"name": "a", "match": {"path_prefix": "/a"}, "champion": "one", "challenger": "two"},
    ]
    document = gateway_document(backends, routes, state={"path": str(tmp_path / "s.db")})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    reload_url = admin_url(gateway, "/api/v1/reload")

    # A weight set at runtime...
    weight_url = admin_url(gateway, "/api/v1/routes/a/weight")
    async with http.put(weight_url, json={"challenger_weight": 1.0}) as response:
        assert response.status == 200
    assert (await _backend(http, proxy_url(gateway, "/a")))[1]["backend"] == "two"

    # ...outlives a reload that adds a route but leaves that weight alone in the file.
    routes.append({"name": "b", "match": {"path_prefix": "/b"}, "champion": "two"})
    path.write_text(yaml.safe_dump(document))
    async with http.post(reload_url) as response:
        assert response.status == 200
    assert (await _backend(http, proxy_url(gateway, "/b")))[1]["backend"] == "two"
    assert (await _backend(http, proxy_url(gateway, "/a")))[1]["backend"] == "two"

    # A bad file is refused with the problems named, and the running config stays.
    path.write_text(yaml.safe_dump({**document, "routes": [{**routes[0], "champion": "nope"}]}))
    async with http.post(reload_url) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "bad_config"
    assert any("routes[0].champion" in p and "nope" in p for p in error["problems"])
    assert (await _backend(http, proxy_url(gateway, "/b")))[1]["backend"] == "two"
    assert set(gateway.routes) == {"a", "b"}

    # Changing the weight in the file (from the default 0) makes the file win.
    assert bucket_of("same-key") >= 1  # so one bucket for the challenger is not this key's
    routes[0]["split"] = {"challenger_weight": 0.0001}
    routes.pop()
    path.write_text(yaml.safe_dump(document))
    async with http.post(reload_url) as response:
        assert response.status == 200
    assert (await _backend(http, proxy_url(gateway, "/a")))[1]["backend"] == "one"
    status, body = await _backend(http, proxy_url(gateway, "/b"))
    assert status == 404
    assert body["error"]["code"] == "no_route"


def _instance(n: int) -> bytes:
    return orjson.dumps({"instances": [[n, n + 1]]})


async def test_reload_keeps_what_it_leaves_and_drops_what_it_removes(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    one = await start_app(tfserving_app(Recorder()))
    two = await start_app(tfserving_app(Recorder(), shift=0.5))  # disagrees: mismatches
    backends = {"one": {"url": one}, "two": {"url": two}}
    kept = {
        "name": "kept",
        "match": {"path_prefix": "/kept"},
        "champion": "one",
        "challenger": "two",
        "shadow": {"sample_rate": 1.0},
    }
    gone = {"name": "gone", "match": {"path_prefix": "/gone"}, "champion": "one"}
    document = gateway_document(backends, [kept, gone], state={"path": str(tmp_path / "s.db")})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)

    # Weight 0: every request is the champion's, and every one is mirrored.
    for n in range(12):
        status, _ = await _post(
            http, proxy_url(gateway, "/kept/predict"), f"kept-{n}", _instance(n)
        )
        assert status == 200
    for n in range(3):
        status, _ = await _post(
            http, proxy_url(gateway, "/gone/predict"), f"gone-{n}", _instance(n)
        )
        assert status == 200
    await settle(gateway)
    async with http.put(
        admin_url(gateway, "/api/v1/routes/kept/weight"), json={"challenger_weight": 0.25}
    ) as response:
        assert response.status == 200
    route, pools = gateway.routes["kept"], dict(gateway.runtime.pools)
    policy = route.shadow
    assert policy is not None
    outcomes = dict(policy.stats.tally.counts)
    assert sum(outcomes.values()) == 12 and outcomes.get(ShadowOutcome.MISMATCH, 0) > 0
    before = await scrape(http, gateway)
    assert before.total("gateway_requests_total", route="gone") == 3
    assert before.outcomes("kept") == {o.value: n for o, n in outcomes.items()}

    # Reload: "gone" removed, a route added, "kept" and both backends left as they were.
    added = {"name": "added", "match": {"path_prefix": "/added"}, "champion": "two"}
    document["routes"] = [kept, added]
    path.write_text(yaml.safe_dump(document))
    async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
        assert response.status == 200, await response.text()

    assert gateway.routes["kept"] is route and route.shadow is policy
    assert gateway.runtime.pools == pools
    assert all(gateway.runtime.pools[name] is pool for name, pool in pools.items())
    assert dict(policy.stats.tally.counts) == outcomes
    async with http.get(admin_url(gateway, "/api/v1/routes/kept")) as response:
        view = await response.json()
    assert view["challenger_weight"] == 0.25
    assert view["shadow"]["outcomes"] == {o.value: n for o, n in outcomes.items()}
    after = await scrape(http, gateway)
    assert after.matching("gateway_requests_total", route="gone") == []
    assert not any(labels.get("route") == "gone" for _, labels, _ in after.samples)
    assert after.outcomes("kept") == before.outcomes("kept")
    assert after.total("gateway_requests_total", route="kept") == 12
    status, body = await _post(http, proxy_url(gateway, "/gone/predict"), "gone-x", b"{}")
    assert status == 404 and body["error"]["code"] == "no_route"

    # A reload that changes how "kept" matches builds it anew, but what it sends to is
    # the same: its pools, its shadow policy (with the counts so far) and its weight stay.
    kept["match"] = {"path_prefix": "/kept/v2"}
    path.write_text(yaml.safe_dump(document))
    async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
        assert response.status == 200
    rebuilt = gateway.routes["kept"]
    assert rebuilt is not route and rebuilt.shadow is policy
    assert rebuilt.champion is pools["one"] and rebuilt.challenger is pools["two"]
    assert rebuilt.weight == 0.25 and rebuilt.threshold == 2500


async def _post(
    http: aiohttp.ClientSession, url: str, request_id: str, body: bytes
) -> tuple[int, Any]:
    async with http.post(url, data=body, headers={"X-Request-ID": request_id}) as response:
        return response.status, await response.json(content_type=None)


async def test_reload_of_a_gateway_started_without_a_file_is_a_json_409(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    upstream = await start_app(tfserving_app(Recorder()))
    gateway = await start_gateway(
        gateway_document(
            {"one": {"url": upstream}},
            [{"name": "a", "match": {"path_prefix": "/a"}, "champion": "one"}],
        )
    )  # like `gateway demo`: built from a document, not read from a file
    async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "no_config_file"
