"""Re-reading the config file: a good file takes effect, a bad one is refused and the
running config stays."""

from __future__ import annotations

from aiohttp import web

from gateway.admin.common import TARGET, json_error, json_response
from gateway.config import ConfigError


async def reload(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    if target.config_path is None:
        return json_error(
            409, "no_config_file", "this gateway was not started from a file: nothing to re-read"
        )
    try:
        await target.reload()
    except ConfigError as error:
        return json_response(
            {"error": {"code": "bad_config", "message": str(error), "problems": error.problems}},
            400,
        )
    return json_response({"status": "reloaded"})
