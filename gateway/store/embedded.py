"""SQLite state store: one file, WAL mode, nothing else running.

All SQLite work happens on one dedicated thread that owns the connection, so the event
loop never blocks on disk and the connection is never shared between threads. Several
processes may open the same file (WAL allows concurrent readers and one writer; writes
take the lock up front with BEGIN IMMEDIATE so a CAS cannot interleave with another).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import orjson

from gateway.store.base import (
    Entry,
    JSONDict,
    StoreError,
    StoreHealth,
    check_key,
    check_ttl,
)

T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS kv (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        version INTEGER NOT NULL,
        expires_at REAL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"


def _like_escape(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class EmbeddedStore:
    backend = "embedded"

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = str(path)
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        # Open now, on the worker thread, so a bad path fails at startup, not at the
        # first admin call.
        self._executor.submit(self._open).result()

    # -- thread side ------------------------------------------------------------------

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so a read never holds a lock.
        conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only an OS crash can
        # lose the last commits, which is acceptable for weights an operator re-sets.
        conn.execute("PRAGMA synchronous=NORMAL")
        for stmt in _SCHEMA:
            conn.execute(stmt)
        # Seeded from the clock (ms) rather than 0, so a store re-created from scratch
        # never repeats revisions a watcher has already seen (see gateway.store.redis).
        conn.execute(
            "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', ?)",
            (int(self._clock() * 1000),),
        )
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("embedded store is closed")
        return self._conn

    def _get(self, key: str) -> Entry | None:
        row = (
            self._db()
            .execute(
                f"SELECT value, version FROM kv WHERE key = ? AND {_LIVE}", (key, self._clock())
            )
            .fetchone()
        )
        if row is None:
            return None
        return Entry(key, orjson.loads(row[0]), int(row[1]))

    def _write(
        self, key: str, expected: int | None, check: bool, blob: bytes, ttl: float | None
    ) -> int | None:
        db = self._db()
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            if check:
                row = db.execute(
                    f"SELECT version FROM kv WHERE key = ? AND {_LIVE}", (key, now)
                ).fetchone()
                current = None if row is None else int(row[0])
                if current != expected:
                    db.execute("ROLLBACK")
                    return None
            rev = self._bump(db)
            db.execute(
                "INSERT INTO kv (key, value, version, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                "version = excluded.version, expires_at = excluded.expires_at",
                (key, blob, rev, None if ttl is None else now + ttl),
            )
            db.execute("COMMIT")
            return rev
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _delete(self, key: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            live = db.execute(
                f"SELECT 1 FROM kv WHERE key = ? AND {_LIVE}", (key, self._clock())
            ).fetchone()
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            if live is not None:
                self._bump(db)
            db.execute("COMMIT")
            return live is not None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        row = db.execute(
            "UPDATE meta SET value = value + 1 WHERE name = 'revision' RETURNING value"
        ).fetchone()
        return int(row[0])

    def _scan(self, prefix: str) -> list[Entry]:
        rows = (
            self._db()
            .execute(
                f"SELECT key, value, version FROM kv WHERE key LIKE ? ESCAPE '\\' AND {_LIVE} "
                "ORDER BY key",
                (_like_escape(prefix) + "%", self._clock()),
            )
            .fetchall()
        )
        # LIKE is case-insensitive for ASCII; the exact check keeps prefixes exact.
        return [Entry(k, orjson.loads(v), int(ver)) for k, v, ver in rows if k.startswith(prefix)]

    def _revision(self) -> int:
        row = self._db().execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- loop side --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StoreError("embedded store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, orjson.JSONDecodeError) as exc:
            raise StoreError(f"embedded store {self.path}: {exc}") from exc

    async def get(self, key: str) -> JSONDict | None:
        entry = await self.get_entry(key)
        return None if entry is None else entry.value

    async def get_entry(self, key: str) -> Entry | None:
        check_key(key)
        return await self._run(self._get, key)

    async def put(self, key: str, value: JSONDict, *, ttl: float | None = None) -> int:
        check_key(key)
        check_ttl(ttl)
        rev = await self._run(self._write, key, None, False, orjson.dumps(value), ttl)
        assert rev is not None  # unconditional writes always succeed
        return rev

    async def compare_and_set(
        self,
        key: str,
        expected_version: int | None,
        value: JSONDict,
        *,
        ttl: float | None = None,
    ) -> int | None:
        check_key(key)
        check_ttl(ttl)
        return await self._run(self._write, key, expected_version, True, orjson.dumps(value), ttl)

    async def delete(self, key: str) -> bool:
        check_key(key)
        return await self._run(self._delete, key)

    async def scan_prefix(self, prefix: str) -> list[Entry]:
        return await self._run(self._scan, prefix)

    async def revision(self) -> int:
        return await self._run(self._revision)

    async def health(self) -> StoreHealth:
        try:
            rev = await self.revision()
        except StoreError as exc:
            return StoreHealth(self.backend, False, str(exc))
        return StoreHealth(self.backend, True, f"{self.path} (revision {rev})")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)
