"""The admin listener (DESIGN section 3): token rule, bad bodies, route views, and a weight
PUT that changes routing on the very next request. Real sockets, real upstreams."""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.core.split import bucket_of
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import named_app
from tests.support import admin_url, gateway_document, proxy_url

TOKEN = "s3cret-token"
SALT = "admin-test"


def key_in_buckets(low: int, high: int, salt: str = SALT) -> str:
    """A request ID whose bucket is in ``[low, high)``."""
    for i in itertools.count():
        key = f"req-{i}"
        if low <= bucket_of(key, salt) < high:
            return key
    raise AssertionError("unreachable")


async def start_two_variant_gateway(
    start_app: StartApp, start_gateway: StartGateway, token: str = "", weight: float = 0.0
) -> Gateway:
    v1 = await start_app(named_app("model-v1"))
    v2 = await start_app(named_app("model-v2"))
    v3 = await start_app(named_app("model-v3"))
    document = gateway_document(
        {"model-v1": {"url": v1}, "model-v2": {"url": v2}, "model-v3": {"url": v3}},
        [
            {
                "name": "model",
                "match": {"path_prefix": "/v1/models/model"},
                "champion": "model-v1",
                "challenger": "model-v2",
                "split": {"challenger_weight": weight, "salt": SALT},
                "canary": {"initial_weight": 0.05, "max_weight": 0.4},
            },
            {
                "name": "solo",
                "match": {"path_prefix": "/v1/models/solo"},
                "champion": "model-v3",
                "shadow": {"target": "model-v1", "sample_rate": 0.5},
            },
        ],
        admin={"token": token},
    )
    return await start_gateway(document)


async def json_of(response: aiohttp.ClientResponse) -> Any:
    assert response.content_type == "application/json", await response.text()
    return await response.json()


def assert_error(body: Any, code: str | None = None) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, body


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- token rule ----------------------------------------------------------------------------

API_CALLS = [
    ("GET", "/api/v1/routes", None, 200),
    ("GET", "/api/v1/routes/model", None, 200),
    ("PUT", "/api/v1/routes/model/weight", {"challenger_weight": 0.5}, 200),
    ("GET", "/api/v1/routes/no-such-route", None, 404),
    ("GET", "/api/v1/no-such-thing", None, 404),
]
WRONG_AUTH = [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": TOKEN},
    {"Authorization": "Basic czNjcmV0LXRva2VuOg=="},
    {"X-Admin-Token": TOKEN},
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"), API_CALLS, ids=[f"{c[0]} {c[1]}" for c in API_CALLS]
)
async def test_api_needs_the_token(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, token=TOKEN)
    for headers in WRONG_AUTH:
        async with http.request(method, admin_url(gateway, path), json=body, headers=headers) as r:
            assert r.status == 401, headers
            assert_error(await json_of(r), "unauthorized")
    assert gateway.routes["model"].weight == 0.0
    async with http.request(method, admin_url(gateway, path), json=body, headers=auth()) as r:
        assert r.status == status
        await json_of(r)


async def test_right_token_is_accepted_and_put_applies(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, token=TOKEN)
    url = admin_url(gateway, "/api/v1/routes/model/weight")
    async with http.put(url, json={"challenger_weight": 0.5}, headers=auth()) as r:
        assert r.status == 200
        assert (await json_of(r))["challenger_weight"] == 0.5
    assert gateway.routes["model"].weight == 0.5


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_health_and_metrics_stay_open_with_a_token(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, path: str
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, token=TOKEN)
    async with http.get(admin_url(gateway, path)) as r:
        assert r.status == 200
        await r.read()


async def test_no_token_configured_means_open_api(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway)
    async with http.get(admin_url(gateway, "/api/v1/routes")) as r:
        assert r.status == 200


# --- bad bodies ----------------------------------------------------------------------------

