"""The canary end to end: real model servers on loopback, real gateways, the admin API and
/metrics as an operator sees them, Redis for the replicas. Canaries here are fast (steps
of half a second, evaluations every 0.1 s); the decision rule is the default one."""

from __future__ import annotations

import asyncio
import copy
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.canary_support import canary, command, reaches, traffic
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import catch_all_app
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import RedisServer, private_redis  # noqa: F401  (fixture)
from tests.shadow_support import Scrape, scrape
from tests.support import admin_url, gateway_document, proxy_url, wait_ready

pytestmark = pytest.mark.timeout(60)

FAST = {
    "steps": [0.3, 0.6],
    "step_interval_seconds": 0.5,
    "evaluation_interval_seconds": 0.1,
    "min_requests": 10,
    "leader_lease_seconds": 1.0,
}


def model_app(
    name: str, *, fail_rate: float = 0.0, delay: float = 0.0, seed: int = 0
) -> web.Application:
    """A model server answering ``{"backend": name}``; ``fail_rate`` of its answers are
    500s, each after ``delay`` seconds."""
    rng = random.Random(seed)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        if rng.random() < fail_rate:
            return web.json_response({"error": "model crashed"}, status=500)
        return web.json_response({"backend": name, "path": request.path})

    return catch_all_app(handle)


