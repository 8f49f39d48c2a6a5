"""The ``gateway`` command: run | check | demo | status | weight | canary | models."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, GatewayConfig, load, references
from gateway.core.reference import Reference
from gateway.text import counted

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

DEFAULT_ADMIN = "http://127.0.0.1:9090"


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed, on asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _print_config_error(error: ConfigError) -> None:
    print(f"{error.source or 'config'}: invalid configuration", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except ConfigError as error:
        _print_config_error(error)
        return 1
    backends, routes = (
        counted(len(config.backends), "backend"),
        counted(len(config.routes), "route"),
    )
    print(f"{args.config}: ok ({backends}, {routes})")
    for warning in _reference_warnings(config):
        print(f"  warning: {warning}", file=sys.stderr)
    return 0


def _reference_warnings(config: GatewayConfig) -> list[str]:
    """Registry references (model:NAME@ALIAS) are not errors when the model, alias or
    version is missing: it may be registered after the file is written. They are
    checked against the registry in the config's state store when it can be read now,
    and said to be unchecked otherwise."""
    found = references(config)
    if not found:
        return []
    state = config.state
    try:
        if state.backend == "embedded" and not os.path.exists(state.path):
            read = {}  # no store yet: nothing registered (and check creates nothing)
        else:
            read = asyncio.run(asyncio.wait_for(_read_registry(config, found), 5.0))
    except Exception as error:  # whatever the store does, check still answers
        why = str(error) or type(error).__name__
        return [
            f"{where}: {ref} is resolved from the model registry at run time; the state "
            f"store could not be read now to check it ({why})"
            for where, ref in found
        ]
    warnings = []
    for where, ref in found:
        aliases, versions = read.get(ref.model, ({}, set()))
        if not versions:
            problem = f"no model {ref.model!r} in the registry yet"
        elif ref.version is not None and ref.version not in versions:
            problem = f"model {ref.model!r} has no version {ref.version} yet"
        elif ref.alias not in (None, "latest") and ref.alias not in aliases:
            problem = f"alias {ref.alias!r} of model {ref.model!r} points at no version yet"
        else:
            continue
        warnings.append(f"{where}: {ref}: {problem} (until then it serves nothing)")
    return warnings


async def _read_registry(
    config: GatewayConfig, found: list[tuple[str, Reference]]
) -> dict[str, tuple[dict[str, int], set[int]]]:
    """The referenced models' aliases and version numbers, from the config's store."""
    from gateway.registry import Registry
    from gateway.store import open_store

    state = config.state
    store = open_store(state.backend, state.path, state.redis_url, f"{state.key_prefix}:state:")
    try:
        registry = Registry(store)
        read = {}
        for model in sorted({ref.model for _, ref in found}):
            versions = {v.version for v in await registry.versions(model)}
            read[model] = (await registry.aliases(model), versions)
        return read
    finally:
        await store.close()


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway, StartError

    try:
        config = load(args.config)
    except ConfigError as error:
        _print_config_error(error)
        return 1
    workers = args.workers or config.server.workers
    if workers > 1 and args.worker is None:
        from gateway.workers import supervise

        return supervise(args.config, workers, ["--log-level", args.log_level])
    gateway = Gateway(config, args.config, reuse_port=args.worker is not None)
    try:
        run_async(gateway.serve_until_signalled(supervisor=args.worker))
    except (OSError, StartError) as error:
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        run_async(run_demo(args.port, args.admin_port, args.weight, args.error_rate, args.load))
    except OSError as error:
        print(f"gateway demo: cannot start: {error} (try --port/--admin-port)", file=sys.stderr)
        return 1
    return 0


class AdminError(SystemExit):
    """A failed admin API call. Uncaught, Python prints its one-line message on stderr and
    exits with 1, without a traceback; ``canary status --watch`` catches it to retry."""


def _admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    url = args.admin.rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except ValueError:
        raise AdminError(f"gateway: {url} did not answer like the gateway's admin API") from None
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = error.reason
        raise AdminError(f"gateway: {method} {url}: {error.code} {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise AdminError(f"gateway: cannot reach the admin API at {url}: {reason}") from None
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    data = _admin_call(args, "GET", "/api/v1/routes")
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
        raise SystemExit(f"gateway: {args.admin} did not answer like the gateway's admin API")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"{'ROUTE':<20} {'CHAMPION':<20} {'CHALLENGER':<20} {'WEIGHT':>7}  {'HEALTHY':>7}  "
        "SPLIT KEY"
    )
    for route in data["routes"]:
        print(
            f"{route['name']:<20} {route['champion']:<20} {route['challenger'] or '-':<20} "
            f"{route['challenger_weight']:>7.4g}  {_healthy_endpoints(route):>7}  "
            f"{route['split']['key']}"
        )
    return 0


def _healthy_endpoints(route: dict[str, Any]) -> str:
    """"healthy/all" over the endpoints of the route's backends, as the admin API shows
    them (an older gateway shows none: "-")."""
    endpoints = [e for pool in (route.get("endpoints") or {}).values() for e in pool]
    if not endpoints:
        return "-"
    return f"{sum(1 for e in endpoints if e.get('healthy'))}/{len(endpoints)}"


def cmd_weight(args: argparse.Namespace) -> int:
    route = _admin_call(
        args, "PUT", f"/api/v1/routes/{args.route}/weight", {"challenger_weight": args.weight}
    )
    if not isinstance(route, dict) or "challenger_weight" not in route:
        raise SystemExit(f"gateway: {args.admin} did not answer like the gateway's admin API")
    print(f"{route['name']}: challenger weight {route['challenger_weight']:g}")
    return 0


# --- gateway canary ------------------------------------------------------------------------

# How the detailed view colours a canary's state and a check's verdict (in a terminal).
_STATE_STYLES = {
    "idle": "dim",
    "progressing": "bold cyan",
    "holding": "bold yellow",
    "awaiting_promotion": "bold green",
    "promoted": "green",
    "rolled_back": "bold red",
    "paused": "bold magenta",
}
_VERDICT_STYLES = {"pass": "green", "fail": "bold red", "inconclusive": "yellow"}
HISTORY_SHOWN = 5
WATCH_SECONDS = 1.0


def _not_admin_api(args: argparse.Namespace) -> AdminError:
    return AdminError(f"gateway: {args.admin} did not answer like the gateway's admin API")


def _checked_view(args: argparse.Namespace, view: Any) -> dict[str, Any]:
    """``view`` if it is a canary view as the admin API answers it."""
    fields = (("route", str), ("state", str), ("step", int), ("steps", list), ("weight", float))
    if not isinstance(view, dict) or not all(
        isinstance(view.get(name), kind) or (kind is float and isinstance(view.get(name), int))
        for name, kind in fields
    ):
        raise _not_admin_api(args)
    return view


def _canary_view(args: argparse.Namespace, route: str) -> dict[str, Any]:
    path = f"/api/v1/routes/{urllib.parse.quote(route, safe='')}/canary"
    return _checked_view(args, _admin_call(args, "GET", path))


def _canary_views(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The canary view of every route that has one, in the routes' order."""
    data = _admin_call(args, "GET", "/api/v1/routes")
    routes = data.get("routes") if isinstance(data, dict) else None
    if not isinstance(routes, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) for r in routes
    ):
        raise _not_admin_api(args)
    return [_canary_view(args, r["name"]) for r in routes if r.get("canary")]


