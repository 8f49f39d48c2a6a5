"""Gateway-made errors: the JSON answer ``{"error": {"code", "message", "request_id"}}``
with the status the contract gives each code."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

# The answer header naming the variant that served a request (and the request header
# that forces one where a route allows it).
VARIANT_HEADER = "X-Gateway-Variant"


class BodyTooLarge(Exception):
    """A request body past ``server.max_body_bytes``."""


class Overloaded(Exception):
    """Buffering a body would take the gateway past ``server.max_buffered_bytes``."""


class BodyTimeout(Exception):
    """The client sent no next piece of its body within ``server.body_timeout_seconds``.

    Not a TimeoutError: code that waits on a backend takes those as the backend's."""


@dataclass(frozen=True, slots=True)
class GatewayError:
    status: int
    code: str


BAD_REQUEST = GatewayError(400, "bad_request")
NO_ROUTE = GatewayError(404, "no_route")
REQUEST_TIMEOUT = GatewayError(408, "request_timeout")
BODY_TOO_LARGE = GatewayError(413, "body_too_large")
HEADERS_TOO_LARGE = GatewayError(431, "headers_too_large")
OVERLOADED = GatewayError(503, "overloaded")
UPSTREAM_UNAVAILABLE = GatewayError(502, "upstream_unavailable")
BAD_UPSTREAM_RESPONSE = GatewayError(502, "bad_upstream_response")
UPSTREAM_TIMEOUT = GatewayError(504, "upstream_timeout")
NO_HEALTHY_ENDPOINT = GatewayError(503, "no_healthy_endpoint")
UPSTREAM_OVERLOADED = GatewayError(503, "upstream_overloaded")
DRAINING = GatewayError(503, "draining")


def error_body(error: GatewayError, message: str, request_id: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": error.code, "message": message, "request_id": request_id}}
    )


def error_response(
    error: GatewayError,
    message: str,
    request_id: str,
    request_id_header: str,
    variant: str = "",
) -> web.Response:
    """The JSON answer; ``variant`` (the X-Gateway-Variant value) once a request is
    routed, so that every answer to a routed request says which variant it went to."""
    headers = {request_id_header: request_id}
    if variant:
        headers[VARIANT_HEADER] = variant
    return web.Response(
        status=error.status,
        body=error_body(error, message, request_id),
        content_type="application/json",
        headers=headers,
    )
