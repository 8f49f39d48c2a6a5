"""State store (Redis) commands a gateway makes, per second and per request.

    python -m bench.store_calls [--only traces,canary] [--requests 20000] [--idle 10]

A running canary must cost the store a small number of calls a second, whatever the
traffic, and none per request. Each cell runs alone against a private ``redis-server``
on a free port, so the server's own counters see that gateway's commands and nobody
else's (a shared Redis serves other gateways and tests). The canary cell's canary is
started as ``bench.run`` starts it. Each cell is counted twice: ``--idle`` seconds
without a request, then ``--requests`` requests (deterministic IDs, ``--connections``
keep-alive connections, as fast as the gateway answers). A per-request call would show
as one or more commands per request; per-second work shows as about the same rate
loaded as idle (a little more: counts are written only when they changed). The
gateway's CPU time while idle is reported too: what its timers cost a second, which
the paired runs spread over the requests of each second.

Counted are the commands the gateway sends (``MONITOR``, less the commands that scripts
run inside Redis): one ``EVALSHA`` is one store write, however many commands its script
runs. By command, so that the canary's part is visible: ``HMGET`` (reads of a status or
lease), ``EVALSHA`` (writes: counts, status, lease), ``ZRANGEBYLEX`` (the leader's scan
of every process's counts), ``GET`` (the steering watcher's revision poll, 4 a second).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.context import canary_activity, gateway_command, start_canaries
from bench.gateway_configs import Feature, Listen, feature_document, route_names, write
from bench.instructions import send
from bench.procs import ChildFailed, Children, cpu_seconds, free_port, tcp_open
from bench.upstream import start_upstream


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.store_calls", description=__doc__)
    parser.add_argument("--only", default="traces,canary", help="comma-separated feature sets")
    parser.add_argument("--requests", type=int, default=20_000, help="counted requests")
    parser.add_argument("--idle", type=float, default=10.0, help="counted seconds idle")
    parser.add_argument("--warmup", type=int, default=500, help="uncounted requests first")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="results file")
    args = parser.parse_args(argv)
    args.features = [Feature(name.strip()) for name in args.only.split(",") if name.strip()]
    if not all(feature.needs_redis for feature in args.features):
        parser.error("--only: only feature sets with Redis state make store calls")
    return args


class Monitor:
    """Counts, by command, what clients send to a Redis (``MONITOR``), in a thread."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._monitor = self._client.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._listen, daemon=True, name="redis-monitor")
        self._thread.start()

    def _listen(self) -> None:
        try:
            while True:
                event = self._monitor.next_command()
                # Commands a script runs come from "lua", not from a client's address.
                if event.get("client_type") == "lua":
                    continue
                command = str(event["command"]).split(" ", 1)[0].upper()
                with self._lock:
                    self._counts[command] += 1
        except (redis.RedisError, OSError, ValueError):
            return  # the server stopped

    def snapshot(self) -> collections.Counter[str]:
        with self._lock:
            return collections.Counter(self._counts)

    def close(self) -> None:
        self._client.close()


def measure(
    children: Children,
    workdir: Path,
    feature: Feature,
    args: argparse.Namespace,
    upstream_urls: list[str],
) -> dict[str, Any]:
    redis_port = free_port()
    server = children.start(
        f"redis-{feature.value}",
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
    )
    children.wait_ready(server, lambda: tcp_open("127.0.0.1", redis_port))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    port, admin_port = free_port(), free_port()
    listen = Listen(port, admin_port, workdir / "state.db", redis_url, f"gwcalls{port}")
    document = feature_document(feature, listen, upstream_urls)
    config = write(document, workdir / f"gateway-{feature.value}.yaml")
    admin = f"http://127.0.0.1:{admin_port}"
    base = f"http://127.0.0.1:{port}"
    # The monitor is on before the gateway starts: nothing it sends goes unseen.
    monitor = Monitor(redis_url)
    gateway = children.start(
        f"gateway-{feature.value}", [*gateway_command(), "run", "-c", str(config)]
    )
    children.wait_ready(gateway, lambda: _ok(admin + "/readyz"))
    routes = route_names(document)
    if feature.canary:
        start_canaries(admin, routes, gateway)
    asyncio.run(send(base, ("/v1/models/bench:predict",), args.warmup, args.connections, "warm"))

    def counted(action: Any) -> tuple[collections.Counter[str], float, float]:
        """The commands sent, the seconds taken and the gateway's CPU seconds used."""
        before, started = monitor.snapshot(), time.monotonic()
        cpu = cpu_seconds(gateway.pid)
        action()
        seconds = time.monotonic() - started
        cpu = cpu_seconds(gateway.pid) - cpu
        # MONITOR lines arrive a little after the commands: let the last ones in.
        time.sleep(0.2)
        return monitor.snapshot() - before, seconds, cpu

    idle, idle_seconds, idle_cpu = counted(lambda: time.sleep(args.idle))
    loaded, loaded_seconds, loaded_cpu = counted(
        lambda: asyncio.run(
            send(base, ("/v1/models/bench:predict",), args.requests, args.connections, "calls")
        )
    )
    activity = canary_activity(admin, routes) if feature.canary else None
    children.stop(gateway)
    monitor.close()
    children.stop(server)
    result: dict[str, Any] = {
        "feature": feature.value,
        "label": feature.label,
        "idle_seconds": idle_seconds,
        "idle_commands": dict(idle),
        "idle_per_second": idle.total() / idle_seconds,
        "idle_cpu_ms_per_second": idle_cpu / idle_seconds * 1e3,
        "requests": args.requests,
        "loaded_seconds": loaded_seconds,
        "rps": args.requests / loaded_seconds,
        # Unpinned, next to its load generator: a rough figure (bench.run --paired's is
        # the one to judge by).
        "cpu_us_per_request": loaded_cpu / args.requests * 1e6,
        "loaded_commands": dict(loaded),
        "loaded_per_second": loaded.total() / loaded_seconds,
        "per_request": loaded.total() / args.requests,
    }
    if activity is not None:
        result["canary"] = activity
    return result


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def table(results: list[dict[str, Any]]) -> str:
    def by_command(counts: dict[str, int], seconds: float) -> str:
        return ", ".join(f"{c} {n / seconds:.1f}" for c, n in sorted(counts.items()))

    lines = [
        "| cell | idle: CPU ms/s | commands/s | loaded: req/s | CPU us/request | commands/s "
        "| commands/request | loaded, by command (per second) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['idle_cpu_ms_per_second']:.2f} | {r['idle_per_second']:.1f} "
            f"| {r['rps']:,.0f} | {r['cpu_us_per_request']:.0f} "
            f"| {r['loaded_per_second']:.1f} | {r['per_request']:.5f} "
            f"| {by_command(r['loaded_commands'], r['loaded_seconds'])} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench.store_calls: redis-server is not installed", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-calls-"))
    results = []
    try:
        with Children(workdir) as children:
            upstream = start_upstream(children, [free_port()], prefer="python")
            for feature in args.features:
                print(f"[store calls] {feature.label} ...", file=sys.stderr, flush=True)
                results.append(measure(children, workdir, feature, args, upstream.urls))
    except (ChildFailed, OSError) as error:
        print(f"bench.store_calls: {error}\nwork dir kept: {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        if "canary" in result:
            print(f"# {result['feature']}: {result['canary']}")
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"cells": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