def _step_of(view: dict[str, Any]) -> str:
    """``k of n``, or ``- of n`` before the first step."""
    n = len(view.get("steps") or ())
    step = view.get("step", -1)
    return f"{step + 1} of {n}" if isinstance(step, int) and step >= 0 else f"- of {n}"


def _canary_line(view: dict[str, Any]) -> str:
    """A canary in one line: what the commands print, and the piped ``--watch``."""
    line = f"{view['route']}: {view['state']}, step {_step_of(view)}, weight {view['weight']:g}"
    return line + (f" ({view['reason']})" if view.get("reason") else "")


def _pct(value: Any, signed: bool = False) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:+.2%}" if signed else f"{value:.2%}"


def _clock(at: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) else "-"


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    value = max(0.0, float(value))
    if value < 60:
        return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes}m{rest:02d}s"


def _variant_cell(counts: Any) -> str:
    """``requests, failed, failure rate [its confidence bounds]``."""
    if not isinstance(counts, dict):
        return "-"
    requests, failures = counts.get("requests", 0), counts.get("failures", 0)
    if not requests:
        return "0"
    low, high = (counts.get("failure_rate_bounds") or [None, None])[:2]
    rate = counts.get("failure_rate")
    return f"{requests}, {failures} failed, {_pct(rate)} [{_pct(low)}, {_pct(high)}]"


