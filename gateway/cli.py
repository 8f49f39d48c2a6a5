"""The ``gateway`` command: run | check | demo | status | weight."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway.config import ConfigError, load

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
    print(f"{args.config}: ok ({len(config.backends)} backends, {len(config.routes)} routes)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway

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
    except OSError as error:
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        run_async(run_demo(args.port, args.admin_port, args.weight, args.error_rate))
    except OSError as error:
        print(f"gateway demo: cannot start: {error} (try --port/--admin-port)", file=sys.stderr)
        return 1
    return 0


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
        raise SystemExit(f"gateway: {url} did not answer like the gateway's admin API") from None
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = error.reason
        raise SystemExit(f"gateway: {method} {url}: {error.code} {detail}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SystemExit(f"gateway: cannot reach the admin API at {url}: {reason}") from None
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    data = _admin_call(args, "GET", "/api/v1/routes")
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
        raise SystemExit(f"gateway: {args.admin} did not answer like the gateway's admin API")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{'ROUTE':<20} {'CHAMPION':<20} {'CHALLENGER':<20} {'WEIGHT':>7}  SPLIT KEY")
    for route in data["routes"]:
        print(
            f"{route['name']:<20} {route['champion']:<20} {route['challenger'] or '-':<20} "
            f"{route['challenger_weight']:>7.4g}  {route['split']['key']}"
        )
    return 0


def cmd_weight(args: argparse.Namespace) -> int:
    route = _admin_call(
        args, "PUT", f"/api/v1/routes/{args.route}/weight", {"challenger_weight": args.weight}
    )
    if not isinstance(route, dict) or "challenger_weight" not in route:
        raise SystemExit(f"gateway: {args.admin} did not answer like the gateway's admin API")
    print(f"{route['name']}: challenger weight {route['challenger_weight']:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: server.workers)"
    )
    # Set by the supervisor of --workers: its PID, so that a worker it started stops
    # when it is gone.
    run.add_argument("--worker", type=int, metavar="SUPERVISOR_PID", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)

    demo = commands.add_parser("demo", help="two built-in model servers behind a gateway")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--weight", type=float, default=0.2, help="challenger weight")
    demo.add_argument("--error-rate", type=float, default=0.0, help="challenger's share of 500s")
    demo.set_defaults(func=cmd_demo)

    for name, func, help_text in (
        ("status", cmd_status, "show routes and weights"),
        ("weight", cmd_weight, "set a route's challenger weight"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--admin", default=os.environ.get("GATEWAY_ADMIN_URL", DEFAULT_ADMIN))
        sub.add_argument("--token", default=os.environ.get("GATEWAY_ADMIN_TOKEN", ""))
        if name == "weight":
            sub.add_argument("route")
            sub.add_argument("weight", type=float)
        else:
            sub.add_argument("--json", action="store_true")
        sub.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
