"""What a backend is sent, when it names things differently from the route: its
``path_prefix`` replaces the part of the path the route's prefix matched, and its
``model_name`` replaces the JSON body's ``model``. So one public name can front
versions that their servers call differently (``/v1/models/sentiment`` served as
``/v1/models/sentiment-v2`` by MLServer, ``"model": "llama"`` as ``"llama-3.1-8b"`` by
vLLM).

A ``Rewrite`` is made once per route and backend, at config load; a lane without one
(the usual case) costs nothing per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import BackendConfig
from gateway.core.jsonbody import replace_model
from gateway.core.paths import replace_prefix
from gateway.pipeline.target import Target


@dataclass(frozen=True, slots=True)
class Rewrite:
    route_prefix: str  # the route's match.path_prefix
    path_prefix: str | None  # the backend's
    model_name: str | None

    def target(self, target: Target) -> str:
        """The request target sent to the backend."""
        if self.path_prefix is None:
            return target.upstream
        return replace_prefix(target.path, self.route_prefix, self.path_prefix) + target.query

    def body(self, body: bytes) -> bytes:
        """The body sent to the backend: ``model`` replaced (a body without one, or not
        JSON, is sent as it is)."""
        if self.model_name is None:
            return body
        replaced = replace_model(body, self.model_name)
        return body if replaced is None else replaced


def rewrite_for(route_prefix: str, backend: BackendConfig | None) -> Rewrite | None:
    """The rewrite of requests a route (by its prefix) sends to ``backend``, or None."""
    if backend is None or (backend.path_prefix is None and backend.model_name is None):
        return None
    return Rewrite(route_prefix, backend.path_prefix, backend.model_name)