def _canary_table(views: list[dict[str, Any]]) -> Text:
    """One line per canary: the bare ``canary status``."""
    from rich.text import Text

    text = Text()
    text.append(f"{'ROUTE':<20} {'STATE':<19} {'STEP':<9} {'WEIGHT':>7}  REASON", style="bold")
    if not views:
        text.append("\n(no route has a canary)", style="dim")
    for view in views:
        state = str(view["state"])
        text.append(f"\n{view['route']:<20} ")
        text.append(f"{state:<19}", style=_STATE_STYLES.get(state, ""))
        text.append(f" {_step_of(view):<9} {view['weight']:>7.4g}  {view.get('reason') or '-'}")
    return text


def _canary_detail(view: dict[str, Any]) -> Text:
    """A canary in full: where it is, what it has counted, what it last decided and why,
    and what it did before."""
    from rich.text import Text

    text = Text()
    state = str(view["state"])
    text.append(f"{view['route']}  ", style="bold")
    text.append(state, style=_STATE_STYLES.get(state, ""))
    text.append(f"  step {_step_of(view)}  weight {view['weight']:g}")
    if view.get("reason"):
        text.append(f"  ({view['reason']})")

    steps = [float(w) for w in view.get("steps") or ()]
    step = view.get("step", -1)
    text.append("\n  steps        ")
    for i, weight in enumerate(steps):
        if i:
            text.append(" > ", style="dim")
        text.append(f"[{weight:g}]" if i == step else f"{weight:g}", "bold" if i == step else "")
    interval = (view.get("config") or {}).get("step_interval_seconds")
    if view.get("step_elapsed") is not None:
        text.append(f"   this step {_seconds(view['step_elapsed'])}")
        if isinstance(interval, int | float):
            text.append(f" (lasts at least {_seconds(interval)})")
    if view.get("canary_id"):
        text.append(
            f"\n  canary       {view['canary_id']} of challenger {view.get('challenger') or '-'},"
            f" started {_clock(view.get('started_at'))}"
        )
    if state in ("progressing", "holding"):
        due = view.get("next_evaluation_in")
        if due is not None:
            text.append(f"\n  next         evaluation in {_seconds(due)}")
        else:
            text.append(f"\n  next         evaluated by the leader {view.get('leader') or '-'}")

    counts = view.get("counts") or {}
    text.append(f"\n\n  {'requests':<14} {'champion':<40} challenger", style="bold")
    for label, key in (("this step", "step"), ("whole canary", "canary")):
        pair = counts.get(key) or {}
        champion = _variant_cell(pair.get("champion"))
        text.append(f"\n  {label:<14} {champion:<40} {_variant_cell(pair.get('challenger'))}")
    shadow = counts.get("shadow") or {}
    if shadow.get("compared") or shadow.get("noise_compared"):
        text.append(
            f"\n  {'shadow':<14} {shadow.get('mismatched', 0)} of {shadow.get('compared', 0)}"
            " compared answers disagree"
        )
        if shadow.get("noise_compared"):
            text.append(
                f"; the champion with itself {shadow.get('noise_mismatched', 0)} of "
                f"{shadow['noise_compared']}"
            )

    decision = view.get("last_decision")
    text.append("\n\n  last decision", style="bold")
    if not isinstance(decision, dict):
        text.append("  none yet")
    else:
        text.append(f"  {_clock(decision.get('at'))}  {decision.get('action')}")
        text.append(f" ({decision.get('reason')}): {decision.get('message', '')}")
        for check in decision.get("checks") or ():
            verdict = str(check.get("verdict"))
            name = str(check.get("name"))
            text.append("\n    ")
            text.append(f"{verdict:<12}", style=_VERDICT_STYLES.get(verdict, "dim"))
            text.append(
                f" {name:<16} estimate {_pct(check.get('estimate'), name == 'error_rate')}"
                f"  limit {_pct(check.get('limit'))}"
                f"  bound {_pct(check.get('bound'), name == 'error_rate')}"
            )
            text.append(f"\n    {'':<12} {check.get('detail', '')}", style="dim")

    history = list(view.get("history") or ())[-HISTORY_SHOWN:]
    if history:
        text.append(f"\n\n  history (last {len(history)})", style="bold")
    for entry in history:
        repeated = int(entry.get("count", 1))
        at = _clock(entry.get("last_at") if repeated > 1 else entry.get("at"))
        where = entry.get("step", -1)
        text.append(
            f"\n    {at}  {entry.get('action', ''):<9} {entry.get('reason', ''):<24}"
            f" step {where + 1 if isinstance(where, int) and where >= 0 else '-'}"
            f"  weight {entry.get('weight', 0):<5g} {entry.get('message', '')}"
            + (f"  (x{repeated})" if repeated > 1 else "")
        )
    return text


