"""A route's canary: its status with the evidence behind it, and the operator's commands."""

from __future__ import annotations

from aiohttp import web

from gateway.admin.common import (
    TARGET,
    json_error,
    json_response,
    refused,
    settle_shadows,
    store_unavailable,
)  # fmt: skip
from gateway.core.canary import Action
from gateway.core.refused import Refused
from gateway.store import StoreError

COMMANDS = {
    "start": Action.START,
    "pause": Action.PAUSE,
    "resume": Action.RESUME,
    "promote": Action.PROMOTE,
    "rollback": Action.ROLLBACK,
}


async def get_canary(request: web.Request) -> web.Response:
    settle_shadows(request)
    name = request.match_info["name"]
    target = request.app[TARGET]
    if name not in target.routes:
        return json_error(404, "unknown_route", f"no route named {name!r}")
    try:
        return json_response(await target.controller.view(name))
    except Refused as error:
        return refused(error)
    except StoreError as error:
        return store_unavailable(error)


async def post_command(request: web.Request) -> web.Response:
    name, verb = request.match_info["name"], request.match_info["command"]
    target = request.app[TARGET]
    if name not in target.routes:
        return json_error(404, "unknown_route", f"no route named {name!r}")
    action = COMMANDS.get(verb)
    if action is None:
        known = ", ".join(COMMANDS)
        return json_error(404, "unknown_command", f"no canary command {verb!r} (known: {known})")
    try:
        await target.controller.command(name, action)
        return json_response(await target.controller.view(name))
    except Refused as error:
        return refused(error)
    except StoreError as error:
        return store_unavailable(error)