def canary_document(
    champion: str, challenger: str, canary: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    return gateway_document(
        {"v1": {"url": champion}, "v2": {"url": challenger}},
        [
            {
                "name": "m",
                "match": {"path_prefix": "/m"},
                "champion": "v1",
                "challenger": "v2",
                "canary": {**FAST, **(canary or {})},
                **route,
            }
        ],
        tracing={"enabled": False},
    )


def decisions(metrics: Scrape, route: str = "m") -> dict[str, int]:
    return {
        labels["decision"]: int(value)
        for labels, value in metrics.matching("gateway_canary_decisions_total", route=route)
    }


async def test_a_healthy_challenger_walks_every_step_and_is_promoted(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    gateway = await start_gateway(canary_document(v1, v2))
    assert (await canary(http, gateway))["state"] == "idle"
    status, view = await command(http, gateway, "start")
    assert status == 200 and view["state"] == "progressing" and view["weight"] == 0.3
    assert gateway.routes["m"].weight == 0.3  # applied at once
    async with traffic(http, gateway) as statuses:
        done = await reaches(http, gateway, "awaiting_promotion", "rolled_back")
    assert done["state"] == "awaiting_promotion", done["last_decision"]
    assert done["weight"] == 0.6 and done["step"] == 1
    assert set(statuses) == {200}
    step = done["counts"]["step"]
    assert step["champion"]["requests"] >= 10 and step["challenger"]["requests"] >= 10
    assert [h["action"] for h in done["history"] if h["action"] != "hold"] == [
        "start", "advance", "advance",
    ]  # fmt: skip

    status, promoted = await command(http, gateway, "promote")
    assert status == 200 and promoted["state"] == "promoted"
    async with http.get(admin_url(gateway, "/api/v1/routes/m")) as response:
        route = await response.json()
    assert route["champion"] == "v2" and route["challenger"] is None
    assert route["challenger_weight"] == 0.0
    async with http.post(proxy_url(gateway, "/m/x"), data=b"{}") as response:
        assert (await response.json())["backend"] == "v2"
    # A promoted canary is an end state; promoting again is refused with a JSON error.
    status, refused = await command(http, gateway, "promote")
    assert status == 409 and refused["error"]["code"] == "canary_state"
    # Rollback after a promotion brings the former champion back.
    status, back = await command(http, gateway, "rollback")
    assert status == 200 and back["state"] == "rolled_back"
    async with http.post(proxy_url(gateway, "/m/x"), data=b"{}") as response:
        assert (await response.json())["backend"] == "v1"
    counted = decisions(await scrape(http, gateway))
    assert counted["start"] == 1 and counted["advance"] == 2
    assert counted["promote"] == 1 and counted["rollback"] == 1


async def test_a_failing_challenger_is_rolled_back_with_its_evidence(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1 = await start_app(model_app("v1"))
    v2 = await start_app(model_app("v2", fail_rate=0.5))
    gateway = await start_gateway(canary_document(v1, v2))
    await command(http, gateway, "start")
    async with traffic(http, gateway):
        done = await reaches(http, gateway, "rolled_back", "awaiting_promotion")
    assert done["state"] == "rolled_back" and done["weight"] == 0.0
    decision = done["last_decision"]
    assert decision["action"] == "rollback"
    assert decision["reason"] in ("error_rate_increase", "below_success_threshold")
    failed = [c for c in decision["checks"] if c["verdict"] == "fail"]
    assert failed and failed[0]["bound"] is not None and "challenger" in failed[0]["detail"]
    evidence = decision["evidence"]["canary"]
    assert evidence["challenger"]["failures"] > 0 and evidence["champion"]["failures"] == 0
    assert gateway.routes["m"].weight == 0.0
    assert decisions(await scrape(http, gateway)).get("rollback") == 1
    # The weight is the operator's again.
    async with http.put(
        admin_url(gateway, "/api/v1/routes/m/weight"), json={"challenger_weight": 0.1}
    ) as response:
        assert response.status == 200


async def test_no_traffic_holds_for_want_of_data_and_weights_wait_for_a_pause(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    gateway = await start_gateway(canary_document(v1, v2))
    await command(http, gateway, "start")
    held = await reaches(http, gateway, "holding")
    assert held["reason"] == "insufficient_data" and held["step"] == 0

    weight_url = admin_url(gateway, "/api/v1/routes/m/weight")
    async with http.put(weight_url, json={"challenger_weight": 0.9}) as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "canary_active"
    assert gateway.routes["m"].weight == 0.3

    status, paused = await command(http, gateway, "pause")
    assert status == 200 and paused["state"] == "paused"
    async with http.put(weight_url, json={"challenger_weight": 0.4}) as response:
        assert response.status == 200
    status, _ = await command(http, gateway, "pause")
    assert status == 409
    status, resumed = await command(http, gateway, "resume")
    assert status == 200 and resumed["state"] == "progressing"
    # The canary takes its weight back within an evaluation.
    await wait_until(lambda: gateway.routes["m"].weight == 0.3, "the canary's weight")
    counted = decisions(await scrape(http, gateway))
    assert counted["pause"] == 1 and counted["resume"] == 1 and counted.get("advance") is None


async def test_a_slow_challenger_is_rolled_back_by_the_latency_gate(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1 = await start_app(model_app("v1"))
    v2 = await start_app(model_app("v2", delay=0.06))
    gateway = await start_gateway(
        canary_document(v1, v2, {"max_latency_ratio": 2.0, "latency_quantile": 0.9})
    )
    await command(http, gateway, "start")
    async with traffic(http, gateway):
        done = await reaches(http, gateway, "rolled_back", "awaiting_promotion", within=30)
    assert done["state"] == "rolled_back" and done["reason"] == "latency", done["last_decision"]


async def test_a_shadow_that_disagrees_is_rolled_back_by_the_shadow_gate(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1 = await start_app(model_app("v1"))
    v2 = await start_app(model_app("v2"))  # answers "v2" where the champion says "v1"
    document = canary_document(
        v1, v2, {"min_shadow_agreement": 0.9}, shadow={"sample_rate": 1.0}
    )
    gateway = await start_gateway(document)
    await command(http, gateway, "start")
    async with traffic(http, gateway):
        done = await reaches(http, gateway, "rolled_back", "awaiting_promotion")
    assert done["state"] == "rolled_back" and done["reason"] == "shadow_agreement"
    assert done["counts"]["shadow"]["mismatched"] > 0


class Hooks:
    """A webhook receiver: records what it is sent; its gate answers ``gate_status``."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.asked: list[dict[str, Any]] = []
        self.gate_status = 200

    def app(self) -> web.Application:
        async def event(request: web.Request) -> web.Response:
            self.events.append(await request.json())
            return web.json_response({})

        async def gate(request: web.Request) -> web.Response:
            self.asked.append(await request.json())
            return web.json_response({}, status=self.gate_status)

        app = web.Application()
        app.router.add_post("/event", event)
        app.router.add_post("/gate", gate)
        return app


async def test_webhooks_hear_every_event_and_a_closed_gate_holds(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    hooks = Hooks()
    hooks.gate_status = 503
    receiver = await start_app(hooks.app())
    webhooks = [
        {"url": f"{receiver}/event"},
        {"url": f"{receiver}/gate", "gate": True, "events": []},
    ]
    gateway = await start_gateway(canary_document(v1, v2, {"webhooks": webhooks}))
    await command(http, gateway, "start")
    async with traffic(http, gateway):
        closed = await wait_until(
            lambda: _gate_closed(http, gateway), "holding on the closed gate", within=10
        )
        assert closed["step"] == 0
        hooks.gate_status = 200
        done = await reaches(http, gateway, "awaiting_promotion")
    await command(http, gateway, "promote")
    await wait_until(lambda: len(hooks.events) >= 3, "the webhook events")
    # Reaching the last step's end is no event of its own: awaiting_promotion shows it.
    assert [e["event"] for e in hooks.events] == ["started", "advanced", "promoted"]
    assert all(e["route"] == "m" for e in hooks.events)
    assert hooks.events[1]["weight"] == 0.6 and hooks.events[1]["step"] == 1
    assert hooks.asked[0]["event"] == "advance" and hooks.asked[0]["evidence"] is not None
    assert done["history"][-1]["action"] == "advance"
    calls = (await scrape(http, gateway)).matching("gateway_canary_webhook_calls_total", route="m")
    outcomes = {(labels["event"], labels["outcome"]) for labels, _ in calls}
    assert ("advance", "refused") in outcomes and ("started", "ok") in outcomes


async def _gate_closed(http: aiohttp.ClientSession, gateway: Gateway) -> Any:
    view = await canary(http, gateway)
    return view if view["reason"] == "gate_closed" else None


class Replica:
    """``gateway run`` as its own process (so that it can be SIGKILLed), on one Redis."""

    def __init__(self, name: str, document: dict[str, Any], directory: Path) -> None:
        self.name = name
        port, admin_port = free_port(), free_port()
        document = {
            **document,
            "server": {**document["server"], "port": port},
            "admin": {**document["admin"], "port": admin_port},
        }
        self.config = directory / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(document))
        self.log = directory / f"{name}.log"
        self.base = f"http://127.0.0.1:{port}"
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config),
                stdout=out, stderr=out,
            )  # fmt: skip
        await wait_ready(http, self.admin, process=self.process, log=self.log)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()  # SIGKILL: no draining, no lease given up
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    async def weight(self, http: aiohttp.ClientSession) -> float:
        async with http.get(f"{self.admin}/api/v1/routes/m") as response:
            return float((await response.json())["challenger_weight"])

    async def decisions(self, http: aiohttp.ClientSession) -> dict[str, int]:
        async with http.get(f"{self.admin}/metrics") as response:
            return decisions(Scrape(await response.text()))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_replicas_share_one_canary_and_finish_it_when_its_leader_dies(
    private_redis: RedisServer,  # noqa: F811
    start_app: StartApp,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    document = canary_document(
        v1, v2, {"steps": [0.2, 0.4, 0.6, 0.8], "step_interval_seconds": 1.5}
    )
    document["state"] = {"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"}
    a, b = Replica("a", document, tmp_path), Replica("b", document, tmp_path)
    try:
        await a.start(http)
        await b.start(http)
        status, view = await command(http, a.admin, "start")
        assert status == 200
        leader = view["leader"] or (await canary(http, a.admin))["leader"]
        # The weight a command set through one replica reaches the other within 1 s.
        started = asyncio.get_running_loop().time()
        await wait_until(
            lambda: _equal(b.weight(http), 0.2), "b at the canary's weight", within=1.5
        )
        assert asyncio.get_running_loop().time() - started < 1.0

        async with traffic(http, a.base, b.base):
            # Each step's weight is on both replicas within 1 s of the step starting.
            seen = await reaches(http, a.admin, "progressing", "holding")
            for step in (1, 2):
                view = await wait_until(
                    lambda s=step: _at_step(http, a.admin, s), f"step {step}", within=20
                )
                weight = view["weight"]
                await wait_until(
                    lambda w=weight: _all_equal([a.weight(http), b.weight(http)], w),
                    f"both replicas at weight {weight}", within=1.0,
                )  # fmt: skip
            # Kill the leader: the other takes over once the lease runs out, and finishes.
            views = [await canary(http, r.admin) for r in (a, b)]
            leader = views[0]["leader"]
            killed = next(r for r, v in zip((a, b), views, strict=True) if v["process"] == leader)
            survivor = b if killed is a else a
            await killed.kill()
            done = await reaches(http, survivor.admin, "awaiting_promotion", "rolled_back")
        assert done["state"] == "awaiting_promotion", done["last_decision"]
        assert done["leader"] == done["process"] != leader
        assert seen["canary_id"] == done["canary_id"]
        # One decision per step change, whichever replica took it: none was taken twice.
        advances = [h for h in done["history"] if h["action"] == "advance"]
        assert len(advances) == 4 and [h["step"] for h in advances] == [1, 2, 3, 3]
        survived = await survivor.decisions(http)
        assert survived.get("start", 0) == (1 if survivor is a else 0)

        # A replica started afresh resumes the canary where it is: from the store.
        await killed.start(http)
        resumed = await canary(http, killed.admin)
        assert resumed["state"] == "awaiting_promotion" and resumed["step"] == 3
        assert resumed["canary_id"] == done["canary_id"]
        assert await killed.weight(http) == 0.8
        status, _ = await command(http, killed.admin, "promote")
        assert status == 200
        await wait_until(
            lambda: _promoted(http, survivor.admin), "the promotion on the other", within=2
        )
    finally:
        for replica in (a, b):
            await replica.stop()


async def _equal(value: Any, expected: float) -> bool:
    return bool(await value == expected)


async def _all_equal(values: list[Any], expected: float) -> bool:
    return all([await v == expected for v in values])


async def _at_step(http: aiohttp.ClientSession, admin: str, step: int) -> Any:
    view = await canary(http, admin)
    return view if view["step"] >= step and view["state"] in ("progressing", "holding") else None


async def _promoted(http: aiohttp.ClientSession, admin: str) -> bool:
    async with http.get(f"{admin}/api/v1/routes/m") as response:
        route = await response.json()
    return bool(route["champion"] == "v2" and route["canary"]["state"] == "promoted")


async def test_a_reload_keeps_the_canary_and_a_new_challenger_starts_it_over(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v1, v2, v3 = [await start_app(model_app(n)) for n in ("v1", "v2", "v3")]
    document = canary_document(v1, v2, {"steps": [0.2, 0.4, 0.6], "min_requests": 10**6})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    await command(http, gateway, "start")
    async with traffic(http, gateway):
        before = await reaches(http, gateway, "holding")  # min_requests is out of reach

        # The same canary in a reloaded file (another route added): it runs on.
        document["routes"].append({"name": "x", "match": {"path_prefix": "/x"}, "champion": "v1"})
        path.write_text(yaml.safe_dump(document))
        async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
            assert response.status == 200
        kept = await canary(http, gateway)
        assert kept["canary_id"] == before["canary_id"] and kept["state"] == "holding"
        assert gateway.routes["m"].weight == 0.2

        # A new challenger: the evidence gathered was about another model; start over.
        document["backends"]["v3"] = {"url": v3}
        document["routes"][0]["challenger"] = "v3"
        path.write_text(yaml.safe_dump(document))
        async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
            assert response.status == 200

        async def restarted() -> Any:
            view = await canary(http, gateway)
            return view if view["canary_id"] != before["canary_id"] else None

        again = await wait_until(restarted, "the canary to start over")
    assert again["challenger"] == "v3" and again["step"] == 0
    assert any(h["reason"] == "challenger_changed" for h in again["history"])
    assert again["counts"]["canary"]["challenger"]["requests"] < 10**6  # its own counts


async def test_a_dead_state_store_stops_no_request_and_the_canary_resumes(
    private_redis: RedisServer,  # noqa: F811
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    document = canary_document(v1, v2, {"steps": [0.2, 0.4, 0.6], "step_interval_seconds": 1})
    document["state"] = {"backend": "redis", "redis_url": private_redis.url, "key_prefix": "gw"}
    gateway = await start_gateway(document)
    await command(http, gateway, "start")
    async with traffic(http, gateway) as statuses:
        await wait_until(lambda: _at_step(http, admin_url(gateway, ""), 1), "step 2", within=15)
        await asyncio.to_thread(private_redis.stop)
        served = len(statuses)
        async with http.get(admin_url(gateway, "/api/v1/routes/m/canary")) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "state_store_unavailable"
        status, body = await command(http, gateway, "pause")
        assert status == 503 and body["error"]["code"] == "state_store_unavailable"
        await wait_until(lambda: len(statuses) > served + 50, "requests during the outage")
        assert gateway.routes["m"].weight == 0.4  # the weight stays where the canary put it
        await asyncio.to_thread(private_redis.start)  # empty: it keeps nothing on disk
        # With the store back (and its canary state gone with it), the gateway answers
        # again, and the canary can be started afresh.
        view = await wait_until(
            lambda: _view_if_up(http, gateway), "the canary view to answer", within=10
        )
        assert view["state"] == "idle"
        status, restarted = await command(http, gateway, "start")
        assert status == 200 and restarted["state"] == "progressing"
    assert set(statuses) == {200}


async def _view_if_up(http: aiohttp.ClientSession, gateway: Gateway) -> Any:
    async with http.get(admin_url(gateway, "/api/v1/routes/m/canary")) as response:
        return await response.json() if response.status == 200 else None


async def test_weight_zero_is_an_emergency_brake_that_ends_the_canary(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    gateway = await start_gateway(canary_document(v1, v2, {"min_requests": 10**6}))
    await command(http, gateway, "start")
    weight_url = admin_url(gateway, "/api/v1/routes/m/weight")
    async with http.put(weight_url, json={"challenger_weight": 0.5}) as response:
        assert response.status == 409  # the canary drives the weight...
    async with http.put(weight_url, json={"challenger_weight": 0}) as response:
        assert response.status == 200  # ...but taking its traffic away is never refused
    assert gateway.routes["m"].weight == 0.0
    done = await reaches(http, gateway, "rolled_back", within=5)
    assert done["reason"] == "operator" and gateway.routes["m"].weight == 0.0


async def test_a_resumed_step_counts_afresh_and_the_canary_keeps_its_evidence(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    gateway = await start_gateway(canary_document(v1, v2, {"min_requests": 10**6}))
    await command(http, gateway, "start")
    async with traffic(http, gateway):

        async def counted(view_of: str, at_least: int) -> Any:
            view = await canary(http, gateway)
            n = view["counts"][view_of]["challenger"]["requests"]
            return view if n >= at_least else None

        await wait_until(lambda: counted("step", 20), "challenger requests in the step")
        await command(http, gateway, "pause")
        status, resumed = await command(http, gateway, "resume")
        assert status == 200
        before = resumed["counts"]["canary"]["challenger"]["requests"]
        # Right after the resume, the step has (nearly) nothing: its counts start over.
        assert resumed["counts"]["step"]["challenger"]["requests"] < before
        assert before >= 20
        await wait_until(lambda: counted("canary", before + 20), "the canary's counts to grow")


async def test_a_restart_with_another_challenger_starts_the_canary_over(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v1, v2, v3 = [await start_app(model_app(n)) for n in ("v1", "v2", "v3")]
    state = {"path": str(tmp_path / "state.db")}
    document = canary_document(v1, v2, {"min_requests": 10**6})
    document["state"] = state
    first = await start_gateway(document)
    await command(http, first, "start")
    old = await canary(http, first)
    await first.stop()
    # The same state store, a config whose challenger is v3: evidence about v2 is void.
    document["backends"]["v3"] = {"url": v3}
    document["routes"][0]["challenger"] = "v3"
    second = await start_gateway(document)

    async def restarted() -> Any:
        view = await canary(http, second)
        return view if view["canary_id"] != old["canary_id"] else None

    again = await wait_until(restarted, "the canary to start over", within=5)
    assert again["challenger"] == "v3" and again["step"] == 0
    assert any(h["reason"] == "challenger_changed" for h in again["history"])


async def test_removing_a_running_canary_from_the_file_ends_it(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    document = canary_document(v1, v2, {"min_requests": 10**6})
    document["routes"][0]["split"] = {"challenger_weight": 0.1}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    await command(http, gateway, "start")
    assert gateway.routes["m"].weight == 0.3
    del document["routes"][0]["canary"]
    path.write_text(yaml.safe_dump(document))
    async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
        assert response.status == 200
    # The file's weight again, and no weight lock: the canary no longer drives it.
    await wait_until(lambda: gateway.routes["m"].weight == 0.1, "the file's weight", within=5)
    async with http.put(
        admin_url(gateway, "/api/v1/routes/m/weight"), json={"challenger_weight": 0.2}
    ) as response:
        assert response.status == 200
    status = await gateway.store.get("canary/m/status")  # type: ignore[union-attr]
    assert status is not None and status["state"] == "rolled_back"
    assert status["reason"] == "canary_removed"


async def test_a_rollback_right_after_a_promotion_elsewhere_is_not_lost(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v1, v2 = await start_app(model_app("v1")), await start_app(model_app("v2"))
    document = canary_document(v1, v2, {"min_requests": 10**6})
    document["state"] = {"path": str(tmp_path / "shared.db")}  # two replicas, one store
    a = await start_gateway(document)
    b = await start_gateway(copy.deepcopy(document))
    await command(http, a, "start")
    await reaches(http, b, "progressing", "holding", within=5)
    status, _ = await command(http, a, "promote")
    assert status == 200
    # At once through the other replica, before its steering has seen the promotion.
    status, back = await command(http, b, "rollback")
    assert status == 200 and back["state"] == "rolled_back"

    def both_back() -> bool:
        return all(g.routes["m"].champion.name == "v1" for g in (a, b))

    await wait_until(both_back, "both replicas to serve the former champion", within=5)
    assert all(g.routes["m"].weight == 0.0 for g in (a, b))
