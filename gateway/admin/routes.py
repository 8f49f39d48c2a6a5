"""Routes: their live state (weights, split, shadow, canary), and steering them."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from aiohttp import web

from gateway.admin.common import TARGET, json_error, json_response, refused, settle_shadows
from gateway.core.canary import Status
from gateway.core.reference import is_reference
from gateway.runtime import RouteRuntime
from gateway.steering import Steering, SteeringError


def route_view(
    route: RouteRuntime, canary: Status | None = None, steering: Steering | None = None
) -> dict[str, Any]:
    config = route.config
    match = config.match
    view = {
        "name": route.name,
        "match": match.model_dump(exclude_none=True),
        "champion": route.champion.name,
        "challenger": route.challenger.name if route.challenger else None,
        "challenger_weight": route.weight,
        "split": {
            "key": config.split.key,
            "salt": config.split.salt,
            "allow_override": config.split.allow_override,
            "challenger_buckets": route.threshold,
        },
        "shadow": _shadow_summary(route),
        "canary": _canary_summary(canary) if config.canary else None,
        "endpoints": _endpoint_health(route),
    }
    if steering is not None:
        references = _references(route, steering)
        if references:
            view["references"] = references
    return view


def _references(route: RouteRuntime, steering: Steering) -> dict[str, Any]:
    """What each registry reference of the route (model:NAME@ALIAS) resolves to now."""
    config = route.config
    named = {"champion": config.champion, "challenger": config.challenger}
    if config.shadow is not None:
        named["shadow"] = config.shadow_target
    shown: dict[str, Any] = {}
    for role, name in named.items():
        if name is None or not is_reference(name):
            continue
        resolution = steering.resolution(name)
        shown[role] = (
            resolution.as_dict()
            if resolution is not None
            else {"reference": name, "version": None, "problem": "not resolved yet"}
        )
    return shown


def _endpoint_health(route: RouteRuntime) -> dict[str, list[dict[str, Any]]]:
    """Each endpoint of the route's backends: in rotation or not, why, until when."""
    pools = [route.champion] if route.challenger is None else [route.champion, route.challenger]
    return {pool.name: pool.health() for pool in pools}


def _canary_summary(status: Status | None) -> dict[str, Any]:
    status = status or Status()
    return {
        "state": status.state.value,
        "step": status.step,
        "weight": status.weight,
        "reason": status.reason,
    }


def _shadow_summary(route: RouteRuntime) -> dict[str, Any] | None:
    policy = route.shadow
    if policy is None:
        return None
    tally = policy.stats.tally
    return {
        "target": policy.target.name,
        "sample_rate": policy.config.sample_rate,
        "sampling": policy.config.sampling,
        "in_flight": policy.in_flight,
        "outcomes": {o.value: n for o, n in tally.counts.items()},
        "agreement_rate": tally.agreement_rate,
    }


def shadow_report(route: RouteRuntime) -> dict[str, Any]:
    policy = route.shadow
    assert policy is not None
    report: dict[str, Any] = dataclasses.asdict(policy.stats.snapshot())
    return {**(_shadow_summary(route) or {}), **report}


def _route_or_404(request: web.Request) -> RouteRuntime | web.Response:
    name = request.match_info["name"]
    route = request.app[TARGET].routes.get(name)
    if route is None:
        return json_error(404, "unknown_route", f"no route named {name!r}")
    return route


async def list_routes(request: web.Request) -> web.Response:
    settle_shadows(request)
    target = request.app[TARGET]
    return json_response(
        {
            "routes": [
                route_view(r, target.controller.status(r.name), target.steering)
                for r in target.routes.values()
            ],
            "state": await target.state_health(),
        }
    )


async def get_route(request: web.Request) -> web.Response:
    settle_shadows(request)
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    target = request.app[TARGET]
    view = route_view(found, target.controller.status(found.name), target.steering)
    return json_response({**view, "state": await target.state_health()})


async def get_shadow(request: web.Request) -> web.Response:
    settle_shadows(request)
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    if found.shadow is None:
        return json_error(404, "no_shadow", f"route {found.name!r} has no shadow configured")
    return json_response(shadow_report(found))


async def put_weight(request: web.Request) -> web.Response:
    found = _route_or_404(request)
    if isinstance(found, web.Response):
        return found
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as error:
        return json_error(400, "bad_json", f"body is not valid JSON: {error}")
    if not isinstance(body, dict) or "challenger_weight" not in body:
        return json_error(400, "bad_request", 'body must be {"challenger_weight": <0..1>}')
    unknown = sorted(set(body) - {"challenger_weight"})
    if unknown:
        return json_error(400, "bad_request", f"unknown keys: {', '.join(unknown)}")
    weight = body["challenger_weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        # Said without echoing the value: a nested one is deep enough to make repr() fail.
        return json_error(
            400, "bad_weight", f"challenger_weight must be a number, got a {_json_type(weight)}"
        )
    try:
        route, persisted = await request.app[TARGET].steering.set_weight(
            found.name, body["challenger_weight"], actor="admin"
        )
    except SteeringError as error:
        return refused(error)
    target = request.app[TARGET]
    view = route_view(route, target.controller.status(route.name), target.steering)
    return json_response({**view, "persisted": persisted})


def _json_type(value: object) -> str:
    names = {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)
