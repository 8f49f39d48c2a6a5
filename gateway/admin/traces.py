"""Request traces as the gateway counts them: per model, the open window and the last
closed ones (what was, or will be, written to Redis)."""

from __future__ import annotations

from aiohttp import web

from gateway.admin.common import TARGET, json_error, json_response


async def list_traces(request: web.Request) -> web.Response:
    tracer = request.app[TARGET].tracer
    if tracer is None:
        return json_error(404, "tracing_disabled", "tracing is not enabled")
    return json_response(
        {
            "models": [
                {"model": m, "pending": tracer.pending(m), "windows": len(tracer.recent(m))}
                for m in tracer.models()
            ]
        }
    )


async def get_traces(request: web.Request) -> web.Response:
    """The last closed windows of a model, as written (or to be written) to Redis."""
    tracer = request.app[TARGET].tracer
    if tracer is None:
        return json_error(404, "tracing_disabled", "tracing is not enabled")
    model = request.match_info["model"]
    if model not in tracer.models():
        return json_error(404, "unknown_model", f"no traffic traced for model {model!r}")
    return json_response(
        {
            "model": model,
            "pending": tracer.pending(model),
            "current": tracer.current(model),
            "windows": tracer.recent(model),
        }
    )
