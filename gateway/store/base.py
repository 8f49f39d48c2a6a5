"""The state store interface: small JSON documents under string keys, with versions.

Every write bumps one store-wide *revision* counter and stamps the written entry with it.
That gives both compare-and-set without ABA (a deleted and re-created key never gets an
old version back) and a cheap change signal: a replica that polls ``revision()`` every
250 ms notices a write made through any other replica well within a second, whatever the
backend, without keeping a subscription alive across reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

DEFAULT_POLL_SECONDS = 0.25


class StoreError(Exception):
    """The backend failed (unreachable, corrupt, timed out). Callers catch only this."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: JSONDict
    version: int


@dataclass(frozen=True, slots=True)
class StoreHealth:
    backend: str
    ok: bool
    detail: str

    def as_dict(self) -> JSONDict:
        return {
            "backend": self.backend,
            "status": "ok" if self.ok else "error",
            "detail": self.detail,
        }


@runtime_checkable
class StateStore(Protocol):
    """Runtime state shared by one gateway (embedded) or all its replicas (Redis).

    ``ttl`` (seconds) makes an entry vanish on its own, for leases. ``compare_and_set``
    with ``expected_version=None`` means "only if absent"; it returns the new version, or
    None when the current version differs (nothing is written).
    """

    backend: str

    async def get(self, key: str) -> JSONDict | None: ...

    async def get_entry(self, key: str) -> Entry | None: ...

    async def put(self, key: str, value: JSONDict, *, ttl: float | None = None) -> int: ...

    async def compare_and_set(
        self,
        key: str,
        expected_version: int | None,
        value: JSONDict,
        *,
        ttl: float | None = None,
    ) -> int | None: ...

    async def delete(self, key: str) -> bool: ...

    async def scan_prefix(self, prefix: str) -> list[Entry]:
        """Live entries whose key starts with ``prefix``, sorted by key."""
        ...

    async def revision(self) -> int:
        """Store-wide counter that grows on every write by anyone."""
        ...

    async def health(self) -> StoreHealth: ...

    async def close(self) -> None: ...


def check_key(key: str) -> None:
    if not key:
        raise ValueError("state store key must be a non-empty string")


def check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be positive seconds, got {ttl}")


async def watch_revisions(
    store: StateStore,
    *,
    interval: float = DEFAULT_POLL_SECONDS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[int]:
    """Yield the store revision each time it changes (first the current one).

    A failing backend is logged and retried rather than ending the watch: the watcher is
    a background task whose consumer would otherwise silently stop following changes.
    """
    last: int | None = None
    while True:
        try:
            rev = await store.revision()
        except StoreError as exc:
            log.warning("state store revision poll failed: %s", exc)
        else:
            if rev != last:
                last = rev
                yield rev
        await sleep(interval)
