"""The status page at ``/``: a static page (HTML, CSS and plain JavaScript in
``static/``) that polls the JSON API and draws routes, weights, canaries, shadow
agreement and endpoint health. It holds no data itself, so it needs no token; the API
calls it makes do, and it asks for the token when they answer 401."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_STATIC = resources.files("gateway.admin") / "static"
# What is served, by path: (file, content type). Nothing else is read from disk.
_FILES = {
    "/": ("index.html", "text/html"),
    "/static/status.js": ("status.js", "text/javascript"),
    "/static/status.css": ("status.css", "text/css"),
}
_HEADERS = {
    # The page's own files and its same-origin API calls, nothing else; no framing.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def serve(request: web.Request) -> web.Response:
    name, content_type = _FILES[request.path]
    body = (_STATIC / name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=_HEADERS)


def add_routes(router: web.UrlDispatcher) -> None:
    for path in _FILES:
        router.add_get(path, serve)
