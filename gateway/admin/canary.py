"""A route's canary: its status with the evidence behind it, and the operator's commands."""

from __future__ import annotations

from aiohttp import web

from gateway.admin.common import TARGET, json_error, json_response, settle_shadows
from gateway.controller import CanaryError
from gateway.core.canary import Action
from gateway.steering import SteeringError
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
    except CanaryError as error:
        return json_error(error.status, error.code, str(error))
    except StoreError as error:
        return _store_down(error)


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
    except (CanaryError, SteeringError) as error:
        return json_error(error.status, error.code, str(error))
    except StoreError as error:
        return _store_down(error)


def _store_down(error: StoreError) -> web.Response:
    # The canary's state lives in the store: without it there is nothing true to show,
    # and a command could not be shared with the other replicas.
    return json_error(503, "state_store_unavailable", f"the state store is unavailable: {error}")
