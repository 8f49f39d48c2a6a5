"""The model registry's admin API (/api/v1/models) and routes that reference it, on one
gateway with its embedded store, against real loopback upstreams."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app, named_app
from tests.helpers.waiting import wait_until
from tests.models_support import admin, call, models_document, proxy, served_by

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def upstreams(start_app: StartApp) -> dict[str, str]:
    return {name: await start_app(named_app(name)) for name in ("v1", "v2", "v3")}


async def started(
    start_gateway: StartGateway, upstreams: dict[str, str], **options: object
) -> Gateway:
    document = models_document({"v1": upstreams["v1"], "v2": upstreams["v2"]}, **options)
    return await start_gateway(document)


async def test_versions_aliases_and_their_errors(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway = await started(start_gateway, upstreams)
    url = admin(gateway, "/models/iris")
    assert await call(http, "GET", admin(gateway, "/models")) == (200, {"models": []})
    assert (await call(http, "GET", url))[0] == 404

    status, first = await call(http, "POST", url + "/versions", {"backend": "v1"})
    assert status == 201 and first["version"] == 1 and first["trace_model"] == "iris-v1"
    status, second = await call(
        http, "POST", url + "/versions",
        {"url": upstreams["v3"], "metadata": {"f1": 0.93}, "model": "iris-large"},
    )  # fmt: skip
    assert status == 201 and second["version"] == 2 and second["trace_model"] == "iris-large"
    assert second["endpoints"] == [upstreams["v3"]]
    status, seventh = await call(http, "POST", url + "/versions", {"version": 7, "backend": "v2"})
    assert status == 201 and seventh["version"] == 7
    # The same content again is done already; other content under the number is refused.
    assert (await call(http, "POST", url + "/versions", {"version": 7, "backend": "v2"}))[0] == 200
    status, error = await call(http, "POST", url + "/versions", {"version": 7, "backend": "v1"})
    assert (status, error["error"]["code"]) == (409, "version_exists")

    for bad in (
        {},  # served by nothing
        {"backend": "v1", "url": upstreams["v1"]},
        {"backend": "nope"},
        {"url": "ftp://example.com"},
        {"url": "http://host:99999"},
        {"endpoints": []},
        {"version": "x", "backend": "v1"},
        {"version": 0, "backend": "v1"},
        {"backend": "v1", "metadata": [1]},
        {"backend": "v1", "colour": "red"},
    ):
        status, error = await call(http, "POST", url + "/versions", bad)
        assert status == 400, (bad, error)
        assert error["error"]["code"] in ("bad_request", "bad_version"), error
    async with http.post(url + "/versions", data=b"{nope") as response:
        assert response.status == 400
    assert (await call(http, "POST", admin(gateway, "/models/not%20a%20name/versions"),
                       {"backend": "v1"}))[0] == 400  # fmt: skip

    assert (await call(http, "GET", url + "/versions/2"))[1]["trace_model"] == "iris-large"
    assert (await call(http, "GET", url + "/versions/5"))[0] == 404
    assert (await call(http, "GET", url + "/versions/abc"))[0] == 400

    # Aliases: put, get (with its ETag), conditional moves, delete.
    assert await call(http, "PUT", url + "/aliases/champion", {"version": 1}) == (
        200, {"model": "iris", "alias": "champion", "version": 1, "previous": None},
    )  # fmt: skip
    async with http.get(url + "/aliases/champion") as response:
        assert response.headers["ETag"] == '"1"'
    status, error = await call(
        http, "PUT", url + "/aliases/champion", {"version": 2, "expected_version": 7}
    )
    assert (status, error["error"]["code"]) == (409, "alias_changed")
    status, error = await call(
        http, "PUT", url + "/aliases/champion", {"version": 2}, headers={"If-Match": '"7"'}
    )
    assert (status, error["error"]["code"]) == (409, "alias_changed")
    moved = await call(
        http, "PUT", url + "/aliases/champion", {"version": 2}, headers={"If-Match": '"1"'}
    )
    assert moved[0] == 200 and moved[1]["previous"] == 1
    status, error = await call(
        http, "PUT", url + "/aliases/challenger", {"version": 7, "expected_version": None}
    )
    assert status == 200
    assert (await call(http, "PUT", url + "/aliases/champion", {"version": 9}))[0] == 404
    assert (await call(http, "PUT", url + "/aliases/latest", {"version": 1}))[0] == 400
    assert (await call(http, "PUT", url + "/aliases/champion", {"versio": 1}))[0] == 400
    assert (await call(http, "PUT", admin(gateway, "/models/nope/aliases/a"), {"version": 1}))[
        0
    ] == 404
    assert (await call(http, "GET", url + "/aliases/latest"))[1]["version"] == 7

    status, error = await call(http, "DELETE", url + "/versions/7")
    assert (status, error["error"]["code"]) == (409, "version_in_use")
    assert "challenger" in error["error"]["message"]
    assert (await call(http, "DELETE", url + "/aliases/challenger"))[0] == 200
    assert (await call(http, "DELETE", url + "/aliases/challenger"))[0] == 404
    assert (await call(http, "DELETE", url + "/versions/7"))[0] == 200
    assert (await call(http, "GET", url + "/aliases/latest"))[1]["version"] == 2

    status, model = await call(http, "GET", url)
    assert status == 200 and model["aliases"] == {"champion": 2} and model["latest"] == 2
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert model["routes"] == [
        {"route": "r", "champion": "model:iris@champion", "challenger": "model:iris@challenger"}
    ]
    actions = [(h["seq"], h["action"]) for h in model["history"]]
    assert actions == [
        (1, "register"), (2, "register"), (3, "register"), (4, "alias"), (5, "alias"),
        (6, "alias"), (7, "unalias"), (8, "delete"),
    ]  # fmt: skip
    assert (await call(http, "GET", url + "/history"))[1]["history"] == model["history"]
    assert (await call(http, "GET", admin(gateway, "/models")))[1]["models"] == [
        {"name": "iris", "versions": [1, 2], "latest": 2, "aliases": {"champion": 2}}
    ]


async def test_the_token_guards_the_models_api(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    document = models_document({"v1": upstreams["v1"]})
    document["admin"]["token"] = "s3cret"
    gateway = await start_gateway(document)
    url = admin(gateway, "/models/iris/versions")
    status, error = await call(http, "POST", url, {"backend": "v1"})
    assert (status, error["error"]["code"]) == (401, "unauthorized")
    auth = {"Authorization": "Bearer s3cret"}
    assert (await call(http, "POST", url, {"backend": "v1"}, headers=auth))[0] == 201


async def test_a_route_follows_its_aliases_and_says_where_they_point(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway = await started(start_gateway, upstreams, split={"challenger_weight": 0.5})
    url = admin(gateway, "/models/iris")
    # Nothing registered yet: a clear 503, and the route view says why.
    async with http.get(proxy(gateway)) as response:
        assert response.status == 503
        error = (await response.json())["error"]
    assert error["code"] == "no_healthy_endpoint"
    assert error["message"] == "model:iris@champion: the registry has no model 'iris' (yet)"

    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"url": upstreams["v3"]})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    # Followed at once by the gateway that made the change.
    assert {await served_by(http, gateway, f"k{i}") for i in range(20)} == {"v1"}
    view = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert view["challenger"] is None and view["challenger_weight"] == 0
    assert view["references"]["champion"]["version"] == 1
    assert view["references"]["champion"]["served_by"] == "v1"
    assert "points at no version" in view["references"]["challenger"]["problem"]

    # A challenger appears: the file's weight applies again, and its pool is made.
    await call(http, "PUT", url + "/aliases/challenger", {"version": 2})
    assert {await served_by(http, gateway, f"k{i}") for i in range(40)} == {"v1", "v3"}
    view = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert view["challenger_weight"] == 0.5 and view["challenger"] == "model:iris@2"
    assert view["references"]["challenger"]["endpoints"] == [upstreams["v3"]]
    own = gateway.references._own
    assert list(own) == [("iris", 2)]
    lane = gateway.routes["r"].challenger_lane
    assert lane.pool is own[("iris", 2)] and lane.pool.model == "iris-v2"
    assert gateway.routes["r"].champion_lane.model == "iris-v1"  # traced as the version

    # The champion alias moves to a version by URL; the challenger's pool, no longer
    # referenced, is let go.
    await call(http, "PUT", url + "/aliases/champion", {"version": 2})
    await call(http, "DELETE", url + "/aliases/challenger")
    assert {await served_by(http, gateway, f"k{i}") for i in range(20)} == {"v3"}
    assert list(own) == [("iris", 2)]
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    assert {await served_by(http, gateway, f"k{i}") for i in range(20)} == {"v1"}
    assert own == {}

    # An alias that points nowhere again: 503 saying so.
    await call(http, "DELETE", url + "/aliases/champion")
    async with http.get(proxy(gateway)) as response:
        assert response.status == 503
        message = (await response.json())["error"]["message"]
    assert message == "model:iris@champion: alias 'champion' of model 'iris' points at no version"

    metrics = await (await http.get(f"http://127.0.0.1:{gateway.admin_port}/metrics")).text()
    assert 'gateway_registry_alias_moves_total{alias="champion",model="iris"} 4.0' in metrics
    assert 'gateway_registry_alias_target{alias="champion"' not in metrics
    await call(http, "PUT", url + "/aliases/champion", {"version": 2})
    metrics = await (await http.get(f"http://127.0.0.1:{gateway.admin_port}/metrics")).text()
    assert 'gateway_registry_alias_target{alias="champion",model="iris",version="2"} 1.0' in metrics


async def test_a_shadow_target_by_version_number(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway = await started(
        start_gateway, upstreams, champion="v1", challenger=None,
        shadow={"target": "model:iris@2", "sample_rate": 1.0},
    )  # fmt: skip
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    shadow = gateway.routes["r"].shadow
    assert shadow is not None
    await wait_until(lambda: shadow.target.name == "v2", "the shadow target resolved")
    assert await served_by(http, gateway) == "v1"

    async def compared() -> bool:
        status, report = await call(http, "GET", admin(gateway, "/routes/r/shadow"))
        return status == 200 and sum(report["outcomes"].values()) >= 1

    await wait_until(compared, "the shadow call compared")
    view = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert view["references"] == {
        "shadow": {
            "reference": "model:iris@2", "version": 2, "served_by": "v2",
            "endpoints": [upstreams["v2"]], "trace_model": "iris-v2", "problem": None,
        }
    }  # fmt: skip


async def champion_1_challenger_2(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> tuple[Gateway, str]:
    """A gateway whose route r has a canary, with iris v1 (backend v1) as champion and v2
    (backend v2) as challenger; returns it and the model's admin URL."""
    gateway = await started(
        start_gateway, upstreams,
        canary={"steps": [0.2, 0.5], "step_interval_seconds": 60, "min_requests": 10},
    )  # fmt: skip
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await call(http, "PUT", url + "/aliases/challenger", {"version": 2})
    return gateway, url


