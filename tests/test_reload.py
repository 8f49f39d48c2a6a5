"""POST /api/v1/reload: a good file takes effect, a bad one is refused and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.core.split import bucket_of
from tests.conftest import StartApp, StartGateway
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
