"""Profile one proxy under wrk load with py-spy: a flame graph and the hottest lines.

    python -m bench.profile [--target shadow] [--seconds 20] [--svg /tmp/profile.svg]

Starts the upstream and one target (a gateway feature set, or ``baseline``) pinned as in
``bench.run``, loads it with 64 connections, and samples it with ``py-spy record`` twice:
once as raw collapsed stacks (summarized here: self and inclusive time per line and per
function, for gateway/, bench/ and aiohttp), once as an SVG flame graph.
py-spy is a dev tool: ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.context import Bench, Target
from bench.gateway_configs import REQUEST_PATH, Feature
from bench.loadgen import LoadSpec
from bench.procs import Pinning, free_port

# Frames from these files are what we can change (gateway) or tune around (aiohttp).
_INTERESTING = ("gateway/", "aiohttp/", "bench/", "multidict/", "yarl/", "prometheus_client/")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "--target", choices=["baseline", *(f.value for f in Feature)], default="shadow"
    )
    parser.add_argument("--seconds", type=int, default=20, help="per recording")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--svg", type=Path, default=Path("/tmp/profile.svg"))
    parser.add_argument("--raw", type=Path, default=Path("/tmp/profile.txt"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--native", action="store_true", help="include C frames (uvloop, GC, multidict)"
    )
    parser.add_argument(
        "--all-threads", action="store_true", help="also samples not holding the GIL"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    # What Bench reads from bench.run's options.
    # wrk when installed; without it the Python client (a profile needs load, not figures).
    args.loadgen, args.upstream, args.retries, args.quiet_wait = "auto", "auto", 0, 0.0
    return args


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    return found


def record(bench: Bench, target: Target, args: argparse.Namespace, fmt: str, out: Path) -> None:
    """Sample the target while wrk loads it for a little longer than the recording."""
    spec = LoadSpec(target.base_url, (REQUEST_PATH,), args.connections, args.seconds + 3)
    load = threading.Thread(target=bench.loadgen.run, args=(spec,), daemon=True)
    load.start()
    command = [
        *Pinning.prefix(bench.pinning.load_cpus),  # the sampler must not steal the proxy's CPU
        py_spy(),
        "record",
        "--pid",
        str(target.child.pid),
        "--rate",
        str(args.rate),
        "--duration",
        str(args.seconds),
        "--format",
        fmt,
        "--output",
        str(out),
    ]
    if args.native:
        command.append("--native")
    if not args.all_threads:
        # Only samples holding the GIL: CPU spent in Python and in C called from it. Without
        # this py-spy counts some blocked threads (an idle executor worker) as busy.
        command.append("--gil")
    subprocess.run(command, check=True, capture_output=True, timeout=args.seconds + 60)
    load.join()


def summarize(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per line and per function."""
    self_lines: Counter[str] = Counter()
    self_funcs: Counter[str] = Counter()
    incl_funcs: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        self_lines[frames[-1]] += count
        self_funcs[_function(frames[-1])] += count
        for func in {_function(f) for f in frames}:
            incl_funcs[func] += count
        # Time spent below an interesting frame in uninteresting code (stdlib, C
        # extensions) is charged to the deepest interesting line that called it.
        for frame in reversed(frames):
            if any(mark in frame for mark in _INTERESTING):
                if frame != frames[-1]:
                    self_lines[f"{frame}  [+callees]"] += count
                break
    if not total:
        return "no samples (is the target busy? run as root or allow ptrace)"

    def table(title: str, counter: Counter[str], only: str | None = None) -> list[str]:
        rows = [f"\n## {title} (share of {total:,} GIL-holding samples)"]
        picked = [(k, v) for k, v in counter.most_common() if only is None or only in k]
        rows += [f"{v / total:6.1%}  {k}" for k, v in picked[:top]]
        return rows

    out: list[str] = []
    out += table("inclusive time per function: gateway/", incl_funcs, "gateway/")
    out += table("self time per line: gateway/", self_lines, "gateway/")
    out += table("self time per function (all)", self_funcs)
    out += table("inclusive time per function: aiohttp/", incl_funcs, "aiohttp/")
    out += table("self time per line: aiohttp/", self_lines, "aiohttp/")
    return "\n".join(out)


def _function(frame: str) -> str:
    """'handle (gateway/pipeline/proxy.py:80)' -> 'handle (gateway/pipeline/proxy.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    py_spy()
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    bench = Bench.create(workdir, args)
    try:
        upstream = bench.start_upstream([free_port()])
        if args.target == "baseline":
            target = bench.start_baseline(upstream)
        else:
            target = bench.start_gateway(Feature(args.target), [upstream.url])
        bench.wait_all_ready([target])
        bench.sanity_check(target, REQUEST_PATH)
        bench.measure_loaded(
            target, LoadSpec("", (REQUEST_PATH,), args.connections, 2), "warm-up", record=False
        )
        record(bench, target, args, "raw", args.raw)
        record(bench, target, args, "flamegraph", args.svg)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"# py-spy profile of {target.label} under {args.connections} connections")
    print(summarize(args.raw, args.top))
    print(f"\nflame graph: {args.svg}\nraw stacks: {args.raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
