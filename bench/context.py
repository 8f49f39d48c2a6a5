"""The state of one benchmark run: its processes, load generator, targets and notes.

``bench.run`` decides *what* to measure; this module knows *how* to start each kind of
target, check that it really proxies, measure it, and find out which gateway features
were actually active (config keys may be accepted before the feature is implemented).
A canary is the one feature that a config alone does not turn on: ``wait_all_ready``
starts it through the admin API, as an operator would, once its gateway is up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import gateway_configs, nginx
from bench.gateway_configs import Feature, Listen, ScaleCell, route_names, route_prefix
from bench.loadgen import REQUEST_BODY, LoadResult, LoadSpec, PythonLoad, Wrk, pick
from bench.loop import uvloop_version
from bench.procs import (
    Child,
    ChildFailed,
    Children,
    Pinning,
    bench_env,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    own_cpu_seconds,
    tcp_open,
)
from bench.report import DISTURBED, Measured
from bench.upstream import CANNED_BODY, Upstream, start_upstream

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    label: str
    base_url: str
    child: Child
    ready: Callable[[], bool]
    admin_url: str | None = None
    feature: Feature | None = None
    trace_prefix: str | None = None
    routes: tuple[str, ...] = ()  # a gateway's route names
    measured: Measured = field(init=False)

    def __post_init__(self) -> None:
        self.measured = Measured(self.name, self.label)


@dataclass
class Bench:
    workdir: Path
    args: argparse.Namespace
    children: Children
    pinning: Pinning
    loadgen: Wrk | PythonLoad
    loadgen_note: str
    redis_ok: bool
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    notes: list[str] = field(default_factory=list)
    upstream: Upstream | None = None
    _gateway_serials: Iterator[int] = field(default_factory=itertools.count)
    # Every gateway's state store prefix in Redis, deleted when the run ends.
    _state_prefixes: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, workdir: Path, args: argparse.Namespace) -> Bench:
        pinning = Pinning.detect(enabled=not args.no_pin)
        loadgen, note = pick(args.loadgen, workdir, pinning.load_cpus)
        return cls(
            workdir=workdir,
            args=args,
            children=Children(workdir),
            pinning=pinning,
            loadgen=loadgen,
            loadgen_note=note,
            redis_ok=_redis_ping(args.redis_url),
        )

    def close(self) -> None:
        self.children.stop_all()
        # After the gateways stopped: their last writes (a canary's counts) are in.
        for prefix in self._state_prefixes:
            redis_take_keys(self.args.redis_url, prefix + ":*")

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # --- starting targets ---------------------------------------------------------------

    def start_upstream(self, ports: list[int]) -> Upstream:
        self.upstream = start_upstream(
            self.children, ports, prefer=self.args.upstream, cpus=self.pinning.load_cpus
        )
        self.log(f"upstream ({self.upstream.kind}) on {', '.join(self.upstream.urls)}")
        return self.upstream

    def direct_target(self, upstream: Upstream) -> Target:
        return Target(
            "upstream",
            f"upstream direct ({upstream.kind})",
            upstream.url,
            upstream.child,
            ready=lambda: True,
        )

    def start_nginx_proxy(self, upstream: Upstream) -> Target:
        port = free_port()
        prefix = self.workdir / "nginx-proxy"
        config = nginx.proxy_config(prefix, port, upstream.host, upstream.ports[0])
        return self._start_nginx("nginx", "nginx reverse proxy (1 worker)", prefix, port, config)

    def start_nginx_scale(self, upstream: Upstream, cell: ScaleCell) -> Target:
        """nginx laid out like the gateway's scale cell (``nginx.scale_proxy_config``)."""
        port = free_port()
        prefix = self.workdir / f"nginx-{cell.name.replace(':', '-')}"
        prefixes = [route_prefix(i, cell.routes) for i in range(cell.routes)]
        config = nginx.scale_proxy_config(
            prefix, port, upstream.host, upstream.ports[: cell.endpoints], prefixes
        )
        return self._start_nginx(cell.name, f"nginx: {cell.label}", prefix, port, config)

    def _start_nginx(self, name: str, label: str, prefix: Path, port: int, config: str) -> Target:
        binary = nginx.nginx_binary()
        assert binary is not None
        child = self.children.start(
            prefix.name, [binary, *nginx.prepare(prefix, config)], cpus=self.pinning.proxy_cpus
        )
        return Target(
            name,
            label,
            f"http://127.0.0.1:{port}",
            child,
            ready=lambda: tcp_open("127.0.0.1", port),
        )

    def start_baseline(self, upstream: Upstream) -> Target:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "bench.baseline_proxy",
            "--port",
            str(port),
            "--upstream",
            upstream.url,
        ]
        child = self.children.start("baseline", argv, cpus=self.pinning.proxy_cpus, env=bench_env())
        return Target(
            "baseline",
            "aiohttp minimal proxy (baseline)",
            f"http://127.0.0.1:{port}",
            child,
            ready=lambda: tcp_open("127.0.0.1", port),
        )

    def start_gateway(
        self,
        feature: Feature,
        upstream_urls: list[str],
        *,
        routes: int = 1,
        name: str | None = None,
        label: str | None = None,
        code: Path | None = None,
    ) -> Target:
        """A gateway with ``feature``; ``code``: a checkout whose ``gateway`` package it
        runs instead of this one's (to compare two versions of the code, paired)."""
        name = name or feature.value
        listen = Listen(
            port=free_port(),
            admin_port=free_port(),
            state_path=self.workdir / f"{name}-state.db",
            redis_url=self.args.redis_url,
            # One prefix per gateway started, never the start of another's followed by
            # ":" (the key count after the run globs "<prefix>:*"), even when a paired
            # run restarts a gateway of the same name every round.
            trace_prefix=f"gwbench{self.run_id}g{next(self._gateway_serials)}",
        )
        shadow_url = self.upstream.challenger_url if self.upstream is not None else None
        document = gateway_configs.scale_document(
            feature, listen, upstream_urls, routes, shadow_url=shadow_url
        )
        config = gateway_configs.write(document, self.workdir / f"gateway-{name}.yaml")
        if feature.traces:
            self._state_prefixes.append(listen.state_prefix)
        env = None
        if code is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
        child = self.children.start(
            f"gateway-{name}",
            [*gateway_command(), "run", "-c", str(config)],
            cpus=self.pinning.proxy_cpus,
            env=env,
        )
        admin = f"http://127.0.0.1:{listen.admin_port}"
        return Target(
            name,
            label or feature.label,
            f"http://127.0.0.1:{listen.port}",
            child,
            ready=lambda: _http_ok(admin + "/readyz"),
            admin_url=admin,
            feature=feature,
            trace_prefix=listen.trace_prefix if feature.traces else None,
            routes=route_names(document),
        )

    def feature_or_fallback(self, name: str | None, default: Feature) -> Feature:
        feature = Feature(name) if name else default
        if feature.needs_redis and not self.redis_ok:
            self.notes.append(
                f"Redis unreachable at {self.args.redis_url}: {feature.label} replaced by "
                f"{Feature.SPLIT.label}"
            )
            return Feature.SPLIT
        return feature

    def wait_all_ready(self, targets: list[Target]) -> None:
        """Wait until every target is up, then start the canaries of those that have one
        (so every mode that starts a canary cell measures it running)."""
        # Everything was started without waiting, so the start-ups overlap.
        for target in targets:
            self.children.wait_ready(target.child, target.ready)
        for target in targets:
            if target.feature is not None and target.feature.canary:
                assert target.admin_url is not None
                start_canaries(target.admin_url, target.routes, target.child)

    def sanity_check(self, target: Target, path: str) -> None:
        """One request through the target must come back as the upstream's answer: a
        proxy that answers errors quickly would otherwise look fast."""
        request = urllib.request.Request(
            target.base_url + path,
            data=REQUEST_BODY,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        except OSError as error:
            raise ChildFailed(f"{target.label}: request failed: {error}") from None
        if status != 200 or body != CANNED_BODY:
            raise ChildFailed(
                f"{target.label}: expected 200 with the canned body, got {status}: "
                f"{body[:300]!r}\n{target.child.log_tail()}"
            )

    # --- measuring ----------------------------------------------------------------------

    def warm_up(self, targets: list[Target], spec: LoadSpec) -> None:
        for target in targets:
            self.measure_loaded(target, spec, "warm-up", record=False)

    def measure_loaded(
        self, target: Target, spec: LoadSpec, tag: str, *, record: bool = True
    ) -> LoadResult:
        result, used, foreign = self._measure(target, spec, tag)
        if record:
            target.measured.loaded.append(result)
            target.measured.cpu_seconds.append(used)
            target.measured.foreign_cpu.append(foreign)
        return result

    def measure_single(self, target: Target, spec: LoadSpec, tag: str) -> LoadResult:
        result, _, foreign = self._measure(target, spec, tag)
        target.measured.single.append(result)
        target.measured.foreign_cpu.append(foreign)
        return result

    def _measure(self, target: Target, spec: LoadSpec, tag: str) -> tuple[LoadResult, float, float]:
        """One run, repeated (up to --retries times) while other processes disturb it."""
        spec = _at(spec, target.base_url)
        attempt = 0
        while True:
            self.wait_quiet()
            result, used, foreign = self._run_once(target, spec)
            self._progress(tag, target, spec, result, used, foreign)
            if foreign < DISTURBED or attempt >= self.args.retries:
                return result, used, foreign
            attempt += 1
            self.log(f"  disturbed by other processes: repeating ({attempt}/{self.args.retries})")

    def _run_once(self, target: Target, spec: LoadSpec) -> tuple[LoadResult, float, float]:
        pids = self.children.pids()
        before = cpu_seconds(target.child.pid)
        start = _cpu_snapshot(pids)
        result = self.loadgen.run(spec)
        # Whatever else ran meanwhile (other users' jobs, the hypervisor) took CPU from
        # the processes under test; reported so that a disturbed run is not mistaken
        # for a slow one.
        foreign = _foreign_since(start, pids)
        used = cpu_seconds(target.child.pid) - before
        return result, used, foreign / result.seconds if result.seconds else 0.0

    def wait_quiet(self) -> None:
        """Wait (up to --quiet-wait seconds) until other processes leave the CPUs alone."""
        deadline = time.monotonic() + self.args.quiet_wait
        warned = False
        while True:
            load = self.foreign_load(0.5)
            if load < DISTURBED or time.monotonic() >= deadline:
                return
            if not warned:
                self.log(f"  waiting for other processes to go quiet ({load:.0%} of a CPU)")
                warned = True

    def foreign_load(self, seconds: float) -> float:
        pids = self.children.pids()
        start = _cpu_snapshot(pids)
        time.sleep(seconds)
        return _foreign_since(start, pids) / seconds

    def _progress(
        self,
        tag: str,
        target: Target,
        spec: LoadSpec,
        result: LoadResult,
        cpu: float | None,
        foreign: float | None,
    ) -> None:
        share = f"  cpu {cpu / result.seconds:4.0%}" if cpu is not None and result.seconds else ""
        if foreign is not None and foreign >= DISTURBED:
            share += f"  (other processes: {foreign:.0%} of a CPU)"
        errors = result.errors + result.non_2xx
        flag = f"  ERRORS {errors}" if errors else ""
        self.log(
            f"[{tag}] {target.name:<9} c={spec.connections:<3} {result.rps:>9,.0f} req/s"
            f"  p50 {result.p50_us / 1000:6.2f} ms  p99 {result.p99_us / 1000:6.2f} ms"
            f"{share}{flag}"
        )

    # --- what was really on -------------------------------------------------------------

    def note_feature_activity(self, targets: list[Target]) -> None:
        """Read each gateway's /metrics while it still runs."""
        for target in targets:
            if target.admin_url is None or target.feature is None:
                continue
            try:
                text = _http_get(target.admin_url + "/metrics").decode()
            except OSError as error:
                target.measured.notes.append(f"/metrics unreadable: {error}")
                continue
            requests = metric_sum(text, "gateway_requests_total") or 0.0
            if target.feature.shadow:
                mirrored = metric_sum(text, "gateway_shadow_requests_total") or 0.0
                if mirrored:
                    share = mirrored / requests if requests else 0.0
                    compared = sum(
                        metric_sum(text, "gateway_shadow_requests_total", f'outcome="{o}"') or 0
                        for o in ("match", "mismatch")
                    )
                    target.measured.notes.append(
                        f"shadow active ({mirrored:,.0f} mirrored, {share:.1%}; "
                        f"{compared / mirrored:.0%} compared)"
                    )
                else:
                    target.measured.notes.append(
                        "shadow NOT active (0 mirrored; config accepted only)"
                    )
            if target.feature.traces:
                writes = metric_sum(text, "gateway_trace_writes_total")
                target.measured.notes.append(f"trace writes metric: {writes or 0:,.0f}")
            if target.feature.canary:
                target.measured.notes.append(canary_activity(target.admin_url, target.routes))

    def note_trace_keys(self, targets: list[Target]) -> None:
        """After the gateways stopped (and flushed): count, then delete, their trace keys."""
        for target in targets:
            if target.trace_prefix is None:
                continue
            keys = redis_take_keys(self.args.redis_url, target.trace_prefix + ":*")
            if keys is None:
                target.measured.notes.append("trace keys: Redis unreadable")
            elif keys:
                target.measured.notes.append(f"traces active ({keys} windows in Redis)")
            else:
                target.measured.notes.append(
                    "traces NOT active (no trace keys in Redis; config accepted only)"
                )

    def meta(self) -> dict[str, Any]:
        binary = nginx.nginx_binary()
        return {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "aiohttp": _version("aiohttp"),
            "uvloop": uvloop_version() or "not installed",
            "loadgen": f"{self.loadgen_note} ({self.loadgen.version()})",
            "comparable": self.loadgen.comparable,
            "upstream": self.upstream.kind if self.upstream else None,
            "nginx": nginx.nginx_version(binary) if binary else None,
            "pinning": self.pinning.note,
            "connections": self.args.connections,
            "duration": self.args.duration,
            "latency_duration": self.args.latency_duration,
            "rounds": self.args.rounds,
            "git": _git_describe(),
            "run_id": self.run_id,  # in every Redis key prefix of the run's gateways
            "notes": self.notes,
        }


def gateway_command() -> list[str]:
    """``gateway`` from this interpreter's environment (the project venv)."""
    script = Path(sys.executable).with_name("gateway")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gateway.cli"]


def start_canaries(admin_url: str, routes: Iterable[str], child: Child) -> None:
    """Start each route's canary (``POST .../canary/start``). Anything but a 200 stops
    the run: a canary cell whose canary is not running would measure the traces cell."""
    for route in routes:
        url = f"{admin_url}/api/v1/routes/{route}/canary/start"
        request = urllib.request.Request(url, data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        except OSError as error:
            raise ChildFailed(f"POST {url} failed: {error}\n{child.log_tail()}") from None
        if status != 200:
            raise ChildFailed(
                f"POST {url}: expected 200, got {status}: {body[:300]!r}\n{child.log_tail()}"
            )


def canary_activity(admin_url: str, routes: Iterable[str]) -> str:
    """A note on a gateway's canaries, read from its admin API while it runs: their
    state, and the requests every process counted into the current step and wrote to
    the store (what the leader decides on). Counted requests prove the counting ran."""
    states: set[str] = set()
    counted = 0
    try:
        for route in routes:
            view = json.loads(_http_get(f"{admin_url}/api/v1/routes/{route}/canary"))
            states.add(f"{view['state']} at weight {view['weight']:g}")
            step = view["counts"]["step"]
            counted += step["champion"]["requests"] + step["challenger"]["requests"]
    except (OSError, ValueError, KeyError) as error:
        return f"canary state unreadable: {error}"
    running = all(s.startswith(("progressing ", "holding ")) for s in states)
    verdict = "active" if running and counted else "NOT active"
    return (
        f"canary {verdict} ({', '.join(sorted(states))}; {counted:,} requests counted "
        f"in the step, from the store)"
    )


def metric_sum(text: str, name: str, label: str = "") -> float | None:
    """Sum of a metric's samples in Prometheus text format (those with ``label``, e.g.
    ``outcome="match"``, when given); None when it has none."""
    total: float | None = None
    for line in text.splitlines():
        if (
            line.startswith(name)
            and line[len(name) : len(name) + 1] in ("{", " ")
            and label in line
        ):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def _cpu_snapshot(pids: list[int]) -> tuple[float, float]:
    """(CPU used or stolen on the whole machine, CPU used by the benchmark) so far."""
    busy, steal = machine_busy_seconds()
    return busy + steal, own_cpu_seconds() + _cpu_of(pids)


def _foreign_since(start: tuple[float, float], pids: list[int]) -> float:
    """CPU seconds taken since ``start`` by processes the benchmark did not start."""
    machine, ours = _cpu_snapshot(pids)
    return max(0.0, (machine - start[0]) - (ours - start[1]))


def _cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def _at(spec: LoadSpec, base_url: str) -> LoadSpec:
    return dataclasses.replace(spec, base_url=base_url)


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _redis_ping(url: str) -> bool:
    # redis-py comes with the gateway (its store and trace writer use it).
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        with contextlib.closing(client):
            return bool(client.ping())
    except redis.RedisError:
        return False


def redis_take_keys(url: str, pattern: str) -> int | None:
    """Delete the keys that match ``pattern``: how many there were (None: Redis down)."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        with contextlib.closing(client):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
            return len(keys)
    except redis.RedisError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _git_describe() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except OSError:
        return None
    return done.stdout.strip() or None
