"""Request paths as routing sees them: normalised, and matched at segment boundaries.

A route's ``path_prefix`` confines what a client reaches on the backend, so the path it
is matched against must be the path the backend will act on. Routing therefore runs on
the *normalised* path (RFC 3986 6.2.2), which is also the path sent upstream:

- percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded, and the
  hex digits of every other escape are uppercased (``%2e`` is ``.``, ``%3a`` is
  ``%3A``);
- dot segments are resolved (RFC 3986 5.2.4), so ``/v1/models/a/../b`` is
  ``/v1/models/b``; a path that would climb above ``/`` is refused;
- an encoded slash or backslash (``%2F``, ``%5C``), a raw backslash, a malformed escape,
  a control character or a space is refused: servers disagree on what they mean, which
  is exactly what lets a path escape its prefix.

Nothing else changes (``//`` stays, the query is not touched).

A prefix matches a path at a segment boundary: ``/v2/models/iris`` matches
``/v2/models/iris`` and ``/v2/models/iris/infer``, never ``/v2/models/iris-v1``. ``:``
after the prefix is a boundary too, for TF Serving's ``/v1/models/NAME:predict`` (and
Google-style ``/v1/NAME:verb`` APIs); a prefix ending in ``/`` matches whatever follows.
"""

from __future__ import annotations

import re

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a normalised path never holds: controls, space, DEL, backslash, and those
# that end a path (query, fragment).
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\#]")
_ESCAPE = re.compile(r"%(?:([0-9A-Fa-f]{2})|(.{0,2}))", re.DOTALL)
_SEPARATORS = frozenset({"2F", "5C"})  # encoded "/" and "\"


class BadPath(ValueError):
    """A path that cannot be normalised; the message says why (it is shown to clients)."""


def normalise_path(path: str) -> str:
    """``path`` (origin-form, no query) in normal form; raises BadPath."""
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    bad = _FORBIDDEN.search(path)
    if bad is not None:
        raise BadPath(f"the path may not contain {bad.group()!r}")
    if "%" in path:
        path = _ESCAPE.sub(_decode_escape, path)
    if "." in path:
        path = _resolve_dots(path)
    return path


def _decode_escape(match: re.Match[str]) -> str:
    digits = match.group(1)
    if digits is None:
        raise BadPath(f"malformed percent-escape {match.group()!r}")
    digits = digits.upper()
    if digits in _SEPARATORS:
        raise BadPath(f"an encoded {'slash' if digits == '2F' else 'backslash'} (%{digits})")
    char = chr(int(digits, 16))
    return char if char in UNRESERVED else f"%{digits}"


def _resolve_dots(path: str) -> str:
    segments = path.split("/")
    if "." not in segments and ".." not in segments:
        return path
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if not kept:
                raise BadPath("the path climbs above '/'")
            kept.pop()
        elif segment != ".":
            kept.append(segment)
    # "/a/." and "/a/.." name a directory: the trailing slash stays (RFC 3986 5.2.4).
    if segments[-1] in (".", ".."):
        kept.append("")
    return "/" + "/".join(kept)


def prefix_matches(prefix: str, path: str) -> bool:
    """Whether ``prefix`` matches ``path`` at a segment boundary (see the module doc)."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] in "/:"


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """``path`` (which ``prefix`` matches) with the matched prefix replaced: a backend's
    ``path_prefix``. ``/v1/models/s:predict`` with prefix ``/v1/models/s`` and
    replacement ``/v1/models/s-v2`` is ``/v1/models/s-v2:predict``."""
    rest = path[len(prefix.rstrip("/")) :]  # "", or starts with "/" or ":"
    rewritten = replacement.rstrip("/") + rest
    if not rewritten.startswith("/"):
        rewritten = "/" + rewritten
    return rewritten
