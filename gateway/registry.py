"""The model version registry, kept in the state store so that every replica and every
restart sees the same one.

A model has **versions**, numbered from 1 and immutable once registered: where the version
is served (a ``backend`` named in the config, or a ``url`` / ``endpoints``), the model
name its load is traced under, free-form metadata, when and by whom it was registered.
**Aliases** (``champion``, ``challenger``, ``previous``, or any other name) point at
versions and move; ``latest`` is not stored, it always resolves to the highest version.
Every registration, alias move and deletion is appended to the model's **history**
with its time, actor and reason.

Concurrency, with nothing but the store's compare-and-set:

- a version is written only if absent: two registrations of the same number cannot both
  win, and one with the same content again is answered as done (idempotent);
- an alias move may say which version it expects the alias to point at now
  (``expected_version``); the move is then a compare-and-set on the alias, so two
  operators cannot lose each other's change (409 ``alias_changed``);
- history entries are numbered by a per-model counter taken with compare-and-set, so
  they are ordered as they happened, whichever replica wrote them.

Store keys, under ``registry/{model}/``: ``versions/{n:010d}``, ``aliases/{alias}``
(``{"version": null}`` once deleted: cleared by compare-and-set, never removed),
``seq`` (the history counter) and ``history/{seq:012d}``.
"""

from __future__ import annotations

import contextlib
import enum
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.core.refused import Refused
from gateway.store import StateStore

PREFIX = "registry/"
LATEST = "latest"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_CAS_ATTEMPTS = 20
# Versions are stored under ten-digit keys and read back in key order (latest is the
# last): a number of more digits would sort before smaller ones.
MAX_VERSION = 9_999_999_999


class Unchecked(enum.Enum):
    """An alias move that does not say where it expects the alias to point."""

    ANY = "any"


class RegistryError(Refused):
    """A request the registry refuses."""