def _console(*, live: bool = False) -> Console:
    from rich.console import Console

    # soft_wrap: long lines (a check's detail) are printed whole, for the terminal to wrap
    # or to pass through a pipe unbroken. A live view redraws in place: it wraps its
    # lines itself, as it would crop them at the terminal's width otherwise.
    return Console(soft_wrap=not live, highlight=False)


def cmd_canary_status(args: argparse.Namespace) -> int:
    def fetch() -> Any:
        return _canary_view(args, args.route) if args.route else _canary_views(args)

    def render(data: Any) -> Text:
        return _canary_detail(data) if args.route else _canary_table(data)

    if args.watch:
        return _watch(args, fetch, render)
    data = fetch()
    if args.json:
        print(json.dumps(data if args.route else {"canaries": data}, indent=2))
    else:
        _console().print(render(data))
    return 0


def _watch(
    args: argparse.Namespace, fetch: Callable[[], Any], render: Callable[[Any], Text]
) -> int:
    """Refresh every second until Ctrl-C. In a terminal, a live view of what ``status``
    shows; piped, a line whenever a canary's state, step, weight or reason changes (with
    ``--json``, a JSON document per refresh). A failing admin API is shown and retried;
    only the first call's failure ends the command."""
    refresh = _Refresh(fetch)
    data = fetch()  # a wrong URL or route fails at once, not in a loop
    console = _console(live=True)
    try:
        if args.json:
            while True:
                print(json.dumps(data if args.route else {"canaries": data}), flush=True)
                data = refresh.after(data)
        elif console.is_terminal:
            _watch_live(args, refresh, render, data, console)
        else:
            _watch_lines(refresh, data)
    except KeyboardInterrupt:
        pass
    return 0


