"""Two gateways relaying token streams at the same time: this checkout's and another's.

    git worktree add /tmp/ref COMMIT
    python -m bench.stream_paired --reference /tmp/ref          # 4 rounds, 1,000 streams each

``bench.stream`` runs one proxy after another, and on a shared VM the same code's CPU
per chunk moves by 10-20 % from one run to the next: a change worth a few per cent
cannot be seen there. Here both gateways run at once, pinned to the proxy CPU, each
relaying ``--streams`` streams from the one upstream to its own client: whatever slows
the machine slows both. Each round reports each gateway's CPU per chunk over the whole
run and over the steady window (every stream open, none ended), and the ratio of the
two; the rounds alternate which gateway starts first. Ratios from four rounds agreed to
within 2 % where ``bench.stream``'s differed by 20 %.

Both share the CPU, so neither figure is what one gateway alone costs (``bench.stream``
measures that); their ratio is what the change is worth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.context import _redis_ping
from bench.procs import Children, Pinning
from bench.stream import Bench, Proxy, start_upstream, tree_cpu

TARGETS = ("gateway", "reference")


def one_round(bench: Bench, first: int) -> dict[str, dict[str, float]]:
    """Both gateways, started fresh and warmed up, then loaded at once."""
    args = bench.args
    order = TARGETS[first:] + TARGETS[:first]
    proxies: dict[str, Proxy] = {}
    try:
        for name in order:
            proxies[name] = bench.start(name)
        for proxy in proxies.values():
            warm = bench.client(proxy.url, "--streams", "20", "--chunks", "5",
                                "--interval-ms", "10", "--ramp", "0.1")  # fmt: skip
            warm.communicate(timeout=60)
        time.sleep(0.5)
        pids = {name: proxy.child.pid for name, proxy in proxies.items() if proxy.child}
        start = {name: tree_cpu(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        clients = {
            name: bench.client(proxy.url, *bench.stream_args(args.streams, args.chunks))
            for name, proxy in proxies.items()
        }
        opened = t0 + args.ramp + 0.5  # the steady window, as in bench.stream
        ending = t0 + args.chunks * args.interval_ms / 1000 - 0.5
        window: list[tuple[float, dict[str, float]]] = []
        while any(client.poll() is None for client in clients.values()):
            now = time.monotonic()
            if (not window and now >= opened) or (len(window) == 1 and now >= ending):
                window.append((now, {name: tree_cpu(pid) for name, pid in pids.items()}))
            time.sleep(0.2)
        end = {name: tree_cpu(pid) for name, pid in pids.items()}
        results: dict[str, dict[str, float]] = {}
        for name, client in clients.items():
            out: dict[str, Any] = json.loads(client.communicate()[0])
            if out["complete"] != args.streams:
                raise RuntimeError(f"{name}: {args.streams - out['complete']} streams incomplete")
            row = {"whole_us": (end[name] - start[name]) / max(1, out["chunks"]) * 1e6}
            if len(window) == 2:
                (w0, c0), (w1, c1) = window
                sent = args.streams * (w1 - w0) / (args.interval_ms / 1000)
                row["steady_us"] = (c1[name] - c0[name]) / sent * 1e6
            results[name] = row
        return results
    finally:
        for proxy in proxies.values():
            bench.stop(proxy)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="a checkout of other code to run beside"
    )
    parser.add_argument("--streams", type=int, default=1000, help="streams per gateway")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    pinning = Pinning.detect()
    ratios: dict[str, list[float]] = {"whole_us": [], "steady_us": []}
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-paired-") as work,
        Children(Path(work)) as children,
    ):
        upstream, port = start_upstream(children, pinning)
        bench = Bench(args, children, pinning, upstream, port, _redis_ping(args.redis_url))
        try:
            for round_ in range(args.rounds):
                results = one_round(bench, round_ % 2)
                mine, theirs = results["gateway"], results["reference"]
                line = [f"round {round_}:"]
                for key in ratios:
                    if key in mine and key in theirs:
                        ratios[key].append(mine[key] / theirs[key])
                        line.append(
                            f"{key[:-3]} {mine[key]:.2f} against {theirs[key]:.2f} us per chunk "
                            f"({ratios[key][-1]:.3f})"
                        )
                print(" ".join(line), flush=True)
        finally:
            bench.cleanup()
    for key, values in ratios.items():
        if values:
            print(
                f"{key[:-3]}: this checkout / reference, median {statistics.median(values):.3f}, "
                f"rounds {', '.join(f'{v:.3f}' for v in values)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
