"""Stream mode: thousands of concurrent LLM token streams through each proxy, side by side.

    python -m bench.stream                                  # C = 200, 1,000, 2,000; 3 rounds
    python -m bench.stream --sizes 2000 --rounds 5 --only nginx,gateway
    python -m bench.stream --slow-only                      # 100 stalled readers of 10 MB

An SSE upstream (``bench.stream_upstream``: chunks stamped with their send time) and a
client in its own process (``bench.stream_client``: C streams, every chunk's delay from
upstream send to client receive) on the load CPU; the proxy under test alone on the
other. Targets: the upstream direct, the minimal aiohttp proxy (``bench.baseline_proxy``,
streaming), nginx (one worker, ``proxy_buffering off``, keep-alive upstream) and the
gateway (split 50 % + Redis traces reading every stream's ``usage``; without Redis, split
only). Every round runs every target once at each size, in a rotating order; each run
gets a fresh proxy process, warmed up with a few streams before it is measured.

Per run: added per-chunk delay (p50/p99/max through the proxy minus the same figure
direct, same round), time to first chunk, complete streams, CPU seconds of the proxy's
process tree (``/proc/PID/stat``, the pid and its descendants) per 1,000 chunks
delivered, and RSS per open stream (peak RSS of the tree during the run minus its RSS
just before, over C). A run during which processes other than the harness's took more
than ``--noisy`` of a CPU (``/proc/stat`` busy time less the harness's own processes) is
marked noisy; the summary takes medians over quiet runs (over all when none are quiet).

``--slow`` (on by default): 100 clients ask the gateway for 10 MB answers, read 64 KB
and stop reading for ``--hold`` seconds (receive buffer 64 KB, so the kernel does not
hide it): the gateway's RSS growth, and how much of each answer the upstream got out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import gateway_configs, nginx
from bench.context import _http_ok, _redis_ping, redis_take_keys
from bench.gateway_configs import REQUEST_PATH, Feature, Listen
from bench.procs import (
    Child,
    Children,
    Pinning,
    bench_env,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    own_cpu_seconds,
    rss_bytes,
    tcp_open,
)

TARGETS = ("direct", "baseline", "nginx", "gateway", "reference")
LABELS = {
    "direct": "upstream direct",
    "baseline": "minimal aiohttp proxy",
    "nginx": "nginx (1 worker, buffering off)",
    "gateway": "gateway",
    "reference": "gateway, --reference code",
}


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                text = stat.read()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_bytes(p)
    return total


@dataclass
class Proxy:
    name: str
    url: str  # where the client sends its requests
    child: Child | None  # None: the upstream itself (direct)


@dataclass
class Bench:
    args: argparse.Namespace
    children: Children
    pinning: Pinning
    upstream: Child
    upstream_port: int
    redis_ok: bool
    serial: int = 0
    prefixes: list[str] = field(default_factory=list)

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream_port}"

    def start(self, name: str) -> Proxy:
        """A fresh process of target ``name``, ready."""
        self.serial += 1
        cpus = self.pinning.proxy_cpus
        if name == "direct":
            return Proxy(name, self.upstream_url + REQUEST_PATH, None)
        port = free_port()
        ready: Callable[[], bool] = lambda: tcp_open("127.0.0.1", port)  # noqa: E731
        if name == "baseline":
            argv = [sys.executable, "-m", "bench.baseline_proxy", "--port", str(port)]
            argv += ["--upstream", self.upstream_url]
            child = self.children.start(f"baseline{self.serial}", argv, cpus=cpus, env=bench_env())
        elif name == "nginx":
            binary = nginx.nginx_binary()
            assert binary is not None
            prefix = self.children.workdir / f"nginx{self.serial}"
            config = nginx.proxy_config(prefix, port, "127.0.0.1", self.upstream_port)
            child = self.children.start(
                f"nginx{self.serial}", [binary, *nginx.prepare(prefix, config)], cpus=cpus
            )
        else:
            child, ready = self._start_gateway(port, cpus, name == "reference")
        self.children.wait_ready(child, ready)
        return Proxy(name, f"http://127.0.0.1:{port}{REQUEST_PATH}", child)

    def _start_gateway(
        self, port: int, cpus: tuple[int, ...] | None, reference: bool = False
    ) -> tuple[Child, Callable[[], bool]]:
        feature = Feature.TRACES if self.redis_ok else Feature.SPLIT
        admin_port = free_port()
        prefix = f"gwstream{os.getpid()}g{self.serial}"
        listen = Listen(
            port,
            admin_port,
            self.children.workdir / f"state{self.serial}.db",
            self.args.redis_url,
            prefix,
        )
        self.prefixes += [prefix, listen.state_prefix]
        document = gateway_configs.feature_document(feature, listen, [self.upstream_url])
        for backend in document["backends"].values():
            # An LLM deployment's: thousands of open streams per endpoint (default 1,024).
            backend["max_connections"] = 100_000
        config = gateway_configs.write(
            document, self.children.workdir / f"gateway{self.serial}.yaml"
        )
        env = bench_env()
        if reference:
            # Another checkout's gateway package (git worktree add /tmp/ref COMMIT).
            env["PYTHONPATH"] = os.pathsep.join([str(self.args.reference), env["PYTHONPATH"]])
        child = self.children.start(
            f"gateway{self.serial}",
            # -P: not the current directory first on sys.path, so PYTHONPATH decides.
            [sys.executable, "-P", "-m", "gateway.cli", "run", "-c", str(config)],
            cpus=cpus,
            env=env,
        )
        return child, lambda: _http_ok(f"http://127.0.0.1:{admin_port}/readyz")

    def client(self, url: str, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "bench.stream_client", "--url", url, *extra]
        return subprocess.Popen(
            [*Pinning.prefix(self.pinning.load_cpus), *argv],
            stdout=subprocess.PIPE,
            env=bench_env(),
        )

    def stream_args(self, streams: int, chunks: int) -> list[str]:
        return [
            "--streams", str(streams), "--chunks", str(chunks),
            "--interval-ms", str(self.args.interval_ms), "--ramp", str(self.args.ramp),
        ]  # fmt: skip

    def measure(self, proxy: Proxy, streams: int) -> dict[str, Any]:
        """One measured run of ``streams`` streams through ``proxy``."""
        # Warm-up: the code paths and the first upstream connections.
        warm = self.client(proxy.url, "--streams", "20", "--chunks", "5", "--interval-ms", "10",
                           "--ramp", "0.1")  # fmt: skip
        warm.communicate(timeout=60)
        time.sleep(0.5)
        pid = proxy.child.pid if proxy.child is not None else None
        rss0 = tree_rss(pid) if pid is not None else 0
        cpu0 = tree_cpu(pid) if pid is not None else 0.0
        up0 = cpu_seconds(self.upstream.pid)
        busy0, steal0 = machine_busy_seconds()
        own0 = own_cpu_seconds()
        t0 = time.monotonic()
        client = self.client(proxy.url, *self.stream_args(streams, self.args.chunks))
        peak = rss0
        # The steady window: every stream open (the ramp and a first chunk's wait past)
        # and none ended yet. CPU in it, per chunk sent in it, is what relaying costs
        # without opening and closing streams; the rest of the run's CPU is that.
        opened = t0 + self.args.ramp + 0.5
        ending = t0 + self.args.chunks * self.args.interval_ms / 1000 - 0.5
        window: list[tuple[float, float]] = []
        while client.poll() is None:
            if pid is not None:
                peak = max(peak, tree_rss(pid))
                now = time.monotonic()
                if (not window and now >= opened) or (len(window) == 1 and now >= ending):
                    window.append((now, tree_cpu(pid)))
            time.sleep(0.2)
        out, _ = client.communicate()
        wall = time.monotonic() - t0
        cpu1 = tree_cpu(pid) if pid is not None else 0.0
        up1 = cpu_seconds(self.upstream.pid)
        busy1, steal1 = machine_busy_seconds()
        own1 = own_cpu_seconds()
        result: dict[str, Any] = json.loads(out)
        result.pop("received_bytes", None)
        ours = (own1 - own0) + (up1 - up0) + (cpu1 - cpu0)
        others = max(0.0, (busy1 - busy0) - ours) / wall
        chunks = max(1, result["chunks"])
        steady = setup = None
        if len(window) == 2 and window[1][0] > window[0][0]:
            (w0, c0), (w1, c1) = window
            window_chunks = streams * (w1 - w0) / (self.args.interval_ms / 1000)
            steady = (c1 - c0) / window_chunks * 1000
            setup = ((cpu1 - cpu0) - steady / 1000 * chunks) / streams * 1e6
        result.update(
            target=proxy.name,
            size=streams,
            proxy_cpu_s=round(cpu1 - cpu0, 3),
            cpu_s_per_1000_chunks=None if pid is None else (cpu1 - cpu0) / chunks * 1000,
            steady_cpu_s_per_1000_chunks=steady,
            setup_cpu_us_per_stream=setup,
            rss_per_stream_kb=None if pid is None else (peak - rss0) / streams / 1024,
            rss_start_mb=rss0 / 2**20,
            upstream_cpu_s=round(up1 - up0, 3),
            others_cpu=round(others, 3),
            steal_s=round(steal1 - steal0, 3),
            noisy=others > self.args.noisy,
        )
        return result

    def stop(self, proxy: Proxy) -> None:
        if proxy.child is not None:
            self.children.stop(proxy.child)

    def cleanup(self) -> None:
        if self.redis_ok:
            for prefix in self.prefixes:
                redis_take_keys(self.args.redis_url, prefix + ":*")


def start_upstream(children: Children, pinning: Pinning) -> tuple[Child, int]:
    """The SSE upstream on the load CPU, listening; and its port."""
    port = free_port()
    upstream = children.start(
        "stream-upstream",
        [sys.executable, "-m", "bench.stream_upstream", "--port", str(port)],
        cpus=pinning.load_cpus,
        env=bench_env(),
    )
    children.wait_ready(upstream, lambda: tcp_open("127.0.0.1", port))
    return upstream, port


def slow_consumers(bench: Bench) -> dict[str, Any]:
    """100 stalled readers of 10 MB answers through a gateway."""
    args = bench.args
    proxy = bench.start("gateway")
    try:
        assert proxy.child is not None
        warm = bench.client(proxy.url, "--streams", "20", "--chunks", "5", "--interval-ms", "10")
        warm.communicate(timeout=60)
        time.sleep(0.5)
        _upstream_stats(bench, reset=True)
        rss0 = tree_rss(proxy.child.pid)
        client = bench.client(
            proxy.url, "--streams", str(args.slow_streams), "--stall-after", "65536",
            "--bytes", str(args.slow_bytes), "--hold", str(args.hold), "--ramp", "0.5",
        )  # fmt: skip
        peak = rss0
        stats: dict[str, Any] = {}
        started = time.monotonic()
        while client.poll() is None:
            peak = max(peak, tree_rss(proxy.child.pid))
            if not stats and time.monotonic() - started > args.hold - 1:
                stats = _upstream_stats(bench)  # while they are stalled
            time.sleep(0.2)
        out, _ = client.communicate()
        time.sleep(1.0)
        after = tree_rss(proxy.child.pid)
        result = json.loads(out)
        sent = stats.get("bulk_bytes", [])
        received = result.get("received_bytes", [])
        return {
            "streams": args.slow_streams,
            "answer_bytes": args.slow_bytes,
            "hold_s": args.hold,
            "gateway_rss_start_mb": rss0 / 2**20,
            "gateway_rss_growth_mb": (peak - rss0) / 2**20,
            "gateway_rss_after_close_mb": after / 2**20,
            "upstream_sent_mb_median": statistics.median(sent) / 2**20 if sent else None,
            "upstream_sent_mb_max": max(sent) / 2**20 if sent else None,
            "upstream_paused_streams": stats.get("bulk_paused"),
            "client_received_kb_median": statistics.median(received) / 1024 if received else None,
        }
    finally:
        bench.stop(proxy)


def _upstream_stats(bench: Bench, reset: bool = False) -> dict[str, Any]:
    import urllib.request

    url = bench.upstream_url + "/stats" + ("?reset=1" if reset else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (size, target): medians over quiet rounds (over all rounds if none is quiet),
    the added delays taken per round against that round's direct run."""
    direct = {(r["size"], r["round"]): r for r in runs if r["target"] == "direct"}
    rows = []
    for size in sorted({r["size"] for r in runs}):
        for target in TARGETS:
            mine = [r for r in runs if r["size"] == size and r["target"] == target]
            if not mine:
                continue
            quiet = [r for r in mine if not r["noisy"]]
            use = quiet or mine

            def med(values: list[float | None]) -> float | None:
                known = [v for v in values if v is not None]
                return statistics.median(known) if known else None

            added: dict[str, float | None] = {}
            for key in ("p50", "p99", "max"):
                values = []
                for r in use:
                    base = direct.get((size, r["round"]))
                    if base is not None:
                        values.append(r["delay_ms"][key] - base["delay_ms"][key])
                added[key] = med(values)
            rows.append(
                {
                    "size": size,
                    "target": target,
                    "rounds": len(mine),
                    "quiet": len(quiet),
                    "complete": f"{min(r['complete'] for r in mine)}/{size}",
                    "chunks_ok": all(r["chunks"] == r["expected_chunks"] for r in mine),
                    "delay_ms": {
                        k: med([r["delay_ms"][k] for r in use]) for k in ("p50", "p99", "max")
                    },
                    "added_ms": added,
                    "ttfc_ms": {k: med([r["ttfc_ms"][k] for r in use]) for k in ("p50", "p99")},
                    "cpu_per_1000": med([r["cpu_s_per_1000_chunks"] for r in use]),
                    "steady_per_1000": med([r.get("steady_cpu_s_per_1000_chunks") for r in use]),
                    "setup_us": med([r.get("setup_cpu_us_per_stream") for r in use]),
                    "rss_per_stream_kb": med([r["rss_per_stream_kb"] for r in use]),
                    "others_cpu": [r["others_cpu"] for r in mine],
                }
            )
    return rows


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(rows: list[dict[str, Any]], slow: dict[str, Any] | None, notes: list[str]) -> str:
    lines = [
        "| C | target | complete | added per-chunk p50 / p99 / max ms | TTFC p50 / p99 ms "
        "| CPU s per 1,000 chunks | of which: steady / set-up µs per stream "
        "| RSS per stream KB | quiet rounds | others' CPU per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        added = row["added_ms"]
        if row["target"] == "direct":
            d = row["delay_ms"]
            delays = f"(itself: {_f(d['p50'], 2)} / {_f(d['p99'], 2)} / {_f(d['max'], 1)})"
        else:
            delays = f"{_f(added['p50'], 2)} / {_f(added['p99'], 2)} / {_f(added['max'], 1)}"
        others = ", ".join(f"{o:.2f}" for o in row["others_cpu"])
        lines.append(
            f"| {row['size']:,} | {LABELS[row['target']]} | {row['complete']}"
            f"{'' if row['chunks_ok'] else ' (chunks missing)'} | {delays} "
            f"| {_f(row['ttfc_ms']['p50'])} / {_f(row['ttfc_ms']['p99'])} "
            f"| {_f(row['cpu_per_1000'], 4)} "
            f"| {_f(row['steady_per_1000'], 4)} / {_f(row['setup_us'], 0)} "
            f"| {_f(row['rss_per_stream_kb'])} "
            f"| {row['quiet']}/{row['rounds']} | {others} |"
        )
    if slow is not None:
        lines += [
            "",
            f"Slow consumers: {slow['streams']} readers of {slow['answer_bytes'] / 2**20:g} MB "
            f"answers stalled for {slow['hold_s']:g} s: gateway RSS "
            f"{slow['gateway_rss_start_mb']:.1f} MB, grew by {slow['gateway_rss_growth_mb']:.1f} "
            f"MB ({slow['gateway_rss_after_close_mb']:.1f} MB after they closed); the upstream got "
            f"{_f(slow['upstream_sent_mb_median'], 2)} MB (median, max "
            f"{_f(slow['upstream_sent_mb_max'], 2)}) of each answer out, "
            f"{slow['upstream_paused_streams']} of its sockets full; clients had read "
            f"{_f(slow['client_received_kb_median'], 0)} KB each.",
        ]
    lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000,2000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(TARGETS))
    parser.add_argument("--chunks", type=int, default=100, help="token chunks per stream")
    parser.add_argument("--interval-ms", type=float, default=100.0)
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds to open the streams")
    parser.add_argument("--noisy", type=float, default=0.15,
                        help="others' CPU (in CPUs) above which a run is marked noisy")  # fmt: skip
    parser.add_argument("--slow", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--slow-only", action="store_true")
    parser.add_argument("--slow-streams", type=int, default=100)
    parser.add_argument("--slow-bytes", type=int, default=10 * 2**20)
    parser.add_argument("--hold", type=float, default=10.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a checkout of other code: its gateway runs beside this one (target 'reference')",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    targets = [t for t in TARGETS if t in args.only.split(",")]
    if args.reference is not None and "reference" not in targets:
        targets.append("reference")
    if args.reference is None and "reference" in targets:
        targets.remove("reference")
    if "nginx" in targets and nginx.nginx_binary() is None:
        print("nginx is not installed: skipped", file=sys.stderr)
        targets.remove("nginx")
    pinning = Pinning.detect(enabled=not args.no_pin)
    notes = [
        pinning.note,
        f"{args.chunks} token chunks per stream every {args.interval_ms:g} ms, then the usage "
        f"chunk and [DONE]; streams opened over {args.ramp:g} s",
        f"git {_git()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs",
    ]
    runs: list[dict[str, Any]] = []
    slow = None
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-stream-") as work,
        Children(Path(work)) as children,
    ):
        upstream, port = start_upstream(children, pinning)
        redis_ok = _redis_ping(args.redis_url)
        if not redis_ok:
            notes.append(f"Redis unreachable at {args.redis_url}: the gateway runs split only")
        else:
            notes.append("gateway: split 50 % + Redis traces (every stream's usage read)")
        bench = Bench(args, children, pinning, upstream, port, redis_ok)
        try:
            if not args.slow_only:
                for round_ in range(args.rounds):
                    for size in sizes:
                        shift = round_ % len(targets)
                        order = targets[shift:] + targets[:shift]
                        for name in order:
                            proxy = bench.start(name)
                            try:
                                run = bench.measure(proxy, size)
                            finally:
                                bench.stop(proxy)
                            run["round"] = round_
                            runs.append(run)
                            print(
                                f"round {round_} C={size} {name}: "
                                f"complete {run['complete']}/{size} "
                                f"p50/p99/max {run['delay_ms']['p50']:.2f}/"
                                f"{run['delay_ms']['p99']:.2f}/{run['delay_ms']['max']:.1f} ms "
                                f"cpu/1k {_f(run['cpu_s_per_1000_chunks'], 4)} "
                                f"(steady {_f(run['steady_cpu_s_per_1000_chunks'], 4)}, "
                                f"set-up {_f(run['setup_cpu_us_per_stream'], 0)} us/stream) "
                                f"rss/stream {_f(run['rss_per_stream_kb'])} KB "
                                f"others {run['others_cpu']:.2f}"
                                f"{' NOISY' if run['noisy'] else ''}",
                                file=sys.stderr,
                                flush=True,
                            )
            if args.slow or args.slow_only:
                slow = slow_consumers(bench)
        finally:
            bench.cleanup()
    rows = summarize(runs)
    text = report(rows, slow, notes)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs, "rows": rows, "slow": slow, "notes": notes},
                                        indent=1))  # fmt: skip
    return 0


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=False, cwd=Path(__file__).parent,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