BAD_BODIES = [
    (b"{not json", "bad_json"),
    (b"", "bad_json"),
    (b'{"challenger_weight": 0.2', "bad_json"),
    (b"[0.2]", None),
    (b"0.2", None),
    (b'"0.2"', None),
    (b"null", None),
    (b"{}", None),
    (b'{"weight": 0.2}', None),
    (b'{"challenger_weight": 0.2, "extra": 1}', None),
    (b'{"challenger_weight": "0.2"}', None),
    (b'{"challenger_weight": null}', None),
    (b'{"challenger_weight": true}', None),
    (b'{"challenger_weight": false}', None),
    (b'{"challenger_weight": [0.2]}', None),
    (b'{"challenger_weight": 1.5}', "bad_weight"),
    (b'{"challenger_weight": -0.1}', "bad_weight"),
    (b'{"challenger_weight": 2}', "bad_weight"),
    (b'{"challenger_weight": 1.0000001}', "bad_weight"),
]


@pytest.mark.parametrize(("body", "code"), BAD_BODIES, ids=lambda v: repr(v))
async def test_bad_weight_body_is_400_json(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    body: bytes,
    code: str | None,
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, weight=0.3)
    url = admin_url(gateway, "/api/v1/routes/model/weight")
    async with http.put(url, data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        error = await json_of(r)
    assert_error(error, code)
    if code == "bad_weight":
        assert "challenger_weight" in error["error"]["message"]
        number = body.decode().split(": ")[1].rstrip("}")
        assert number in error["error"]["message"]
    assert gateway.routes["model"].weight == 0.3
    assert gateway.routes["model"].threshold == 3000


@pytest.mark.parametrize("weight", [0, 0.0, 1, 1.0, 0.29])
async def test_weight_bounds_are_accepted(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, weight: float
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, weight=0.3)
    url = admin_url(gateway, "/api/v1/routes/model/weight")
    async with http.put(url, json={"challenger_weight": weight}) as r:
        assert r.status == 200
        view = await json_of(r)
    assert view["challenger_weight"] == weight
    assert view["split"]["challenger_buckets"] == round(weight * 10000)
    assert gateway.routes["model"].weight == weight


async def test_weight_on_route_without_challenger(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway)
    url = admin_url(gateway, "/api/v1/routes/solo/weight")
    async with http.put(url, json={"challenger_weight": 0.1}) as r:
        assert r.status == 409
        assert_error(await json_of(r))
    async with http.put(url, json={"challenger_weight": 0}) as r:
        assert r.status == 200
    assert gateway.routes["solo"].weight == 0


# --- 404s ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/routes/nope", 404),
        ("PUT", "/api/v1/routes/nope/weight", 404),
        ("GET", "/nope", 404),
        ("GET", "/api/v1/nope", 404),
        ("GET", "/api/v2/routes", 404),
        ("DELETE", "/api/v1/routes/model", 405),
        ("POST", "/healthz", 405),
    ],
)
async def test_unknown_things_get_json_errors(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    status: int,
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, token=TOKEN)
    body = {"challenger_weight": 0.1} if method == "PUT" else None
    async with http.request(method, admin_url(gateway, path), json=body, headers=auth()) as r:
        assert r.status == status
        assert_error(await json_of(r))


async def test_unknown_route_error_names_it(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway)
    async with http.get(admin_url(gateway, "/api/v1/routes/nope")) as r:
        body = await json_of(r)
    assert r.status == 404
    assert "nope" in body["error"]["message"]


# --- views ---------------------------------------------------------------------------------


