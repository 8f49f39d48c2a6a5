"""The model version registry (``gateway.registry``): versions, aliases, history, and
promotion of a model's challenger.

Errors are the registry's: 404 ``unknown_model`` / ``unknown_version`` /
``unknown_alias``, 409 ``version_exists`` (the same number with other content),
``version_in_use`` (a version an alias points at), ``alias_changed`` (a move that
expected the alias elsewhere: ``expected_version`` in the body or an ``If-Match``
header with the version, as the alias's ``ETag`` gives it), 400 for bad bodies.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.admin.common import TARGET, json_error, json_response, refused, store_unavailable
from gateway.config import BackendConfig
from gateway.core import canary as core
from gateway.core.reference import is_reference, parse_reference
from gateway.core.refused import Refused
from gateway.registry import LATEST, Registry, RegistryError, Unchecked, check_name, parse_version
from gateway.store import StoreError

_VERSION_KEYS = {"version", "backend", "url", "endpoints", "metadata", "model", "actor", "reason"}


class _BadBody(Exception):
    pass


def add_routes(router: web.UrlDispatcher) -> None:
    base = "/api/v1/models"
    router.add_get(base, list_models)
    router.add_get(base + "/{model}", get_model)
    router.add_get(base + "/{model}/history", get_history)
    router.add_post(base + "/{model}/versions", post_version)
    router.add_get(base + "/{model}/versions/{version}", get_version)
    router.add_delete(base + "/{model}/versions/{version}", delete_version)
    router.add_get(base + "/{model}/aliases/{alias}", get_alias)
    router.add_put(base + "/{model}/aliases/{alias}", put_alias)
    router.add_delete(base + "/{model}/aliases/{alias}", delete_alias)
    router.add_post(base + "/{model}/promote", promote)


def _registry(request: web.Request) -> Registry:
    registry = request.app[TARGET].registry
    if registry is None:
        raise StoreError("the state store is not open")
    return registry


def _handled(handler: Any) -> Any:
    """Registry, body and store errors as JSON answers."""

    async def handle(request: web.Request) -> web.Response:
        try:
            response: web.Response = await handler(request)
            return response
        except Refused as error:
            return refused(error)
        except _BadBody as error:
            return json_error(400, "bad_request", str(error))
        except StoreError as error:
            return store_unavailable(error)

    handle.__name__ = handler.__name__
    handle.__doc__ = handler.__doc__
    return handle


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as error:
        raise _BadBody(f"body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise _BadBody("body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str, default: str) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or len(value) > 1000:
        raise _BadBody(f"{key} must be a string (up to 1000 characters)")
    return value


def _model(request: web.Request) -> str:
    return check_name("a model name", request.match_info["model"])


async def _summary(registry: Registry, model: str) -> dict[str, Any]:
    versions = await registry.versions(model)
    return {
        "name": model,
        "versions": [v.version for v in versions],
        "latest": versions[-1].version if versions else None,
        "aliases": await registry.aliases(model),
    }


@_handled
async def list_models(request: web.Request) -> web.Response:
    registry = _registry(request)
    return json_response({"models": [await _summary(registry, m) for m in await registry.models()]})


@_handled
async def get_model(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    await registry.require_model(model)
    versions = await registry.versions(model)
    return json_response(
        {
            **await _summary(registry, model),
            "versions": [v.as_dict() for v in versions],
            "history": await registry.history(model),
            "routes": _routes_of(request, model),
        }
    )


def _routes_of(request: web.Request, model: str) -> list[dict[str, Any]]:
    """The routes that reference the model, with what each reference resolves to now."""
    target = request.app[TARGET]
    found = []
    for route in target.routes.values():
        config = route.config
        named = {"champion": config.champion, "challenger": config.challenger}
        if config.shadow is not None:
            named["shadow"] = config.shadow_target
        refs = {
            role: name
            for role, name in named.items()
            if name is not None and is_reference(name) and parse_reference(name).model == model
        }
        if refs:
            found.append({"route": route.name, **refs})
    return found


@_handled
async def get_history(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    await registry.require_model(model)
    return json_response({"name": model, "history": await registry.history(model)})


@_handled
async def post_version(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    body = await _body(request)
    unknown = sorted(set(body) - _VERSION_KEYS)
    if unknown:
        raise _BadBody(
            f"unknown keys: {', '.join(unknown)} (known: {', '.join(sorted(_VERSION_KEYS))})"
        )
    version = body.get("version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise _BadBody("version must be a number")
        version = parse_version(version)
    served = [k for k in ("backend", "url", "endpoints") if body.get(k) is not None]
    if len(served) != 1:
        raise _BadBody('give one of "backend" (a backend of the config), "url" or "endpoints"')
    backend: str | None = None
    endpoints: tuple[str, ...] = ()
    if "backend" in served:
        backend = body["backend"]
        known = request.app[TARGET].config.backends
        if not isinstance(backend, str) or backend not in known:
            raise _BadBody(
                f"backend must name a backend of the config (known: {', '.join(sorted(known))})"
            )
    else:
        urls = [body["url"]] if "url" in served else body["endpoints"]
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
            raise _BadBody("url must be a URL string, endpoints a non-empty list of them")
        try:
            endpoints = tuple(BackendConfig(endpoints=urls).urls)
        except ValidationError as error:
            raise _BadBody(error.errors()[0]["msg"].removeprefix("Value error, ")) from None
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _BadBody("metadata must be a JSON object")
    trace_model = body.get("model")
    if trace_model is not None and (not isinstance(trace_model, str) or not trace_model):
        raise _BadBody("model (the name its load is traced under) must be a non-empty string")
    registered, new = await registry.register(
        model, version=version, backend=backend, endpoints=endpoints, trace_model=trace_model,
        metadata=metadata, actor=_text(body, "actor", "admin"), reason=_text(body, "reason", ""),
    )  # fmt: skip
    return json_response(registered.as_dict(), 201 if new else 200)


def _version_in_path(request: web.Request) -> int:
    return parse_version(request.match_info["version"])


@_handled
async def get_version(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    return json_response((await registry.version(model, _version_in_path(request))).as_dict())


@_handled
async def delete_version(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    body = await _body(request)
    deleted = await registry.delete_version(
        model, _version_in_path(request),
        actor=_text(body, "actor", "admin"), reason=_text(body, "reason", ""),
    )  # fmt: skip
    return json_response({"deleted": deleted.as_dict()})


def _alias_view(model: str, alias: str, version: int | None, **more: Any) -> web.Response:
    response = json_response({"model": model, "alias": alias, "version": version, **more})
    if version is not None:
        response.headers["ETag"] = f'"{version}"'
    return response


@_handled
async def get_alias(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    alias = request.match_info["alias"]
    await registry.require_model(model)
    resolved = await registry.resolve(model, alias)
    if resolved is None:
        raise RegistryError(404, "unknown_alias", f"model {model!r} has no alias {alias!r}")
    return _alias_view(model, alias, resolved.version)


def _expected(request: web.Request, body: dict[str, Any]) -> int | Literal[Unchecked.ANY] | None:
    """Where the caller expects the alias to point: ``expected_version`` (a version, or
    null for "unset"), or the ``If-Match`` header (the alias's ETag)."""
    if "expected_version" in body:
        value = body["expected_version"]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _BadBody("expected_version must be a version number or null")
        return parse_version(value)
    match = request.headers.get("If-Match")
    if match is None or match.strip() == "*":
        return Unchecked.ANY
    return parse_version(match.strip().removeprefix("W/").strip('"'))


@_handled
async def put_alias(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    alias = request.match_info["alias"]
    body = await _body(request)
    unknown = sorted(set(body) - {"version", "expected_version", "actor", "reason"})
    if unknown:
        raise _BadBody(f"unknown keys: {', '.join(unknown)}")
    if "version" not in body:
        raise _BadBody('body must be {"version": N} (and optionally "expected_version")')
    version = body["version"]
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise _BadBody("version must be a number")
    number = parse_version(version)
    expected = _expected(request, body)
    await registry.require_model(model)
    before = await registry.move_alias(
        model, alias, number, expected=expected,
        actor=_text(body, "actor", "admin"), reason=_text(body, "reason", ""),
    )  # fmt: skip
    await _followed(request)
    return _alias_view(model, alias, number, previous=before)


@_handled
async def delete_alias(request: web.Request) -> web.Response:
    registry, model = _registry(request), _model(request)
    alias = request.match_info["alias"]
    if alias == LATEST:
        raise RegistryError(400, "bad_alias", "latest always names the highest version")
    body = await _body(request)
    expected = _expected(request, body)
    before = await registry.delete_alias(
        model, alias, expected=Unchecked.ANY if expected is None else expected,
        actor=_text(body, "actor", "admin"), reason=_text(body, "reason", ""),
    )  # fmt: skip
    await _followed(request)
    return _alias_view(model, alias, None, previous=before)


async def _followed(request: web.Request) -> None:
    """This process's routes follow a change made through it at once (the others
    within a second)."""
    await request.app[TARGET].references.refresh()


@_handled
async def promote(request: web.Request) -> web.Response:
    """The challenger's version becomes champion (``previous`` keeps the old one, the
    challenger alias is cleared), and every route that serves the model by those aliases
    sends its challenger nothing more (weight 0). A route whose canary is running is
    promoted through its canary (its state says so)."""
    registry, model = _registry(request), _model(request)
    body = await _body(request)
    actor = _text(body, "actor", "admin")
    target = request.app[TARGET]
    champion, challenger = f"model:{model}@champion", f"model:{model}@challenger"
    routes = [
        r.name
        for r in target.routes.values()
        if r.config.champion == champion and r.config.challenger == challenger
    ]
    canaried = [
        name
        for name in routes
        if (status := target.controller.status(name)) is not None and status.state in core.ACTIVE
    ]
    if canaried:
        # Its steering moves the aliases (and sets its weight to 0).
        await target.controller.command(canaried[0], core.Action.PROMOTE)
    else:
        await registry.promote(model, actor=actor, reason=_text(body, "reason", ""))
    await _followed(request)
    for name in routes:
        if name not in canaried[:1]:
            await target.steering.set_weight(name, 0.0, actor=actor)
    return json_response({**await _summary(registry, model), "routes": routes})