class _Refresh:
    """The watch's next data, a second after the last. When the admin API fails, the last
    data again, with ``problem`` saying why (shown on stderr when piped, once until it
    changes)."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self.fetch = fetch
        self.problem = ""

    def after(self, last: Any, *, report: bool = True) -> Any:
        time.sleep(WATCH_SECONDS)
        try:
            data = self.fetch()
        except AdminError as error:
            if report and str(error) != self.problem:
                print(f"{error} (retrying)", file=sys.stderr, flush=True)
            self.problem = str(error)
            return last
        self.problem = ""
        return data


def _watch_lines(refresh: _Refresh, data: Any) -> None:
    shown: dict[str, str] = {}
    while True:
        for view in data if isinstance(data, list) else [data]:
            line = _canary_line(view)
            if shown.get(view["route"]) != line:
                shown[view["route"]] = line
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
        data = refresh.after(data)


def _watch_live(
    args: argparse.Namespace,
    refresh: _Refresh,
    render: Callable[[Any], Text],
    data: Any,
    console: Console,
) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    what = f"the canary of {args.route}" if args.route else "canaries"

    def screen(data: Any) -> RenderableType:
        header = Text(
            f"gateway: {what} at {args.admin}, every {WATCH_SECONDS:g}s "
            f"(Ctrl-C to stop)  {time.strftime('%H:%M:%S')}",
            style="dim",
        )
        if refresh.problem:
            header.append(f"\n{refresh.problem} (retrying)", style="bold red")
        return Group(header, Text(""), render(data))

    with Live(
        screen(data), console=console, auto_refresh=False, vertical_overflow="visible"
    ) as live:
        while True:
            data = refresh.after(data, report=False)
            live.update(screen(data), refresh=True)


def cmd_canary_command(args: argparse.Namespace) -> int:
    path = f"/api/v1/routes/{urllib.parse.quote(args.route, safe='')}/canary/{args.action}"
    print(_canary_line(_checked_view(args, _admin_call(args, "POST", path))))
    return 0


# --- gateway models ------------------------------------------------------------------------


def _models_path(*parts: str) -> str:
    return "/api/v1/models" + "".join("/" + urllib.parse.quote(p, safe="") for p in parts)


def _actor() -> str:
    return os.environ.get("GATEWAY_ACTOR") or os.environ.get("USER") or "cli"


def _version_arg(text: str) -> str:
    """A version number as given on the command line (checked here: exit 1, one line)."""
    # ASCII digits only: str.isdigit() is true of "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise AdminError(f"gateway: a version is a number from 1, got {text!r}")
    return str(int(text))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _when(at: Any) -> str:
    if not isinstance(at, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _aliases_text(aliases: Any) -> str:
    if not isinstance(aliases, dict) or not aliases:
        return "-"
    return " ".join(f"{a}={v}" for a, v in sorted(aliases.items()))


def _served_by(version: dict[str, Any]) -> str:
    if version.get("backend"):
        return f"backend {version['backend']}"
    return ", ".join(version.get("endpoints") or ()) or "-"


def _model_answer(args: argparse.Namespace, data: Any, *keys: str) -> dict[str, Any]:
    if not isinstance(data, dict) or not all(k in data for k in keys):
        raise _not_admin_api(args)
    return data


def cmd_models_list(args: argparse.Namespace) -> int:
    data = _model_answer(args, _admin_call(args, "GET", _models_path()), "models")
    if args.json:
        _print_json(data)
        return 0
    print(f"{'MODEL':<24} {'VERSIONS':<10} {'LATEST':>6}  ALIASES")
    if not data["models"]:
        print("(no models registered: gateway models register MODEL --url URL)")
    for model in data["models"]:
        versions = model.get("versions") or []
        print(
            f"{model['name']:<24} {len(versions):<10} {model.get('latest') or '-':>6}  "
            f"{_aliases_text(model.get('aliases'))}"
        )
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    data = _model_answer(
        args, _admin_call(args, "GET", _models_path(args.model)), "name", "versions"
    )
    if args.json:
        _print_json(data)
        return 0
    aliases = data.get("aliases") or {}
    by_version: dict[int, list[str]] = {}
    for alias, number in aliases.items():
        by_version.setdefault(number, []).append(alias)
    print(f"{data['name']}: latest version {data.get('latest') or '-'}, "
          f"aliases {_aliases_text(aliases)}")  # fmt: skip
    print(f"\n{'VERSION':>7}  {'ALIASES':<22} {'TRACED AS':<20} {'REGISTERED':<19}  SERVED BY")
    for version in data["versions"]:
        number = version.get("version")
        named = ",".join(sorted(by_version.get(number, []))) or "-"
        print(
            f"{number:>7}  {named:<22} {version.get('trace_model') or '-':<20} "
            f"{_when(version.get('registered_at')):<19}  {_served_by(version)}"
        )
        if version.get("metadata"):
            meta = " ".join(f"{k}={v}" for k, v in sorted(version["metadata"].items()))
            print(f"{'':>9}metadata {meta}")
    for route in data.get("routes") or ():
        refs = ", ".join(f"{role} {name}" for role, name in route.items() if role != "route")
        print(f"\nroute {route['route']}: {refs}")
    return 0


def cmd_models_history(args: argparse.Namespace) -> int:
    data = _model_answer(
        args, _admin_call(args, "GET", _models_path(args.model, "history")), "history"
    )
    if args.json:
        _print_json(data)
        return 0
    print(f"{'#':>4}  {'TIME':<19}  {'ACTOR':<14} {'ACTION':<9} {'WHAT':<30} REASON")
    for event in data["history"]:
        action = event.get("action")
        if action == "alias":
            was = event.get("previous")
            what = f"@{event.get('alias')} -> {event.get('version')}" + (
                f" (was {was})" if was is not None else ""
            )
        elif action == "unalias":
            what = f"@{event.get('alias')} cleared (was {event.get('previous')})"
        else:
            what = f"version {event.get('version')}"
        print(
            f"{event.get('seq', ''):>4}  {_when(event.get('at')):<19}  "
            f"{event.get('actor', '')!s:<14} {action!s:<9} {what:<30} "
            f"{event.get('reason') or '-'}"
        )
    return 0


def _metadata(pairs: Sequence[str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AdminError(f"gateway: --meta takes KEY=VALUE, got {pair!r}")
        try:
            metadata[key] = json.loads(value)  # numbers and booleans as such
        except ValueError:
            metadata[key] = value
    return metadata


def cmd_models_register(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"actor": _actor(), "metadata": _metadata(args.meta or ())}
    if args.backend:
        body["backend"] = args.backend
    else:
        from pydantic import ValidationError

        from gateway.config import BackendConfig

        try:
            body["endpoints"] = BackendConfig(endpoints=args.url).urls
        except ValidationError as error:
            problem = error.errors()[0]["msg"].removeprefix("Value error, ")
            raise AdminError(f"gateway: --url {problem}") from None
    if args.version is not None:
        body["version"] = int(_version_arg(args.version))
    if args.trace_model:
        body["model"] = args.trace_model
    if args.reason:
        body["reason"] = args.reason
    data = _model_answer(
        args, _admin_call(args, "POST", _models_path(args.model, "versions"), body), "version"
    )
    if args.json:
        _print_json(data)
        return 0
    print(f"{data['model']}: version {data['version']} registered ({_served_by(data)})")
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"version": int(_version_arg(args.version)), "actor": _actor()}
    if args.expect is not None:
        body["expected_version"] = (
            None if args.expect == "none" else int(_version_arg(args.expect))
        )
    if args.reason:
        body["reason"] = args.reason
    path = _models_path(args.model, "aliases", args.alias)
    data = _model_answer(args, _admin_call(args, "PUT", path, body), "version")
    if args.json:
        _print_json(data)
        return 0
    was = data.get("previous")
    print(
        f"{args.model}@{args.alias} -> version {data['version']}"
        + (f" (was {was})" if was is not None else " (new alias)")
    )
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    before = _model_answer(
        args, _admin_call(args, "GET", _models_path(args.model)), "aliases"
    )["aliases"]
    body = {"actor": _actor(), **({"reason": args.reason} if args.reason else {})}
    data = _model_answer(
        args, _admin_call(args, "POST", _models_path(args.model, "promote"), body), "aliases"
    )
    if args.json:
        _print_json(data)
        return 0
    aliases = data["aliases"]
    print(
        f"{args.model}: champion -> version {aliases.get('champion')} "
        f"(previous: {aliases.get('previous', before.get('champion')) or '-'}); "
        "challenger cleared"
    )
    for route in data.get("routes") or ():
        print(f"route {route}: challenger weight 0")
    return 0


def cmd_models_delete(args: argparse.Namespace) -> int:
    version = _version_arg(args.version)
    body = {"actor": _actor(), **({"reason": args.reason} if args.reason else {})}
    data = _model_answer(
        args, _admin_call(args, "DELETE", _models_path(args.model, "versions", version), body),
        "deleted",
    )  # fmt: skip
    if args.json:
        _print_json(data)
        return 0
    print(f"{args.model}: version {version} deleted")
    return 0


def _models_parser(commands: Any) -> None:
    models = commands.add_parser(
        "models",
        help="the model version registry: versions, aliases, promotion",
        description="The model version registry of a running gateway (kept in its state "
        "store, shared by its replicas). Routes name registry versions as "
        "model:NAME@ALIAS (or model:NAME@VERSION) and follow alias moves within a second.",
    )
    verbs = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    def verb(name: str, help_text: str, description: str, func: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(
            name, help=help_text, description=description
        )
        parser.set_defaults(func=func)
        return parser

    def common(parser: argparse.ArgumentParser, *, reason: bool = False) -> None:
        if reason:
            parser.add_argument("--reason", help="why, for the model's history")
        parser.add_argument("--json", action="store_true", help="the admin API's JSON")
        _admin_options(parser)

    common(verb("list", "every model, its versions and aliases",
                "Every registered model: how many versions, the latest, its aliases.",
                cmd_models_list))  # fmt: skip
    show = verb("show", "a model's versions, aliases and the routes that use it",
                "A model's versions (where each is served, its metadata), its aliases and "
                "the routes that reference it.", cmd_models_show)  # fmt: skip
    show.add_argument("model", help="the model's name")
    common(show)
    register = verb(
        "register", "register a new version of a model",
        "Register a version: served by a backend of the gateway's config (--backend) or "
        "by URLs (--url, one or more). Versions are numbered from 1 on, unless --version "
        "says which; a version never changes once registered (registering the same again "
        "is fine, other content under its number is refused).", cmd_models_register,
    )  # fmt: skip
    register.add_argument("model", help="the model's name (A-Z a-z 0-9 _ . -)")
    served = register.add_mutually_exclusive_group(required=True)
    served.add_argument("--backend", metavar="NAME", help="a backend of the gateway's config")
    served.add_argument(
        "--url", nargs="+", action="extend", metavar="URL", help="where it is served"
    )
    register.add_argument("--version", metavar="N", help="its number (default: the next one)")
    register.add_argument(
        "--meta", nargs="+", action="extend", metavar="KEY=VALUE", help="free-form metadata"
    )
    register.add_argument(
        "--trace-model", metavar="NAME",
        help="the name its load is traced under (default: MODEL-vN)",
    )  # fmt: skip
    common(register, reason=True)
    alias = verb(
        "alias", "point an alias (champion, challenger, ...) at a version",
        "Point an alias at a version. Routes that reference model:MODEL@ALIAS send new "
        "requests there within a second, on every replica. With --expect the move "
        "happens only if the alias still points where you expect.", cmd_models_alias,
    )  # fmt: skip
    alias.add_argument("model", help="the model's name")
    alias.add_argument("alias", help="the alias (latest is not one: it is always the highest)")
    alias.add_argument("version", help="the version it points at from now on")
    alias.add_argument(
        "--expect", metavar="VERSION",
        help="refuse unless the alias points at VERSION now ('none': is not set)",
    )  # fmt: skip
    common(alias, reason=True)
    promote = verb(
        "promote", "make the challenger the champion",
        "Promote a model's challenger: previous := the champion's version, champion := "
        "the challenger's, challenger cleared; routes that serve the model by these "
        "aliases send the challenger no traffic (weight 0). A running canary on such a "
        "route ends as promoted. Undo it with gateway canary rollback ROUTE.",
        cmd_models_promote,
    )  # fmt: skip
    promote.add_argument("model", help="the model's name")
    common(promote, reason=True)
    delete = verb(
        "delete", "delete a version no alias points at",
        "Delete a version. Refused while an alias points at it: move the alias first.",
        cmd_models_delete,
    )  # fmt: skip
    delete.add_argument("model", help="the model's name")
    delete.add_argument("version", help="the version's number")
    common(delete, reason=True)
    history = verb(
        "history", "every registration, alias move and deletion, in order",
        "A model's history: every registration, alias move and deletion, with its time, "
        "actor and reason.", cmd_models_history,
    )  # fmt: skip
    history.add_argument("model", help="the model's name")
    common(history)


# --- arguments -----------------------------------------------------------------------------

DESCRIPTION = (
    "A gateway for model servers: champion/challenger split, shadow comparison, canaries. "
    "run and check take a config file; status, weight, canary and models talk to a running "
    "gateway's admin API; demo starts a gateway in front of two built-in model servers."
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _number(text: str, kind: Callable[[str], float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def port_number(text: str) -> int:
    """A TCP port: 1-65535, or 0 for a free one the system chooses."""
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"a port is from 1 to 65535 (0: any free port), got {value}"
        )
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def non_negative(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _demo_problem(args: argparse.Namespace) -> str | None:
    if args.port and args.port == args.admin_port:
        return f"--port and --admin-port are both {args.port}: give them different ports"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=DESCRIPTION)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
        help="how much the gateway logs (env GATEWAY_LOG_LEVEL; default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway with a config file. SIGTERM (or Ctrl-C) drains "
        "in-flight requests for up to server.drain_timeout_seconds, then exits 0.",
    )
    run.add_argument("-c", "--config", required=True, help="the YAML config file")
    run.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker processes on the same ports (default: server.workers, 1)",
    )
    # Set by the supervisor of --workers: its PID, so that a worker it started stops
    # when it is gone.
    run.add_argument("--worker", type=int, metavar="SUPERVISOR_PID", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check",
        help="validate a config file",
        description="Validate a config file without starting anything: exit 0 and a summary "
        "if it is good, exit 1 and one line per problem if not.",
    )
    check.add_argument("-c", "--config", required=True, help="the YAML config file")
    check.set_defaults(func=cmd_check)

    demo = commands.add_parser(
        "demo",
        help="two built-in model servers behind a gateway, with a canary running",
        description="Start two built-in model servers (a champion and a challenger) behind a "
        "gateway on loopback, send it built-in load and start a canary on the route "
        "'sentiment'; the admin port serves the status page and the admin API. Ctrl-C stops "
        "it all.",
    )
    demo.add_argument(
        "--port", type=port_number, default=8080, help="the gateway's port (default 8080)"
    )
    demo.add_argument(
        "--admin-port",
        type=port_number,
        default=9090,
        help="the admin API's and status page's port (default 9090)",
    )
    demo.add_argument(
        "--weight",
        type=fraction,
        default=0.2,
        help="the chat route's challenger weight, 0 to 1 (default 0.2; the sentiment "
        "route's canary sets its own)",
    )
    demo.add_argument(
        "--error-rate",
        type=fraction,
        default=0.0,
        help="the challenger's share of 500 answers, 0 to 1 (default 0; 0.2 gets its "
        "canary rolled back)",
    )
    demo.add_argument(
        "--load",
        type=non_negative,
        default=50.0,
        metavar="PER_SECOND",
        help="built-in requests per second to the sentiment route, for its canary "
        "(default 50; 0: none)",
    )
    demo.set_defaults(func=cmd_demo, problem=_demo_problem, subparser=demo)

    status_cmd = commands.add_parser(
        "status",
        help="show routes and weights",
        description="Show every route of a running gateway: champion, challenger, weight "
        "and split key.",
    )
    status_cmd.add_argument("--json", action="store_true", help="the admin API's JSON")
    _admin_options(status_cmd)
    status_cmd.set_defaults(func=cmd_status)
    weight = commands.add_parser(
        "weight",
        help="set a route's challenger weight",
        description="Set a route's challenger weight on a running gateway (kept in its "
        "state store; 0 also ends a running canary).",
    )
    weight.add_argument("route", help="the route's name")
    weight.add_argument("weight", type=float, help="the challenger's share of traffic, 0 to 1")
    _admin_options(weight)
    weight.set_defaults(func=cmd_weight)

    canary = commands.add_parser(
        "canary",
        help="watch and steer routes' canaries",
        description="Watch and steer the canaries of a running gateway.",
    )
    verbs = canary.add_subparsers(dest="canary_command", required=True, metavar="COMMAND")
    status = verbs.add_parser(
        "status",
        help="every canary in a line, or one route's canary in full",
        description="Every canary in a line, or one route's canary in full: counts, "
        "bounds, decisions.",
    )
    status.add_argument("route", nargs="?", help="show this route's canary in full")
    status.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    status.add_argument("--json", action="store_true", help="the admin API's JSON")
    _admin_options(status)
    status.set_defaults(func=cmd_canary_status)
    for action, help_text in (
        ("start", "start a canary at its first step"),
        ("pause", "stop evaluating; the weight stays"),
        ("resume", "evaluate again; the step starts over"),
        ("promote", "make the challenger the champion"),
        ("rollback", "send no more traffic to the challenger"),
    ):
        verb = verbs.add_parser(
            action, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
        )
        verb.add_argument("route", help="the route's name")
        _admin_options(verb)
        verb.set_defaults(func=cmd_canary_command, action=action)
    _models_parser(commands)
    return parser


def _admin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        default=os.environ.get("GATEWAY_ADMIN_URL", DEFAULT_ADMIN),
        help="the admin API's base URL (env GATEWAY_ADMIN_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("GATEWAY_ADMIN_TOKEN", ""),
        help="the admin API's bearer token (env GATEWAY_ADMIN_TOKEN)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = getattr(args, "problem", None)
    if problem is not None and (message := problem(args)):
        args.subparser.error(message)  # exits 2, as argparse does for its own checks
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
