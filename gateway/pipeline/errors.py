"""Gateway-made errors: the JSON answer ``{"error": {"code", "message", "request_id"}}``
with the status the contract gives each code."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web


class BodyTooLarge(Exception):
    """A request body past ``server.max_body_bytes``."""


@dataclass(frozen=True, slots=True)
class GatewayError:
    status: int
    code: str


NO_ROUTE = GatewayError(404, "no_route")
BODY_TOO_LARGE = GatewayError(413, "body_too_large")
UPSTREAM_UNAVAILABLE = GatewayError(502, "upstream_unavailable")
BAD_UPSTREAM_RESPONSE = GatewayError(502, "bad_upstream_response")
UPSTREAM_TIMEOUT = GatewayError(504, "upstream_timeout")
NO_HEALTHY_ENDPOINT = GatewayError(503, "no_healthy_endpoint")
UPSTREAM_OVERLOADED = GatewayError(503, "upstream_overloaded")
DRAINING = GatewayError(503, "draining")


def error_response(
    error: GatewayError, message: str, request_id: str, request_id_header: str
) -> web.Response:
    body = orjson.dumps(
        {"error": {"code": error.code, "message": message, "request_id": request_id}}
    )
    return web.Response(
        status=error.status,
        body=body,
        content_type="application/json",
        headers={request_id_header: request_id},
    )