def assert_contains(actual: Any, expected: Any, where: str = "") -> None:
    """``expected``'s keys are all in ``actual`` with those values; more keys may exist
    (later issues add canary decisions and shadow counters)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing from {actual!r}"
            assert_contains(actual[key], value, f"{where}.{key}")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


MODEL_VIEW = {
    "name": "model",
    "match": {"path_prefix": "/v1/models/model"},
    "champion": "model-v1",
    "challenger": "model-v2",
    "challenger_weight": 0.25,
    "split": {
        "key": "request_id",
        "salt": SALT,
        "allow_override": False,
        "challenger_buckets": 2500,
    },
    "canary": {"state": "idle"},
}
SOLO_VIEW = {
    "name": "solo",
    "match": {"path_prefix": "/v1/models/solo"},
    "champion": "model-v3",
    "challenger": None,
    "challenger_weight": 0.0,
    "shadow": {"target": "model-v1", "sample_rate": 0.5},
    "canary": None,
}


async def test_route_views(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, weight=0.25)
    async with http.get(admin_url(gateway, "/api/v1/routes")) as r:
        assert r.status == 200
        listing = await json_of(r)
    assert isinstance(listing, dict) and isinstance(listing["routes"], list)
    assert [route["name"] for route in listing["routes"]] == ["model", "solo"]
    assert listing["state"]["backend"] == "embedded"
    assert listing["state"]["status"] == "ok"
    assert_contains(listing["routes"][0], MODEL_VIEW)
    assert_contains(listing["routes"][1], SOLO_VIEW)
    for name, expected in (("model", MODEL_VIEW), ("solo", SOLO_VIEW)):
        async with http.get(admin_url(gateway, f"/api/v1/routes/{name}")) as r:
            assert r.status == 200
            view = await json_of(r)
        # The single view adds the state store's health to the listing's entry.
        assert view.pop("state")["status"] == "ok"
        assert view == listing["routes"][[route["name"] for route in listing["routes"]].index(name)]
        assert_contains(view, expected)


async def test_readyz_and_healthz_when_running(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway)
    async with http.get(admin_url(gateway, "/readyz")) as r:
        assert r.status == 200
        assert (await json_of(r))["status"] == "ready"
    async with http.get(admin_url(gateway, "/healthz")) as r:
        assert r.status == 200
        assert (await json_of(r))["status"] == "ok"


# --- a weight PUT changes routing on the very next request -----------------------------------


async def test_weight_put_applies_to_the_next_request(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_two_variant_gateway(start_app, start_gateway, token=TOKEN)
    # Keys right below and right above the 0.2 cut, and one on 0.29's last bucket
    # (0.29 * 10000 is 2899.999... in binary floating point; the cut must still be 2900).
    moves_at_020 = key_in_buckets(1990, 2000)
    stays_at_020 = key_in_buckets(2000, 2010)
    last_of_029 = key_in_buckets(2899, 2900)

    async def backend_for(key: str) -> str:
        url = proxy_url(gateway, "/v1/models/model:predict")
        async with http.post(url, json={"instances": [1]}, headers={"X-Request-ID": key}) as r:
            assert r.status == 200
            assert r.headers["X-Request-ID"] == key
            body = await r.json()
            expected_variant = {"model-v1": "champion", "model-v2": "challenger"}[body["backend"]]
            assert r.headers["X-Gateway-Variant"] == expected_variant
            return str(body["backend"])

    async def put_weight(weight: float) -> None:
        url = admin_url(gateway, "/api/v1/routes/model/weight")
        async with http.put(url, json={"challenger_weight": weight}, headers=auth()) as r:
            assert r.status == 200, await r.text()

    keys = (moves_at_020, stays_at_020, last_of_029)
    assert [await backend_for(k) for k in keys] == ["model-v1"] * 3
    await put_weight(0.199)
    assert [await backend_for(k) for k in keys] == ["model-v1"] * 3
    await put_weight(0.2)
    assert [await backend_for(k) for k in keys] == ["model-v2", "model-v1", "model-v1"]
    await put_weight(0.29)
    assert [await backend_for(k) for k in keys] == ["model-v2"] * 3
    await put_weight(0.0)
    assert [await backend_for(k) for k in keys] == ["model-v1"] * 3
    await put_weight(1.0)
    assert [await backend_for(k) for k in keys] == ["model-v2"] * 3