@dataclass(frozen=True, slots=True)
class Version:
    model: str
    version: int
    backend: str | None = None
    endpoints: tuple[str, ...] = ()  # when served by URL (one or several)
    trace_model: str = ""  # the name its load is traced under
    metadata: Mapping[str, Any] = field(default_factory=dict)
    registered_at: float = 0.0
    actor: str = ""

    def content(self) -> dict[str, Any]:
        """What makes a version what it is (not when or by whom it was registered)."""
        return {
            "backend": self.backend,
            "endpoints": list(self.endpoints),
            "trace_model": self.trace_model,
            "metadata": dict(self.metadata),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            **self.content(),
            "registered_at": self.registered_at,
            "actor": self.actor,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Version:
        return cls(
            model=str(value["model"]),
            version=int(value["version"]),
            backend=value.get("backend"),
            endpoints=tuple(value.get("endpoints") or ()),
            trace_model=str(value.get("trace_model") or ""),
            metadata=dict(value.get("metadata") or {}),
            registered_at=float(value.get("registered_at") or 0.0),
            actor=str(value.get("actor") or ""),
        )


def check_name(what: str, name: str) -> str:
    if not NAME.match(name):
        raise RegistryError(
            400, "bad_request", f"{what} must be 1-128 of A-Z a-z 0-9 _ . -, got {name!r}"
        )
    return name


def parse_version(text: str | int) -> int:
    try:
        version = int(text)
    except (TypeError, ValueError):
        raise RegistryError(400, "bad_version", f"a version is a number, got {text!r}") from None
    if version < 1:
        raise RegistryError(400, "bad_version", f"versions start at 1, got {version}")
    if version > MAX_VERSION:
        raise RegistryError(400, "bad_version", f"versions go up to {MAX_VERSION}, got {version}")
    return version


def _target(record: Mapping[str, Any]) -> int | None:
    """The version an alias record points at (None: cleared)."""
    version = record.get("version")
    return int(version) if version is not None else None


def _key(model: str, *parts: str) -> str:
    return PREFIX + model + "/" + "/".join(parts)


def _version_key(model: str, version: int) -> str:
    return _key(model, "versions", f"{version:010d}")


def _live(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A version record, or None for none or a deleted one. A deleted version leaves a
    record saying so (a tombstone), so that its number is never given again: a route
    pinned to ``@7`` must never find other content there."""
    return None if value is None or value.get("deleted") else value


class Registry:
    """The registry on a state store. Every method reads or writes the store: the
    registry is what the store holds, nothing is cached here."""

    def __init__(
        self,
        store: StateStore,
        *,
        clock: Callable[[], float] = time.time,
        on_move: Callable[[str, str], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        # Told (model, alias) of every alias this process moves or deletes: the metric.
        self._on_move = on_move

    # --- reading --------------------------------------------------------------------------

    async def models(self) -> list[str]:
        names = {
            e.key[len(PREFIX) :].split("/", 1)[0] for e in await self._store.scan_prefix(PREFIX)
        }
        return sorted(names)

    async def versions(self, model: str) -> list[Version]:
        entries = await self._store.scan_prefix(_key(model, "versions", ""))
        return [Version.from_dict(e.value) for e in entries if _live(e.value) is not None]

    async def aliases(self, model: str) -> dict[str, int]:
        entries = await self._store.scan_prefix(_key(model, "aliases", ""))
        found = ((e.key.rsplit("/", 1)[1], _target(e.value)) for e in entries)
        return {alias: version for alias, version in found if version is not None}

    async def history(self, model: str) -> list[dict[str, Any]]:
        return [e.value for e in await self._store.scan_prefix(_key(model, "history", ""))]

    async def version(self, model: str, version: int) -> Version:
        value = await self._store.get(_version_key(model, version))
        if value is None:
            raise RegistryError(404, "unknown_version", f"model {model!r} has no version {version}")
        if _live(value) is None:
            raise RegistryError(
                404, "unknown_version", f"model {model!r} version {version} was deleted"
            )
        return Version.from_dict(value)

    async def resolve(self, model: str, alias_or_version: str) -> Version | None:
        """What ``model:NAME@ALIAS`` (or ``@VERSION``, or ``@latest``) points at now; None
        when it points nowhere (no such model, alias or version)."""
        # ASCII digits only: str.isdigit() is true of "²", which int() refuses.
        if alias_or_version.isascii() and alias_or_version.isdigit():
            value = _live(await self._store.get(_version_key(model, int(alias_or_version))))
            return Version.from_dict(value) if value is not None else None
        if alias_or_version == LATEST:
            versions = await self.versions(model)
            return versions[-1] if versions else None
        target = await self._store.get(_key(model, "aliases", alias_or_version))
        number = _target(target) if target is not None else None
        if number is None:
            return None
        value = _live(await self._store.get(_version_key(model, number)))
        return Version.from_dict(value) if value is not None else None

    async def require_model(self, model: str) -> None:
        if not await self._store.scan_prefix(_key(model, "versions", "")):  # tombstones count
            raise RegistryError(404, "unknown_model", f"no model named {model!r}")

    # --- changing -------------------------------------------------------------------------

    async def register(
        self,
        model: str,
        *,
        version: int | None = None,
        backend: str | None = None,
        endpoints: tuple[str, ...] = (),
        trace_model: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        actor: str = "admin",
        reason: str = "",
    ) -> tuple[Version, bool]:
        """Register a version (numbered next when ``version`` is None); returns it and
        whether it is new (False: the same content was registered already)."""
        check_name("a model name", model)
        if (backend is None) == (not endpoints):
            raise RegistryError(
                400, "bad_request", "a version is served by a backend or by url/endpoints, one"
            )
        if version is not None:
            parse_version(version)
        for attempt in range(_CAS_ATTEMPTS):
            number = version if version is not None else await self._next_number(model)
            if number > MAX_VERSION:
                raise RegistryError(
                    409, "no_version_number",
                    f"{model} has version {MAX_VERSION}, the highest there can be: give "
                    "the new one a free number below it",
                )  # fmt: skip
            candidate = Version(
                model, number, backend, tuple(endpoints), trace_model or f"{model}-v{number}",
                dict(metadata or {}), self._clock(), actor,
            )  # fmt: skip
            key = _version_key(model, number)
            if await self._store.compare_and_set(key, None, candidate.as_dict()) is not None:
                await self._record(model, "register", actor, reason, version=number)
                return candidate, True
            existing = await self._store.get(key)
            if existing is None:
                continue  # deleted meanwhile: try again
            if _live(existing) is None:
                if version is not None:
                    raise RegistryError(
                        409, "version_exists",
                        f"{model} version {number} was registered and deleted: numbers are "
                        "never given twice (register a new one)",
                    )  # fmt: skip
                continue  # an assigned number deleted meanwhile: the next one
            found = Version.from_dict(existing)
            if version is not None or attempt == _CAS_ATTEMPTS - 1:
                if found.content() == candidate.content():
                    return found, False
                raise RegistryError(
                    409, "version_exists",
                    f"{model} version {number} is registered already, with other content "
                    "(versions are immutable: register a new one)",
                )  # fmt: skip
            # An assigned number another registration took first: the next one.
        raise RegistryError(409, "conflict", f"{model}: too many registrations at once")

    async def _next_number(self, model: str) -> int:
        # Past the highest ever given, deleted ones included.
        versions = await self._store.scan_prefix(_key(model, "versions", ""))
        return (int(versions[-1].value["version"]) + 1) if versions else 1

    async def move_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected: int | Literal[Unchecked.ANY] | None = Unchecked.ANY,
        actor: str = "admin",
        reason: str = "",
    ) -> int | None:
        """Point ``alias`` at ``version``; returns the version it pointed at before.
        ``expected`` (a version, or None for "unset"): refused with 409 ``alias_changed``
        unless the alias points there at the moment of the move."""
        check_name("an alias", alias)
        if alias == LATEST:
            raise RegistryError(400, "bad_alias", "latest always names the highest version")
        await self.version(model, version)  # 404 for a version that does not exist
        key = _key(model, "aliases", alias)
        for _ in range(_CAS_ATTEMPTS):
            entry = await self._store.get_entry(key)
            before = _target(entry.value) if entry is not None else None
            if expected is not Unchecked.ANY and expected != before:
                raise RegistryError(
                    409, "alias_changed",
                    f"{model}@{alias} points at {before}, not {expected}: it moved meanwhile",
                )  # fmt: skip
            record = {"version": version, "updated_at": self._clock(), "actor": actor}
            written = await self._store.compare_and_set(
                key, entry.version if entry is not None else None, record
            )
            if written is not None:
                if _live(await self._store.get(_version_key(model, version))) is None:
                    # Deleted between the check above and the move (delete_version checks
                    # the aliases after its write, as this checks the version after its
                    # own: one of the two sees the other). The alias goes back.
                    restored = entry.value if entry is not None else {"version": None}
                    await self._store.compare_and_set(key, written, dict(restored))
                    raise RegistryError(
                        404, "unknown_version", f"model {model!r} version {version} was deleted"
                    )
                await self._record(
                    model, "alias", actor, reason, alias=alias, version=version, previous=before
                )
                if self._on_move is not None:
                    self._on_move(model, alias)
                return before
        raise RegistryError(409, "alias_changed", f"{model}@{alias} kept moving; try again")

    async def delete_alias(
        self,
        model: str,
        alias: str,
        *,
        expected: int | Literal[Unchecked.ANY] = Unchecked.ANY,
        actor: str = "admin",
        reason: str = "",
    ) -> int:
        """Remove an alias; returns the version it pointed at. ``expected``: refused with
        409 ``alias_changed`` unless it points there (a move in between is not undone)."""
        key = _key(model, "aliases", alias)
        for _ in range(_CAS_ATTEMPTS):
            entry = await self._store.get_entry(key)
            before = _target(entry.value) if entry is not None else None
            if entry is None or before is None:
                raise RegistryError(
                    404, "unknown_alias", f"model {model!r} has no alias {alias!r}"
                )
            if expected is not Unchecked.ANY and expected != before:
                raise RegistryError(
                    409, "alias_changed",
                    f"{model}@{alias} points at {before}, not {expected}: it moved meanwhile",
                )  # fmt: skip
            # Cleared, not deleted: the store has no compare-and-delete, and a delete after
            # a check could undo a move made in between.
            record = {"version": None, "updated_at": self._clock(), "actor": actor}
            if await self._store.compare_and_set(key, entry.version, record) is None:
                continue
            await self._record(model, "unalias", actor, reason, alias=alias, previous=before)
            if self._on_move is not None:
                self._on_move(model, alias)
            return before
        raise RegistryError(409, "alias_changed", f"{model}@{alias} kept moving; try again")

    # --- promotion ------------------------------------------------------------------------

    async def promote(
        self,
        model: str,
        *,
        champion: str = "champion",
        challenger: str = "challenger",
        previous: str = "previous",
        actor: str = "admin",
        reason: str = "",
    ) -> tuple[int | None, int]:
        """The challenger's version becomes champion: ``previous`` := the old champion's
        version, ``champion`` := the challenger's, ``challenger`` cleared. Returns (old
        champion, new champion). The champion's move is the compare-and-set that decides:
        of two promotions at once, one wins and the other gets 409 ``alias_changed``."""
        new, old = await self._rotate(
            model, champion, source=challenger, keeper=previous, actor=actor, reason=reason,
            what=f"promoted {model}@{challenger}", code="no_challenger",
            nothing="there is nothing to promote",
        )  # fmt: skip
        return old, new

    async def demote(
        self,
        model: str,
        *,
        champion: str = "champion",
        challenger: str = "challenger",
        previous: str = "previous",
        actor: str = "admin",
        reason: str = "",
    ) -> tuple[int, int | None]:
        """Undo a promotion: ``champion`` := ``previous``'s version, ``challenger`` := the
        demoted champion's, ``previous`` cleared. Returns (restored champion, demoted)."""
        return await self._rotate(
            model, champion, source=previous, keeper=challenger, actor=actor,
            reason=reason, what=f"rolled back to {model}@{previous}", code="no_previous",
            nothing="there is no promotion to undo",
        )  # fmt: skip

    async def _rotate(
        self, model: str, champion: str, *, source: str, keeper: str, actor: str, reason: str,
        what: str, code: str, nothing: str,
    ) -> tuple[int, int | None]:
        """Promotion and its undoing are one rotation: ``champion`` := ``source``'s
        version, ``keeper`` := the champion's before (when it had one, and another),
        ``source`` cleared. Returns (new champion, old champion). The champion's move is
        the compare-and-set that decides: of two rotations at once, one wins and the
        other gets 409 ``alias_changed``."""
        await self.require_model(model)
        aliases = await self.aliases(model)
        new = aliases.get(source)
        if new is None:
            raise RegistryError(
                409, code, f"{model}@{source} points at no version: {nothing}"
            )  # fmt: skip
        old = aliases.get(champion)
        why = reason or f"{what} (version {new})"
        await self.move_alias(model, champion, new, expected=old, actor=actor, reason=why)
        if old is not None and old != new:
            await self.move_alias(model, keeper, old, actor=actor, reason=why)
        with contextlib.suppress(RegistryError):  # moved or cleared meanwhile: leave it
            await self.delete_alias(model, source, expected=new, actor=actor, reason=why)
        return new, old

    async def delete_version(
        self, model: str, version: int, *, actor: str = "admin", reason: str = ""
    ) -> Version:
        found = await self.version(model, version)
        await self._refuse_if_aliased(model, version)
        key = _version_key(model, version)
        tombstone = {"model": model, "version": version, "deleted": True,
                     "deleted_at": self._clock(), "actor": actor}  # fmt: skip
        await self._store.put(key, tombstone)
        try:
            # An alias moved onto it between the check and the delete (the store has no
            # transactions): the version comes back, and the delete is refused after all.
            await self._refuse_if_aliased(model, version)
        except RegistryError:
            await self._store.put(key, found.as_dict())
            raise
        await self._record(model, "delete", actor, reason, version=version)
        return found

    async def _refuse_if_aliased(self, model: str, version: int) -> None:
        users = sorted(a for a, v in (await self.aliases(model)).items() if v == version)
        if users:
            raise RegistryError(
                409, "version_in_use",
                f"{model} version {version} is what {', '.join(users)} point(s) at: move "
                "the alias(es) first",
            )  # fmt: skip

    async def _record(self, model: str, action: str, actor: str, reason: str, **what: Any) -> None:
        """Append to the model's history, numbered by a compare-and-set counter."""
        key = _key(model, "seq")
        for _ in range(_CAS_ATTEMPTS * 5):
            entry = await self._store.get_entry(key)
            seq = int(entry.value["seq"]) + 1 if entry is not None else 1
            written = await self._store.compare_and_set(
                key, entry.version if entry is not None else None, {"seq": seq}
            )
            if written is not None:
                event = {"seq": seq, "at": self._clock(), "action": action, "actor": actor,
                         "reason": reason, **what}  # fmt: skip
                await self._store.put(_key(model, "history", f"{seq:012d}"), event)
                return
        raise RegistryError(409, "conflict", f"{model}: too many changes at once")
