"""Redis state store, for gateway replicas that must act as one.

Layout under the configured prefix ``P`` (``P`` ends with ``:``):

- ``P d:<key>``  hash ``{v: <orjson bytes>, r: <version>}``, with a PEXPIRE for TTLs;
- ``P rev``      the store-wide revision counter;
- ``P idx``      sorted set of keys (all score 0) so a prefix scan is one ZRANGEBYLEX
  instead of a SCAN over a database that also holds thousands of trace keys. Entries of
  expired keys are pruned when a scan finds them gone.

Every write is one Lua script, so the version check, the write, the revision bump and the
index update are atomic with respect to other replicas.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from gateway.store.base import (
    Entry,
    JSONDict,
    StoreError,
    StoreHealth,
    check_key,
    check_ttl,
)

# A lost Redis (restart without persistence) would restart the revision at 1 and a
# watcher that last saw, say, 3 would miss changes until the counter passed 3 again.
# Seeding a missing counter from the server clock in ms keeps it moving forward.
_BUMP = """
local function bump(rev_key)
  if redis.call('EXISTS', rev_key) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', rev_key, string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000)))
  end
  return redis.call('INCR', rev_key)
end
"""

# KEYS: data, rev, idx. ARGV: value, ttl_ms (0 = none), key, check ("0"/"1"),
# expected version ("" = must be absent). Returns the new version, or -1 on conflict.
_WRITE = (
    _BUMP
    + """
if ARGV[4] == '1' then
  local cur = redis.call('HGET', KEYS[1], 'r')
  if ARGV[5] == '' then
    if cur then return -1 end
  elseif cur ~= ARGV[5] then
    return -1
  end
end
local rev = bump(KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'r', rev)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('ZADD', KEYS[3], 0, ARGV[3])
return rev
"""
)

# KEYS: data, rev, idx. ARGV: key. Returns 1 if a live entry was deleted.
_DELETE = (
    _BUMP
    + """
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('DEL', KEYS[1]) == 1 then
  bump(KEYS[2])
  return 1
end
return 0
"""
)


def _int(raw: bytes | str | None) -> int:
    if raw is None:
        raise StoreError("entry without a version (written by something else?)")
    return int(raw)


def normalize_prefix(prefix: str) -> str:
    return prefix if prefix.endswith(":") else prefix + ":"


def check_url(url: str) -> str | None:
    """What is wrong with ``url`` as ``default_client`` would take it, or None. Only the
    URL: whether a server answers there is the store's health, not a config error."""
    from urllib.parse import urlsplit

    from redis.asyncio.connection import parse_url

    try:
        options = parse_url(url)
        parts = urlsplit(url)
    except ValueError as error:
        return str(error)
    if parts.scheme != "unix":
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return f"the path must be a database number, got {parts.path!r}"
    values: dict[str, object] = dict(options)
    db = values.get("db", 0)
    if not isinstance(db, int) or not 0 <= db < 2**31:
        return f"the database must be a number from 0, got {db!r}"
    protocol = values.get("protocol", 2)
    if protocol not in (2, 3, "2", "3"):
        return f"protocol must be 2 or 3, got {protocol!r}"
    try:
        default_client(url)  # what start does with it; no connection is made yet
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def default_client(url: str) -> aioredis.Redis:
    """A client that fails fast: state reads sit behind admin calls and watchers that
    retry on their own, so redis-py's default of 10 backed-off retries would only turn an
    outage into a hang."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


class RedisStore:
    backend = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "gateway:state:",
        owns_client: bool = False,
    ) -> None:
        self._r = client
        self._owns = owns_client
        self.prefix = normalize_prefix(key_prefix)
        self._rev_key = f"{self.prefix}rev"
        self._idx_key = f"{self.prefix}idx"
        self._write_script = client.register_script(_WRITE)
        self._delete_script = client.register_script(_DELETE)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str = "gateway:state:") -> RedisStore:
        return cls(default_client(url), key_prefix=key_prefix, owns_client=True)

    def _data_key(self, key: str) -> str:
        return f"{self.prefix}d:{key}"

    async def get(self, key: str) -> JSONDict | None:
        entry = await self.get_entry(key)
        return None if entry is None else entry.value

    async def get_entry(self, key: str) -> Entry | None:
        check_key(key)
        try:
            raw, ver = await self._r.hmget(self._data_key(key), ["v", "r"])
            return None if raw is None else Entry(key, orjson.loads(raw), _int(ver))
        except (RedisError, OSError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"redis store get {key!r}: {exc}") from exc

    async def _write(
        self, key: str, check: bool, expected: int | None, value: JSONDict, ttl: float | None
    ) -> int | None:
        check_key(key)
        check_ttl(ttl)
        ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        args: list[Any] = [
            orjson.dumps(value),
            ttl_ms,
            key,
            "1" if check else "0",
            "" if expected is None else str(expected),
        ]
        try:
            rev = int(
                await self._write_script(
                    keys=[self._data_key(key), self._rev_key, self._idx_key], args=args
                )
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis store write {key!r}: {exc}") from exc
        return None if rev < 0 else rev

    async def put(self, key: str, value: JSONDict, *, ttl: float | None = None) -> int:
        rev = await self._write(key, False, None, value, ttl)
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
        return await self._write(key, True, expected_version, value, ttl)

    async def delete(self, key: str) -> bool:
        check_key(key)
        try:
            n = await self._delete_script(
                keys=[self._data_key(key), self._rev_key, self._idx_key], args=[key]
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis store delete {key!r}: {exc}") from exc
        return int(n) == 1

    async def scan_prefix(self, prefix: str) -> list[Entry]:
        # Keys are UTF-8, which never contains byte 0xff, so "[p" .. "[p\xff" is exactly
        # the keys starting with p.
        lo = b"[" + prefix.encode()
        hi = lo + b"\xff"
        try:
            names = await self._r.zrangebylex(self._idx_key, lo, hi)
            if not names:
                return []
            keys = [n.decode() if isinstance(n, bytes) else n for n in names]
            async with self._r.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hmget(self._data_key(k), ["v", "r"])
                rows = await pipe.execute()
            out: list[Entry] = []
            gone: list[str] = []
            for k, (raw, ver) in zip(keys, rows, strict=True):
                if raw is None:
                    gone.append(k)
                else:
                    out.append(Entry(k, orjson.loads(raw), _int(ver)))
            if gone:
                await self._r.zrem(self._idx_key, *gone)
            return out
        except (RedisError, OSError, orjson.JSONDecodeError) as exc:
            raise StoreError(f"redis store scan {prefix!r}: {exc}") from exc

    async def revision(self) -> int:
        try:
            raw = await self._r.get(self._rev_key)
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis store revision: {exc}") from exc
        return 0 if raw is None else int(raw)

    async def health(self) -> StoreHealth:
        try:
            await self._r.ping()
        except (RedisError, OSError) as exc:
            return StoreHealth(self.backend, False, str(exc))
        return StoreHealth(self.backend, True, f"prefix {self.prefix!r}")

    async def close(self) -> None:
        if self._owns:
            await self._r.aclose()
