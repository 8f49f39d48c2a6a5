"""Child processes of the benchmark: pinned to a CPU, in their own process group, stopped
for sure.

Every server the harness starts goes through ``Children`` so that one ``stop_all`` in a
``finally`` ends all of them, Ctrl-C included: each child runs in its own session, so a
terminal's SIGINT reaches only the harness, which then stops the children itself.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.helpers.ports import free_port

__all__ = ["free_port"]  # re-exported for the harness's other modules

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ChildFailed(RuntimeError):
    """A child exited or never became ready; the message carries its log's tail."""


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs the load side (load generator and upstream) and the proxy under test use.

    On a 2-core box the proxy under test gets a core to itself and everything it is
    measured against shares the other, so its requests/s is what one core buys.
    """

    load_cpus: tuple[int, ...] | None
    proxy_cpus: tuple[int, ...] | None
    note: str

    @classmethod
    def detect(cls, enabled: bool = True) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if not enabled:
            return cls(None, None, "not pinned (--no-pin)")
        if len(cpus) < 2:
            return cls(None, None, f"not pinned: only {len(cpus)} CPU available")
        if shutil.which("taskset") is None:
            return cls(None, None, "not pinned: taskset (util-linux) is missing")
        load, proxy = cpus[0], cpus[1]
        return cls(
            (load,),
            (proxy,),
            f"load generator + upstream on CPU {load}, proxy under test on CPU {proxy}",
        )

    @staticmethod
    def prefix(cpus: tuple[int, ...] | None) -> list[str]:
        if cpus is None:
            return []
        return ["taskset", "-c", ",".join(str(cpu) for cpu in cpus)]


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """Owns every process the harness starts."""

    workdir: Path
    _children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: tuple[int, ...] | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        log = self.workdir / f"{name}.log"
        # taskset execs the command, so the pid we keep is the server's own pid (for its
        # RSS and CPU time), and its threads inherit the affinity from the start.
        command = [*Pinning.prefix(cpus), *argv]
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        child = Child(name, popen, log)
        self._children.append(child)
        return child

    def wait_ready(self, child: Child, ready: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} not ready after {timeout:g}s:\n{child.log_tail()}")

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        if child in self._children:
            self._children.remove(child)
        _stop_group(child.popen, timeout)

    def pids(self) -> list[int]:
        return [child.pid for child in self._children if child.alive()]

    def stop_all(self) -> None:
        while self._children:
            self.stop(self._children[-1])

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _stop_group(popen: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the child's process group (graceful drain), SIGKILL what is left."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout)
    # Also after a clean exit: anything the child forked stays in its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        text = stat.read()
    # The command name in field 2 may hold spaces; the fields after it do not.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """(CPU time spent by anything on the machine, time stolen by the hypervisor) so far,
    summed over all CPUs."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS, steal / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU time of the harness and of its reaped children (wrk runs)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def bench_env() -> dict[str, str]:
    """The environment for ``python -m bench.*`` children: this checkout importable from
    wherever the harness was started."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    previous = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root + (os.pathsep + previous if previous else "")
    return env
