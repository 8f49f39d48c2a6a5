"""CPU instructions per request under callgrind: feature costs free of the machine's drift.

    python -m bench.instructions [--requests 2000] [--only split,traces,shadow]
    python -m bench.instructions --only traces,canary   # a running canary's cost
    python -m bench.instructions --scale          # 1 route x 1 endpoint vs 100 x 8
    python -m bench.instructions --scale --cells 1x1,10x1,10x8

``bench.run`` measures requests/s, which is what users get, but on a shared VM the CPU's
own speed drifts by more than the few per cent a feature costs. valgrind's callgrind
counts the instructions the gateway process executes instead: the same code path gives
the same count, whatever the host is doing, so a 1 % change shows as 1 %.

Each gateway runs under ``valgrind --tool=callgrind --instr-atstart=no`` (about 50x
slower, so only its own instructions matter, not its speed). After a warm-up that is not
counted, instrumentation is switched on with ``callgrind_control``, a fixed number of
requests is sent (deterministic request IDs, so the split sends the same requests to
the same side every time), background work is let finish, and the count is dumped. A
canary cell's canary is started before the warm-up, as ``bench.run`` starts it.

What it does not see: time in the kernel (socket reads and writes, the same for every
feature set) and cache misses (a bigger working set costs time, not instructions). So a
feature's share of *instructions* is an upper bound on its share of CPU time, and the
scale comparison shows whether per-request work grows, not whether the caches do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.context import (
    canary_activity,
    gateway_command,
    metric_sum,
    redis_take_keys,
    start_canaries,
)
from bench.gateway_configs import (
    Feature,
    Listen,
    ScaleCell,
    route_names,
    scale_document,
    write,
)
from bench.loadgen import REQUEST_BODY
from bench.procs import ChildFailed, Children, free_port
from bench.run import scale_cell
from bench.upstream import Upstream, start_upstream

_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)
# Mirrored requests finish off the response path: give the last ones time to complete
# before instrumentation stops, so their cost is counted with the requests that caused it.
_SETTLE_SECONDS = 2.0
_STARTUP_SECONDS = 180.0
_TRACE_INTERVAL_SECONDS = 3600  # the longest allowed: see Cell.__init__


def _part_number(path: Path) -> int:
    return int(path.suffix.lstrip(".") or 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="counted requests per cell")
    parser.add_argument("--warmup", type=int, default=300, help="uncounted requests first")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--idle",
        type=float,
        default=5.0,
        help="seconds over which the timers' instructions a second are counted (a canary's "
        "come in bursts once a second: 30 takes them out to within a few hundred "
        "instructions a request, with --requests 10000)",
    )
    parser.add_argument(
        "--only",
        default="plain,split,traces,shadow",
        help="comma-separated feature sets (default: all but canary; traces,canary for "
        "a running canary's cost)",
    )
    parser.add_argument("--scale", action="store_true", help="1x1 against 100x8 (traces)")
    parser.add_argument(
        "--cells",
        default="1x1,100x8",
        help="with --scale: ROUTESxENDPOINTS[:ACTIVE ROUTES] cells, the first is the reference",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate caches and branch prediction (callgrind_annotate the kept dumps)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--json", type=Path, default=None, help="results file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    args.features = [Feature(name.strip()) for name in args.only.split(",") if name.strip()]
    return args


def callgrind_totals(path: Path) -> int:
    """Instructions in a callgrind dump (its ``totals:`` line)."""
    found = _TOTALS.search(path.read_bytes())
    if found is None:
        raise ChildFailed(f"no totals in {path}")
    return int(found.group(1))


async def send(base_url: str, paths: Sequence[str], count: int, connections: int, tag: str) -> None:
    """``count`` POSTs over ``connections`` keep-alive connections; every one must be a 200."""
    urls = [base_url + path for path in paths]
    numbers = iter(range(count))
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for n in numbers:
                headers = {"Content-Type": "application/json", "X-Request-ID": f"{tag}-{n}"}
                async with session.post(
                    urls[n % len(urls)], data=REQUEST_BODY, headers=headers
                ) as response:
                    await response.read()
                    if response.status != 200:
                        raise ChildFailed(f"{urls[n % len(urls)]} answered {response.status}")

        await asyncio.gather(*(worker() for _ in range(connections)))


class Cell:
    """One gateway configuration under callgrind."""

    def __init__(
        self,
        children: Children,
        workdir: Path,
        upstream: Upstream,
        feature: Feature,
        *,
        scale: ScaleCell | None = None,
        redis_url: str,
        cache_sim: bool = False,
    ) -> None:
        cell = scale or ScaleCell(1, 1, 1)
        self.name = feature.value if scale is None else cell.name
        self.label = feature.label if scale is None else f"{cell.label} ({feature.value})"
        self.feature = feature
        self.paths = cell.paths
        port, admin_port = free_port(), free_port()
        listen = Listen(
            port, admin_port, workdir / f"{self.name}-state.db", redis_url, f"gwir{port}"
        )
        self.redis_url = redis_url
        # The cell's keys in Redis, deleted once it is measured: its trace windows and
        # state (a canary's status and counts would stay for good otherwise).
        self.key_patterns = (
            [listen.trace_prefix + ":*", listen.state_prefix + ":*"] if feature.traces else []
        )
        document = scale_document(
            feature,
            listen,
            upstream.urls[: cell.endpoints],
            cell.routes,
            shadow_url=upstream.challenger_url,
        )
        if feature.traces:
            # No trace window may close while instructions are counted: closing one
            # writes every model's window to Redis, per-window work (for 200 models in a
            # 100-route config, more than thousands of requests' worth) that would land
            # in the idle rate or the loaded count depending on when the boundary falls.
            document["tracing"]["interval_seconds"] = _TRACE_INTERVAL_SECONDS
        config = write(document, workdir / f"gateway-{self.name}.yaml")
        self.routes = route_names(document)
        self.base_url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.out = workdir / f"callgrind-{self.name}.out"
        self.children = children
        self.child = children.start(
            f"callgrind-{self.name}",
            [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                *(["--cache-sim=yes", "--branch-sim=yes"] if cache_sim else []),
                f"--callgrind-out-file={self.out}",
                *gateway_command(),
                "run",
                "-c",
                str(config),
            ],
        )

    def control(self, *options: str) -> None:
        subprocess.run(
            ["callgrind_control", *options, str(self.child.pid)],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(self.admin_url + "/metrics", timeout=30) as response:
            body: bytes = response.read()
        return body.decode()

    def counted(self, action: Callable[[], object]) -> tuple[int, float]:
        """Instructions executed (and seconds taken) while ``action`` runs."""
        self.control("--instr=on")
        started = time.monotonic()
        action()
        seconds = time.monotonic() - started
        self.control("--instr=off")
        self.control("--dump")
        dumps = sorted(self.out.parent.glob(self.out.name + ".*"), key=_part_number)
        if not dumps:
            raise ChildFailed(f"{self.name}: callgrind wrote no dump\n{self.child.log_tail()}")
        return callgrind_totals(dumps[-1]), seconds

    def measure(
        self, requests: int, warmup: int, connections: int, idle_for: float
    ) -> dict[str, Any]:
        self.children.wait_ready(self.child, self._ready, timeout=_STARTUP_SECONDS)
        if self.feature.canary:
            start_canaries(self.admin_url, self.routes, self.child)
        asyncio.run(send(self.base_url, self.paths, warmup, connections, "warm"))
        # Timers (the state store's poll, the trace writer) cost per second, not per
        # request: 50x slower under valgrind, they would weigh 50x too much. Their rate
        # is measured idle and taken out. Timers that fire once a second make the count
        # over a window depend on how many firings fall in it (one more in 5 s is 20 %),
        # in the idle window and in the loaded one alike: longer windows, less of that.
        idle, idle_seconds = self.counted(lambda: time.sleep(idle_for))
        idle_rate = idle / idle_seconds
        before = self.metrics()

        def load() -> None:
            asyncio.run(send(self.base_url, self.paths, requests, connections, "ir"))
            time.sleep(_SETTLE_SECONDS)

        loaded, seconds = self.counted(load)
        after = self.metrics()
        activity = canary_activity(self.admin_url, self.routes) if self.feature.canary else None
        self.children.stop(self.child)
        for pattern in self.key_patterns:
            redis_take_keys(self.redis_url, pattern)
        instructions = loaded - idle_rate * seconds
        result: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "requests": requests,
            "instructions": loaded,
            "idle_instructions_per_second": idle_rate,
            "seconds_under_valgrind": seconds,
            "per_request": instructions / requests,
        }
        if activity is not None:
            result["canary"] = activity
        if self.feature.shadow:
            mirrored = _delta(after, before, "gateway_shadow_requests_total")
            compared = sum(
                _delta(after, before, "gateway_shadow_requests_total", f'outcome="{o}"')
                for o in ("match", "mismatch")
            )
            result["mirrored"] = mirrored
            result["compared"] = compared
        return result

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/readyz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def _delta(after: str, before: str, name: str, label: str = "") -> float:
    return (metric_sum(after, name, label) or 0.0) - (metric_sum(before, name, label) or 0.0)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Children(workdir) as children:
        upstream = start_upstream(children, [free_port() for _ in range(8)])
        plan: list[tuple[Feature, ScaleCell | None]]
        if args.scale:
            plan = [(Feature.TRACES, scale_cell(name)) for name in args.cells.split(",")]
        else:
            plan = [(feature, None) for feature in args.features]
        results = []
        for feature, scale in plan:
            cell = Cell(
                children,
                workdir,
                upstream,
                feature,
                scale=scale,
                redis_url=args.redis_url,
                cache_sim=args.cache_sim,
            )
            print(f"[callgrind] {cell.label} ...", file=sys.stderr, flush=True)
            result = cell.measure(args.requests, args.warmup, args.connections, args.idle)
            print(
                f"[callgrind] {cell.label}: {result['per_request']:,.0f} instructions/request"
                + (f" ({result['canary']})" if "canary" in result else ""),
                file=sys.stderr,
                flush=True,
            )
            results.append(result)
    return {"mode": "scale" if args.scale else "features", "cells": results}


def costs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell against the one before it (features) or the first (scale)."""
    by_name = {r["name"]: r for r in results}
    out = []
    steps = {"split": "plain", "traces": "split", "shadow": "traces", "canary": "traces"}
    for result in results:
        reference = by_name.get(steps.get(result["name"], ""), results[0])
        if reference is result:
            continue
        extra = result["per_request"] - reference["per_request"]
        row = {
            "cell": result["name"],
            "against": reference["name"],
            "extra_per_request": extra,
            "share": extra / result["per_request"],
        }
        if result.get("mirrored"):
            row["per_mirrored_request"] = extra * result["requests"] / result["mirrored"]
            row["mirrored_share"] = result["mirrored"] / result["requests"]
        out.append(row)
    return out


def table(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | instructions/request | extra over | extra | share of the cell's work |",
        "|---|---|---|---|---|",
    ]
    by_cell = {row["cell"]: row for row in rows}
    for result in results:
        row = by_cell.get(result["name"])
        extra = "-" if row is None else f"{row['extra_per_request']:+,.0f}"
        against = "-" if row is None else row["against"]
        share = "-" if row is None else f"{row['share']:.1%}"
        if row is not None and "per_mirrored_request" in row:
            share += (
                f" ({row['mirrored_share']:.1%} mirrored, "
                f"{row['per_mirrored_request']:,.0f} per mirrored request)"
            )
        lines.append(
            f"| {result['label']} | {result['per_request']:,.0f} | {against} | {extra} | {share} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"bench.instructions: {tool} is not installed (apt: valgrind)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-callgrind-"))
    try:
        result = run(args, workdir)
    except (ChildFailed, subprocess.SubprocessError, OSError) as error:
        print(f"bench.instructions: {error}\nwork dir kept: {workdir}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    result["costs"] = costs(result["cells"])
    result["table"] = table(result["cells"], result["costs"])
    print(result["table"])
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
