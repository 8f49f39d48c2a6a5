"""The model registry on both state stores: the embedded SQLite one and a real private
redis-server. No mocks: every assertion reads back what the store holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.registry import Registry, RegistryError
from gateway.store import StateStore, watch_revisions
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis import RedisStore
from tests.helpers.clock import FakeClock
from tests.helpers.waiting import wait_until
from tests.redis_fixtures import RedisServer, fast_client, private_redis  # noqa: F401

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    opened: StateStore
    if request.param == "embedded":
        opened = EmbeddedStore(tmp_path / "state.db")
    else:
        server: RedisServer = request.getfixturevalue("private_redis")
        opened = RedisStore(fast_client(server.url), key_prefix="t:", owns_client=True)
    try:
        yield opened
    finally:
        await opened.close()


def refused(error: pytest.ExceptionInfo[RegistryError]) -> tuple[int, str]:
    return error.value.status, error.value.code


async def test_versions_are_numbered_immutable_and_idempotent(store: StateStore) -> None:
    registry = Registry(store, clock=FakeClock(1000.0))
    first, new = await registry.register("iris", backend="iris-v1", actor="alice")
    assert new and first.version == 1 and first.trace_model == "iris-v1"
    second, _ = await registry.register("iris", endpoints=("http://10.0.0.5:8000",))
    assert second.version == 2
    seventh, _ = await registry.register("iris", version=7, backend="iris-v7", metadata={"f1": 0.9})
    assert seventh.version == 7
    assert [v.version for v in await registry.versions("iris")] == [1, 2, 7]
    third, _ = await registry.register("iris", backend="x")  # after the highest, not a gap
    assert third.version == 8

    again, new = await registry.register("iris", version=7, backend="iris-v7", metadata={"f1": 0.9})
    assert not new and again == seventh  # the same content again: done already
    with pytest.raises(RegistryError) as error:
        await registry.register("iris", version=7, backend="iris-v8")
    assert refused(error) == (409, "version_exists")
    assert (await registry.version("iris", 7)).backend == "iris-v7"  # unchanged

    for bad in ({}, {"backend": "a", "endpoints": ("http://a:1",)}):
        with pytest.raises(RegistryError) as error:
            await registry.register("iris", **bad)  # type: ignore[arg-type]
        assert refused(error) == (400, "bad_request")
    with pytest.raises(RegistryError) as error:
        await registry.register("not a name", backend="a")
    assert refused(error) == (400, "bad_request")


async def test_aliases_latest_and_deletion(store: StateStore) -> None:
    registry = Registry(store)
    for n in (1, 2, 3):
        await registry.register("iris", version=n, backend=f"iris-v{n}")
    assert await registry.move_alias("iris", "champion", 2) is None
    assert await registry.move_alias("iris", "champion", 3) == 2
    await registry.move_alias("iris", "challenger", 1)
    assert await registry.aliases("iris") == {"champion": 3, "challenger": 1}
    resolved = await registry.resolve("iris", "champion")
    assert resolved is not None and resolved.version == 3
    latest = await registry.resolve("iris", "latest")
    assert latest is not None and latest.version == 3
    by_number = await registry.resolve("iris", "2")
    assert by_number is not None and by_number.backend == "iris-v2"
    assert await registry.resolve("iris", "nothing") is None
    assert await registry.resolve("unknown", "champion") is None

    with pytest.raises(RegistryError) as error:
        await registry.move_alias("iris", "latest", 1)
    assert refused(error) == (400, "bad_alias")
    with pytest.raises(RegistryError) as error:
        await registry.move_alias("iris", "champion", 9)
    assert refused(error) == (404, "unknown_version")
    with pytest.raises(RegistryError) as error:
        await registry.delete_version("iris", 3)
    assert refused(error) == (409, "version_in_use")
    assert await registry.delete_alias("iris", "champion") == 3
    deleted = await registry.delete_version("iris", 3)
    assert deleted.version == 3 and [v.version for v in await registry.versions("iris")] == [1, 2]
    assert (await registry.resolve("iris", "latest")).version == 2  # type: ignore[union-attr]
    with pytest.raises(RegistryError) as error:
        await registry.delete_alias("iris", "champion")
    assert refused(error) == (404, "unknown_alias")


async def test_a_deleted_versions_number_is_never_given_again(store: StateStore) -> None:
    registry = Registry(store)
    for n in (1, 2, 3):
        await registry.register("iris", version=n, backend=f"iris-v{n}")
    await registry.delete_version("iris", 3)
    with pytest.raises(RegistryError) as error:
        await registry.version("iris", 3)
    assert refused(error) == (404, "unknown_version") and "deleted" in str(error.value)
    assert await registry.resolve("iris", "3") is None  # a route pinned to @3 finds nothing
    assert (await registry.resolve("iris", "latest")).version == 2  # type: ignore[union-attr]
    fourth, new = await registry.register("iris", backend="other")  # not 3 again
    assert new and fourth.version == 4
    for content in ("iris-v3", "other"):  # neither the old content nor new content
        with pytest.raises(RegistryError) as error:
            await registry.register("iris", version=3, backend=content)
        assert refused(error) == (409, "version_exists")
    with pytest.raises(RegistryError) as error:
        await registry.move_alias("iris", "champion", 3)
    assert refused(error) == (404, "unknown_version")
    assert [v.version for v in await registry.versions("iris")] == [1, 2, 4]


async def test_a_delete_racing_an_alias_move_never_leaves_the_alias_on_a_deleted_version(
    store: StateStore,
) -> None:
    registry = Registry(store)
    outcomes: set[tuple[str, str]] = set()
    for n in range(1, 41):
        await registry.register("iris", version=n, backend=f"b{n}")
        deleting = registry.delete_version("iris", n)
        moving = registry.move_alias("iris", "champion", n)
        deleted, moved = await asyncio.gather(deleting, moving, return_exceptions=True)
        target = (await registry.aliases("iris")).get("champion")
        live = await registry.resolve("iris", str(n)) is not None
        # Whichever wins, never both: the alias on a deleted version serves nothing.
        assert not (target == n and not live), (deleted, moved)
        assert isinstance(deleted, RegistryError) or isinstance(moved, RegistryError)
        outcomes.add((type(deleted).__name__, type(moved).__name__))
    assert outcomes  # (which side wins depends on the interleaving; both are fine)


async def test_conditional_alias_moves_lose_no_update(store: StateStore) -> None:
    registry = Registry(store)
    for n in range(1, 52):
        await registry.register("iris", version=n, backend=f"b{n}")
    await registry.move_alias("iris", "champion", 1)

    # 50 operators at once, each moving champion from 1 to its own version: exactly one
    # can win, since every other one expected 1 and finds it moved.
    async def move(to: int) -> bool:
        try:
            await registry.move_alias("iris", "champion", to, expected=1, actor=f"op{to}")
        except RegistryError as error:
            assert error.code == "alias_changed"
            return False
        return True

    won = await asyncio.gather(*(move(n) for n in range(2, 52)))
    assert sum(won) == 1
    winner = 2 + won.index(True)
    assert (await registry.aliases("iris"))["champion"] == winner
    # Chained moves, each expecting the last: all of them go through, in order.
    current = winner
    for to in (1, 5, 9):
        await registry.move_alias("iris", "champion", to, expected=current)
        current = to
    moves = [h for h in await registry.history("iris") if h["action"] == "alias"]
    assert [(m["previous"], m["version"]) for m in moves] == [
        (None, 1), (1, winner), (winner, 1), (1, 5), (5, 9),
    ]  # fmt: skip
    assert moves[1]["actor"] == f"op{winner}"


async def test_history_is_complete_and_ordered(store: StateStore) -> None:
    registry = Registry(store, clock=FakeClock(50.0))
    await registry.register("iris", backend="a", actor="alice", reason="first")
    await registry.register("iris", backend="b", actor="bob")
    await asyncio.gather(
        registry.move_alias("iris", "champion", 1, actor="alice"),
        registry.move_alias("iris", "challenger", 2, actor="bob"),
    )
    await registry.delete_alias("iris", "challenger", reason="rolled back")
    history = await registry.history("iris")
    assert [h["seq"] for h in history] == [1, 2, 3, 4, 5]
    assert [h["action"] for h in history][:2] == ["register", "register"]
    assert {h.get("alias") for h in history[2:4]} == {"champion", "challenger"}
    assert history[-1] == {
        "seq": 5, "at": 50.0, "action": "unalias", "actor": "admin",
        "reason": "rolled back", "alias": "challenger", "previous": 2,
    }  # fmt: skip
    assert history[0]["reason"] == "first" and history[0]["version"] == 1


async def test_the_registry_outlives_a_restart_and_is_shared(
    tmp_path: Path,
    private_redis: RedisServer,  # noqa: F811
) -> None:
    path = tmp_path / "state.db"
    first = EmbeddedStore(path)
    await Registry(first).register("iris", backend="a")
    await Registry(first).move_alias("iris", "champion", 1)
    await first.close()
    reopened = EmbeddedStore(path)
    try:
        assert await Registry(reopened).aliases("iris") == {"champion": 1}
    finally:
        await reopened.close()

    # Two replicas on one Redis: one registers, the other sees it at its next read.
    a = RedisStore(fast_client(private_redis.url), key_prefix="shared:", owns_client=True)
    b = RedisStore(fast_client(private_redis.url), key_prefix="shared:", owns_client=True)
    try:
        await Registry(a).register("iris", backend="a")
        await Registry(a).move_alias("iris", "champion", 1)
        assert await Registry(b).models() == ["iris"]
        resolved = await Registry(b).resolve("iris", "champion")
        assert resolved is not None and resolved.backend == "a"
    finally:
        await a.close()
        await b.close()


async def test_concurrent_conditional_moves_exactly_the_non_conflicting_ones_win(
    store: StateStore,
) -> None:
    registry = Registry(store)
    for n in range(1, 4):
        await registry.register("iris", version=n, backend=f"b{n}")
    await registry.move_alias("iris", "champion", 1)

    # 50 moves at once, each saying where it expects its alias: 25 of them move aliases
    # of their own (a0..a24, expected unset): no conflict, every one must win; the other
    # 25 all expect champion at 1: they conflict, exactly one may win.
    async def move(alias: str, to: int, expected: int | None) -> tuple[str, bool]:
        try:
            await registry.move_alias("iris", alias, to, expected=expected, actor=alias)
        except RegistryError as error:
            assert error.code == "alias_changed"
            return alias, False
        return alias, True

    moves = [move(f"a{i}", 1 + i % 3, None) for i in range(25)]
    moves += [move("champion", 2 + i % 2, 1) for i in range(25)]
    results = await asyncio.gather(*moves)
    own = [won for alias, won in results if alias != "champion"]
    contested = [won for alias, won in results if alias == "champion"]
    assert all(own) and sum(contested) == 1

    aliases = await registry.aliases("iris")
    assert {a: v for a, v in aliases.items() if a != "champion"} == {
        f"a{i}": 1 + i % 3 for i in range(25)
    }
    # No lost update: the history holds every winning move once, in the order of its
    # numbers, and what each says it replaced is what the one before it set.
    history = await registry.history("iris")
    assert [h["seq"] for h in history] == list(range(1, len(history) + 1))
    alias_moves = [h for h in history if h["action"] == "alias"]
    assert len(alias_moves) == 1 + 25 + 1
    champion_moves = [h for h in alias_moves if h["alias"] == "champion"]
    assert [(m["previous"], m["version"]) for m in champion_moves] == [
        (None, 1), (1, aliases["champion"]),
    ]  # fmt: skip


async def test_promote_and_demote_move_the_three_aliases(store: StateStore) -> None:
    registry = Registry(store)
    for n in (1, 2, 3):
        await registry.register("iris", version=n, backend=f"b{n}")
    await registry.move_alias("iris", "champion", 1)
    await registry.move_alias("iris", "challenger", 2)
    assert await registry.promote("iris", actor="alice") == (1, 2)
    assert await registry.aliases("iris") == {"champion": 2, "previous": 1}
    with pytest.raises(RegistryError) as error:
        await registry.promote("iris")
    assert refused(error) == (409, "no_challenger")
    assert await registry.demote("iris", actor="bob") == (1, 2)
    assert await registry.aliases("iris") == {"champion": 1, "challenger": 2}
    with pytest.raises(RegistryError) as error:
        await registry.demote("iris")
    assert refused(error) == (409, "no_previous")
    with pytest.raises(RegistryError) as error:
        await registry.promote("unknown")
    assert refused(error) == (404, "unknown_model")
    # A deleted alias is cleared, and may point somewhere again.
    await registry.delete_alias("iris", "challenger", expected=2)
    with pytest.raises(RegistryError) as error:
        await registry.move_alias("iris", "challenger", 3, expected=2)
    assert refused(error) == (409, "alias_changed")
    await registry.move_alias("iris", "challenger", 3, expected=None)
    assert await registry.aliases("iris") == {"champion": 1, "challenger": 3}
    moves = [(h.get("alias"), h["actor"]) for h in await registry.history("iris")][5:]
    assert moves == [
        ("champion", "alice"), ("previous", "alice"), ("challenger", "alice"),
        ("champion", "bob"), ("challenger", "bob"), ("previous", "bob"),
        ("challenger", "admin"), ("challenger", "admin"),
    ]  # fmt: skip


async def test_a_replica_sees_the_others_changes_within_a_second(
    private_redis: RedisServer,  # noqa: F811
) -> None:
    """What a change made through one replica's store looks like from another one that
    follows the store as the gateway does (its revision, polled): seen within 1 s."""
    a = RedisStore(fast_client(private_redis.url), key_prefix="r:", owns_client=True)
    b = RedisStore(fast_client(private_redis.url), key_prefix="r:", owns_client=True)
    seen: list[tuple[float, dict[str, int]]] = []

    async def follow() -> None:
        async for _ in watch_revisions(b, interval=0.5):
            seen.append((time.monotonic(), await Registry(b).aliases("iris")))

    follower = asyncio.create_task(follow())
    try:
        await Registry(a).register("iris", backend="x")
        await Registry(a).register("iris", backend="y")
        for version in (1, 2, 1):
            moved_at = time.monotonic()
            await Registry(a).move_alias("iris", "champion", version)
            at, _ = await wait_until(
                lambda v=version, t=moved_at: next(
                    (s for s in seen if s[0] >= t and s[1].get("champion") == v), None
                ),
                f"replica b seeing champion at {version}",
                within=1.0,
            )
            assert at - moved_at < 1.0
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await a.close()
        await b.close()