async def test_promotion_moves_the_aliases_and_rollback_restores_them(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway, url = await champion_1_challenger_2(start_gateway, upstreams, http)
    status, view = await call(http, "POST", admin(gateway, "/routes/r/canary/start"))
    assert status == 200 and view["state"] == "progressing" and view["weight"] == 0.2

    status, view = await call(http, "POST", admin(gateway, "/routes/r/canary/promote"))
    assert status == 200 and view["state"] == "promoted"
    model = (await call(http, "GET", url))[1]
    assert model["aliases"] == {"champion": 2, "previous": 1}
    route = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert route["champion"] == "v2" and route["challenger"] is None
    assert route["challenger_weight"] == 0
    assert {await served_by(http, gateway, f"k{i}") for i in range(20)} == {"v2"}
    # A promotion again has nothing to promote.
    status, error = await call(http, "POST", admin(gateway, "/routes/r/canary/promote"))
    assert status == 409

    status, view = await call(http, "POST", admin(gateway, "/routes/r/canary/rollback"))
    assert status == 200 and view["state"] == "rolled_back"
    model = (await call(http, "GET", url))[1]
    assert model["aliases"] == {"champion": 1, "challenger": 2}
    route = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert route["champion"] == "v1" and route["challenger"] == "v2"
    assert route["challenger_weight"] == 0
    assert {await served_by(http, gateway, f"k{i}") for i in range(20)} == {"v1"}

    moves = [
        (h["alias"], h.get("version"), h["previous"], h["actor"])
        for h in model["history"]
        if h["action"] in ("alias", "unalias")
    ][2:]
    assert moves == [
        ("champion", 2, 1, "canary"), ("previous", 1, None, "canary"),
        ("challenger", None, 2, "canary"),
        ("champion", 1, 2, "canary"), ("challenger", 2, None, "canary"),
        ("previous", None, 1, "canary"),
    ]  # fmt: skip

    # The registry's own promote (gateway models promote): the same moves, and the route's
    # weight goes to 0 (here from a weight set by hand, no canary running).
    await call(http, "PUT", admin(gateway, "/routes/r/weight"), {"challenger_weight": 0.3})
    status, promoted = await call(http, "POST", url + "/promote", {"actor": "alice"})
    assert status == 200 and promoted["aliases"] == {"champion": 2, "previous": 1}
    assert promoted["routes"] == ["r"]
    route = (await call(http, "GET", admin(gateway, "/routes/r")))[1]
    assert route["champion"] == "v2" and route["challenger_weight"] == 0
    status, error = await call(http, "POST", url + "/promote")
    assert (status, error["error"]["code"]) == (409, "no_challenger")
    assert (await call(http, "POST", admin(gateway, "/models/nope/promote")))[0] == 404


async def test_a_promotion_rollback_the_registry_refuses_leaves_the_canary_promoted(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway, url = await champion_1_challenger_2(start_gateway, upstreams, http)
    await call(http, "POST", admin(gateway, "/routes/r/canary/start"))
    status, view = await call(http, "POST", admin(gateway, "/routes/r/canary/promote"))
    assert status == 200 and view["state"] == "promoted"
    # Someone deletes the alias a rollback restores: the registry cannot undo it.
    assert (await call(http, "DELETE", url + "/aliases/previous"))[0] == 200
    status, error = await call(http, "POST", admin(gateway, "/routes/r/canary/rollback"))
    assert status == 409, error
    # The canary says what happened: still promoted, not rolled back with nothing moved.
    view = (await call(http, "GET", admin(gateway, "/routes/r/canary")))[1]
    assert view["state"] == "promoted"
    model = (await call(http, "GET", url))[1]
    assert model["aliases"] == {"champion": 2}
    assert {await served_by(http, gateway, f"k{i}") for i in range(10)} == {"v2"}


async def test_promotion_needs_aliases_of_one_model(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    gateway = await started(
        start_gateway, upstreams, challenger="model:iris@2",
        canary={"steps": [0.5], "step_interval_seconds": 60},
    )  # fmt: skip
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"backend": "v2"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await call(http, "POST", admin(gateway, "/routes/r/canary/start"))
    status, error = await call(http, "POST", admin(gateway, "/routes/r/canary/promote"))
    # Refused before anything is written: the canary runs on, the aliases stay.
    assert (status, error["error"]["code"]) == (409, "not_promotable")
    assert "model:iris@2" in error["error"]["message"]
    assert (await call(http, "GET", url))[1]["aliases"] == {"champion": 1}
    view = (await call(http, "GET", admin(gateway, "/routes/r/canary")))[1]
    assert view["state"] == "progressing" and gateway.routes["r"].weight == 0.5


async def test_a_reload_keeps_references_resolved(
    start_gateway: StartGateway,
    upstreams: dict[str, str],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    document = models_document({"v1": upstreams["v1"], "v2": upstreams["v2"]}, challenger=None)
    document["state"] = {"path": str(tmp_path / "state.db")}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "POST", url + "/versions", {"url": upstreams["v3"]})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await call(http, "PUT", url + "/aliases/challenger", {"version": 2})
    kept = gateway.routes["r"]

    # A reload that leaves the route as it was keeps it, resolved.
    await gateway.reload()
    assert gateway.routes["r"] is kept and await served_by(http, gateway) == "v1"
    # One that adds a challenger by reference resolves it before the route serves.
    route = document["routes"][0]
    route["challenger"] = "model:iris@challenger"
    route["split"] = {"challenger_weight": 1.0}
    path.write_text(yaml.safe_dump(document))
    await gateway.reload()
    assert {await served_by(http, gateway, f"k{i}") for i in range(10)} == {"v3"}
    # And one that goes back to plain backends lets go of the version's pool.
    route["champion"], route["challenger"] = "v2", "v1"
    route["split"] = {"challenger_weight": 0.0}
    path.write_text(yaml.safe_dump(document))
    await gateway.reload()
    assert await served_by(http, gateway) == "v2"
    assert gateway.references._own == {} and gateway.references.resolutions == {}


async def test_traces_name_each_version(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    document = models_document({"v1": upstreams["v1"]}, split={"challenger_weight": 0.5})
    document["tracing"] = {"enabled": True}
    gateway = await start_gateway(document)
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})  # traced as iris-v1
    await call(http, "POST", url + "/versions", {"url": upstreams["v3"], "model": "iris-big"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    await call(http, "PUT", url + "/aliases/challenger", {"version": 2})
    assert {await served_by(http, gateway, f"k{i}") for i in range(30)} == {"v1", "v3"}
    status, traces = await call(http, "GET", admin(gateway, "/traces"))
    assert status == 200
    assert {t["model"] for t in traces["models"]} == {"iris-v1", "iris-big"}


async def test_a_request_in_flight_finishes_where_it_started(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"backend": "slow"})

    upstreams = {"slow": await start_app(catch_all_app(slow)),
                 "fast": await start_app(named_app("fast"))}  # fmt: skip
    gateway = await start_gateway(models_document(upstreams, challenger=None))
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "slow"})
    await call(http, "POST", url + "/versions", {"backend": "fast"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    in_flight = asyncio.create_task(served_by(http, gateway, "first"))
    await asyncio.wait_for(arrived.wait(), 5)
    await call(http, "PUT", url + "/aliases/champion", {"version": 2})
    assert await served_by(http, gateway, "next") == "fast"
    release.set()
    assert await in_flight == "slow"


async def test_digits_that_are_not_ascii_are_no_version_numbers(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    # "²" is a digit to str.isdigit() but no number to int(): an alias by that name was
    # taken for a version number and answered 500.
    gateway = await started(start_gateway, upstreams)
    url = admin(gateway, "/models/iris")
    assert (await call(http, "POST", url + "/versions", {"backend": "v1"}))[0] == 201
    for alias in ("%C2%B2", "%D9%A1"):  # SUPERSCRIPT TWO, ARABIC-INDIC DIGIT ONE
        status, error = await call(http, "GET", url + "/aliases/" + alias)
        assert (status, error["error"]["code"]) == (404, "unknown_alias"), error
    status, error = await call(http, "GET", url + "/versions/%C2%B2")
    assert (status, error["error"]["code"]) == (400, "bad_version"), error


async def test_version_numbers_past_ten_digits_are_refused(
    start_gateway: StartGateway, upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    # Versions are stored under ten-digit keys, read back in key order: a larger number
    # sorted before smaller ones (9999999999 read as latest after 10000000000), and one
    # past 64 bits could not be stored at all (500).
    gateway = await started(start_gateway, upstreams)
    url = admin(gateway, "/models/iris")
    top = {"version": 9_999_999_999, "backend": "v1"}
    assert (await call(http, "POST", url + "/versions", top))[0] == 201
    for version in ("10000000000", "99999999999999999999", 10_000_000_000):
        status, error = await call(
            http, "POST", url + "/versions", {"version": version, "backend": "v1"}
        )
        assert (status, error["error"]["code"]) == (400, "bad_version"), error
    status, error = await call(http, "POST", url + "/versions", {"backend": "v2"})
    assert status == 409 and "version" in error["error"]["message"], error
    status, model = await call(http, "GET", url)
    assert status == 200 and model["latest"] == 9_999_999_999, model
