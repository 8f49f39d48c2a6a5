"""Registry references in a route: ``model:NAME@ALIAS`` or ``model:NAME@VERSION``.

A route's champion, challenger or shadow target names either a backend of the config or
a model of the registry (``gateway.registry``); this module tells them apart and parses
the latter, once, at load time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "model:"
_NAME = r"[A-Za-z0-9_.-]{1,128}"
_REFERENCE = re.compile(rf"^model:(?P<model>{_NAME})@(?P<selector>{_NAME})$")


@dataclass(frozen=True, slots=True)
class Reference:
    """``model:iris@champion``: the model and what picks its version (an alias, a version
    number, or ``latest``)."""

    model: str
    selector: str

    @property
    def version(self) -> int | None:
        """The version number a ``model:NAME@7`` names (None for an alias)."""
        return int(self.selector) if self.selector.isdigit() else None

    @property
    def alias(self) -> str | None:
        return None if self.selector.isdigit() else self.selector

    def __str__(self) -> str:
        return f"{SCHEME}{self.model}@{self.selector}"


def is_reference(name: str | None) -> bool:
    """Whether a route's champion/challenger/shadow target names the registry."""
    return name is not None and name.startswith(SCHEME)


def parse_reference(text: str) -> Reference:
    """The reference ``text`` names; ValueError saying why when it is not one."""
    found = _REFERENCE.match(text)
    if found is None:
        raise ValueError(
            f"a registry reference is model:NAME@ALIAS or model:NAME@VERSION (names of "
            f"A-Z a-z 0-9 _ . -), got {text!r}"
        )
    selector = found["selector"]
    if selector.isdigit() and int(selector) < 1:
        raise ValueError(f"versions start at 1, got {text!r}")
    return Reference(found["model"], selector)


def promotable(champion: str, challenger: str | None) -> bool:
    """Whether a route that names the registry can be promoted: a promotion moves aliases,
    so its champion and challenger must be two aliases of one model (not a version
    number, not ``latest``). Routes of plain backends always can."""
    named = [n for n in (champion, challenger) if n is not None and is_reference(n)]
    if not named:
        return True
    if len(named) != 2:
        return False
    try:
        first, second = (parse_reference(n) for n in named)
    except ValueError:
        return False
    return (
        first.model == second.model
        and first.alias not in (None, "latest")
        and second.alias not in (None, "latest")
    )
