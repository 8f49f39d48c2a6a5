"""Runtime state that survives restarts: embedded SQLite by default, Redis when shared."""

from __future__ import annotations

from gateway.store.base import (
    Entry,
    JSONDict,
    StateStore,
    StoreError,
    StoreHealth,
    watch_revisions,
)

__all__ = [
    "Entry",
    "JSONDict",
    "StateStore",
    "StoreError",
    "StoreHealth",
    "open_store",
    "watch_revisions",
]


def open_store(
    backend: str, path: str, redis_url: str | None, key_prefix: str = "gateway:state:"
) -> StateStore:
    """Build the store the config names. Imports are local so the embedded default never
    loads the Redis client code, and vice versa."""
    if backend == "embedded":
        from gateway.store.embedded import EmbeddedStore

        return EmbeddedStore(path)
    if backend == "redis":
        if not redis_url:
            raise ValueError("state.redis_url is required when state.backend is redis")
        from gateway.store.redis import RedisStore

        return RedisStore.from_url(redis_url, key_prefix=key_prefix)
    raise ValueError(f"unknown state backend {backend!r} (expected embedded or redis)")
