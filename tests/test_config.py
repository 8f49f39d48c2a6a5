"""Config loading: ``gateway check`` on shipped and broken files, ``${VAR}`` expansion,
and error messages that name the key path and the bad value (DESIGN section 2)."""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.cli import build_parser
from gateway.config import (
    ConfigError,
    _loc_to_path,
    expand_env,
    load,
    loads,
    parse,
)
from gateway.metrics import Metrics
from gateway.runtime import Runtime
from tests.cli_support import ROOT, CliResult, run_cli_sync

BROKEN_DIR = Path(__file__).resolve().parent / "broken_configs"
BROKEN = sorted(BROKEN_DIR.glob("*.yaml"))
SHIPPED = sorted((ROOT / "config").glob("*.yaml"))
MISSING_FILE = BROKEN_DIR / "no-such-file.yaml"


def expectation(path: Path) -> tuple[str, str]:
    """The ``# key:`` and ``# value:`` a broken config's header says its error names."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        for field in ("key", "value"):
            prefix = f"# {field}: "
            if line.startswith(prefix):
                found[field] = line.removeprefix(prefix).strip()
    assert set(found) == {"key", "value"}, f"{path.name} needs '# key:' and '# value:' lines"
    return found["key"], found["value"]


# One file per kind of mistake the issue lists runs `gateway check` as a real subprocess
# (exit code and no traceback from a fresh interpreter). The other broken files run the
# same command in-process: the same code and messages, without 0.2 s of start-up each.
SUBPROCESS_CASES = frozenset(
    {
        "missing_backend",
        "duplicate_route_names",
        "weight_above_one",
        "admin_public_without_token",
        "unknown_key",
        "yaml_syntax_error",
        "unset_variable",
        "bad_url_no_scheme",
        "bad_url_port",
        "bad_split_key",
        "challenger_is_champion",
        "weight_without_challenger",
    }
)


@pytest.fixture(scope="module")
def check_results() -> dict[Path, CliResult]:
    """``gateway check -c`` as a subprocess on each file that needs one, in parallel."""
    paths = [*SHIPPED, *(p for p in BROKEN if p.stem in SUBPROCESS_CASES), MISSING_FILE]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {p: pool.submit(run_cli_sync, "check", "-c", str(p)) for p in paths}
        return {p: f.result() for p, f in futures.items()}


def check_in_process(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> CliResult:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    args = build_parser().parse_args(["check", "-c", str(path)])
    code = args.func(args)
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def problem_lines(result: CliResult) -> list[str]:
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


# --- gateway check -------------------------------------------------------


def test_there_are_shipped_and_enough_broken_configs() -> None:
    assert SHIPPED, "config/*.yaml is empty"
    assert len(BROKEN) >= 8
    for path in BROKEN:
        expectation(path)
    assert {p.stem for p in BROKEN} >= SUBPROCESS_CASES
    assert len(SUBPROCESS_CASES) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_accepts_shipped_config(path: Path, check_results: dict[Path, CliResult]) -> None:
    result = check_results[path]
    assert result.returncode == 0, result.describe()
    assert f"{path}: ok" in result.stdout
    assert "Traceback" not in result.output


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_check_rejects_broken_config(path: Path, request: pytest.FixtureRequest) -> None:
    key, value = expectation(path)
    if path.stem in SUBPROCESS_CASES:
        result = request.getfixturevalue("check_results")[path]
    else:
        result = check_in_process(
            path, request.getfixturevalue("capsys"), request.getfixturevalue("monkeypatch")
        )
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.output, result.describe()
    assert str(path) in result.stderr
    naming_key = [p for p in problem_lines(result) if p.startswith(f"{key}: ")]
    assert naming_key, f"no problem starts with {key!r}:\n{result.describe()}"
    assert any(value.casefold() in p.casefold() for p in naming_key), result.describe()


def test_check_on_missing_file(check_results: dict[Path, CliResult]) -> None:
    result = check_results[MISSING_FILE]
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.output
    assert problem_lines(result) == ["<file>: cannot read: No such file or directory"]


# --- in-process: shipped configs -----------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_builds(path: Path) -> None:
    config = load(path, environ={})
    routes = Runtime.build(config, Metrics()).routes
    assert set(routes) == {r.name for r in config.routes}


@pytest.mark.parametrize(
    ("environ", "token"),
    [({}, ""), ({"GATEWAY_ADMIN_TOKEN": ""}, ""), ({"GATEWAY_ADMIN_TOKEN": "s3cret"}, "s3cret")],
)
def test_shipped_admin_token_comes_from_environment(environ: dict[str, str], token: str) -> None:
    assert load(ROOT / "config" / "gateway.yaml", environ=environ).admin.token == token


# --- ${VAR} expansion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "expanded"),
    [
        ("${V}", {"V": "v"}, "v"),
        ("${V}", {"V": ""}, ""),  # set but empty, no default: empty, as in the shell
        ("${V:-d}", {}, "d"),
        ("${V:-d}", {"V": ""}, "d"),  # ":-" also covers set-but-empty, as in the shell
        ("${V:-d}", {"V": "v"}, "v"),
        ("${V:-}", {}, ""),
        ("${V:-a b: c # d}", {}, "a b: c # d"),
        ("http://${H}:${P:-80}/v1", {"H": "model"}, "http://model:80/v1"),
        ("${A}${B:-b}${A}", {"A": "a"}, "aba"),
        # Not references: left alone, never an error.
        ("$V pa$$word $ {V}", {"V": "x"}, "$V pa$$word $ {V}"),
        # An expanded value is not expanded again (a secret may contain "${").
        ("${V}", {"V": "${W}"}, "${W}"),
    ],
)
def test_expand_string(text: str, environ: dict[str, str], expanded: str) -> None:
    assert expand_env({"k": text}, environ) == {"k": expanded}


def test_expand_walks_values_not_keys_nor_other_types() -> None:
    document = {
        "${K}": "${K}",
        "list": ["${K}", ["${K:-x}"], {"deep": "${K}"}],
        "int": 5,
        "bool": True,
        "none": None,
    }
    assert expand_env(document, {"K": "k"}) == {
        "${K}": "k",
        "list": ["k", ["k"], {"deep": "k"}],
        "int": 5,
        "bool": True,
        "none": None,
    }


def test_expanded_strings_are_converted_to_field_types() -> None:
    text = """
server: {port: "${PORT}"}
backends:
  a: {url: "http://127.0.0.1:${A_PORT:-8001}", timeout_seconds: "${TIMEOUT:-2.5}"}
  b: {url: "http://127.0.0.1:8002"}
routes:
  - name: r
    match: {path_prefix: /}
    champion: a
    challenger: b
    split: {challenger_weight: "${W:-0.25}", allow_override: "${OVERRIDE:-false}",
            salt: "${SALT}"}
"""
    config = loads(text, environ={"PORT": "8123", "OVERRIDE": "true", "SALT": "x: y # z"})
    assert config.server.port == 8123
    assert config.backends["a"].url == "http://127.0.0.1:8001"
    assert config.backends["a"].timeout_seconds == 2.5
    split = config.routes[0].split
    assert split.challenger_weight == 0.25
    assert split.allow_override is True
    # Expansion happens after YAML parsing: ":" and "#" in a value cannot change structure.
    assert split.salt == "x: y # z"


def test_parse_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_SALT", "from-env")
    document = base_document()
    document["routes"][0]["split"] = {"salt": "${GATEWAY_TEST_SALT}"}
    assert parse(document).routes[0].split.salt == "from-env"


@pytest.mark.parametrize(
    ("node", "where"),
    [
        ("${NOPE}", "<root>"),
        (["ok", "${NOPE}"], "[1]"),
        ({"routes": [{}, {"match": {"path_prefix": "/${NOPE}"}}]}, "routes[1].match.path_prefix"),
        ({"a": [[{"b": ["x", "${NOPE:-}", "${NOPE}"]}]]}, "a[0][0].b[2]"),
    ],
)
def test_unset_variable_error_names_the_path(node: Any, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand_env(node, {})
    assert info.value.problems == [
        f"{where}: environment variable NOPE is not set and has no default "
        "(write ${NOPE:-default})"
    ]


# --- error messages ------------------------------------------------------------------------


def base_document() -> dict[str, Any]:
    return {
        "backends": {"a": {"url": "http://127.0.0.1:8001"}, "b": {"url": "http://127.0.0.1:8002"}},
        "routes": [
            {"name": "r", "match": {"path_prefix": "/"}, "champion": "a", "challenger": "b"}
        ],
    }


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(document, environ={})
    return info.value.problems


def with_change(path: str, value: Any) -> dict[str, Any]:
    """``base_document()`` with one dotted path (list indexes as numbers) set to ``value``."""
    document = copy.deepcopy(base_document())
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[last] = value
    return document


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (
            "routes.0.split",
            {"challenger_weight": 1.5},
            "routes[0].split.challenger_weight: must be between 0 and 1, got 1.5",
        ),
        (
            "routes.0.split",
            {"challenger_weight": "lots"},
            "routes[0].split.challenger_weight: input should be a valid number, "
            "unable to parse string as a number, got 'lots'",
        ),
        ("routes.0.split", {"weight": 0.1}, "routes[0].split.weight: unknown key"),
        (
            "server",
            {"port": 70000},
            "server.port: input should be less than or equal to 65535, got 70000",
        ),
        (
            "admin",
            {"host": "0.0.0.0"},
            "admin.host: an admin listener on a non-loopback address needs admin.token, "
            "got host '0.0.0.0' and no token",
        ),
        (
            "backends.b",
            {"endpoints": ["http://127.0.0.1:8002", 8003]},
            "backends.b.endpoints[1]: input should be a valid string, got 8003",
        ),
        (
            "routes.0.match",
            {"path_prefix": "/", "header": {"name": "X-Tenant"}},
            "routes[0].match.header.value: required key is missing",
        ),
    ],
)
def test_problem_message(path: str, value: Any, problem: str) -> None:
    assert problems_of(with_change(path, value)) == [problem]


def test_every_problem_is_reported_at_once() -> None:
    document = with_change("routes.0.split", {"challenger_weight": 2, "key": "nope"})
    document["backends"]["a"]["timeout_seconds"] = 0
    document["surprise"] = 1
    assert sorted(problems_of(document)) == [
        "backends.a.timeout_seconds: input should be greater than 0, got 0",
        "routes[0].split.challenger_weight: must be between 0 and 1, got 2.0",
        "routes[0].split.key: must be request_id, header:NAME, cookie:NAME or query:NAME, "
        "got 'nope'",
        "surprise: unknown key",
    ]


def test_semantic_problems_after_the_schema_passes() -> None:
    document = base_document()
    document["routes"].append({**document["routes"][0], "champion": "zz"})
    assert problems_of(document) == [
        "routes[1].name: duplicate route name 'r' (also routes[0])",
        "routes[1].champion: unknown backend 'zz' (known: a, b)",
        "routes[1].match: same match as routes[0], so this route could never be chosen",
    ]


def test_config_error_text_carries_source_and_all_problems() -> None:
    with pytest.raises(ConfigError) as info:
        loads("backends: {}\nroutes: 5\nextra: 1\n", environ={}, source="g.yaml")
    assert info.value.source == "g.yaml"
    assert str(info.value) == "g.yaml: " + "; ".join(info.value.problems)
    assert sorted(info.value.problems) == [
        "extra: unknown key",
        "routes: input should be a valid list, got 5",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("backends: {a: [1\n", "<yaml>: line 2, column 1: "),
        ("routes:\n  - name: r\n   champion: a\n", "<yaml>: line 3, column 4: "),
        ("", "<root>: must be a mapping"),
        ("- a\n- b\n", "<root>: must be a mapping"),
    ],
)
def test_unusable_documents(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text, environ={})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem), info.value.problems


@pytest.mark.parametrize(
    ("host", "token"),
    [("127.0.0.1", ""), ("127.0.0.2", ""), ("::1", ""), ("localhost", ""), ("0.0.0.0", "t")],
)
def test_admin_listener_off_loopback_needs_only_a_token(host: str, token: str) -> None:
    document = base_document()
    document["admin"] = {"host": host, "token": token}
    assert parse(document, environ={}).admin.host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gateway.internal"])
def test_admin_listener_off_loopback_without_token(host: str) -> None:
    document = base_document()
    document["admin"] = {"host": host, "token": "${GATEWAY_TEST_TOKEN:-}"}
    assert problems_of(document) == [
        "admin.host: an admin listener on a non-loopback address needs admin.token, "
        f"got host {host!r} and no token"
    ]


def test_pattern_in_message_keeps_its_case() -> None:
    # The route name pattern is [A-Za-z0-9_.-]; a message telling the operator
    # '^[a-za-z0-9_.-]+$' describes a different rule.
    problems = problems_of(with_change("routes.0.name", "my route"))
    assert len(problems) == 1
    assert problems[0].startswith("routes[0].name: ")
    assert "'my route'" in problems[0]
    assert "^[A-Za-z0-9_.-]+$" in problems[0], problems[0]


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        ((), ""),
        (("server",), "server"),
        (("routes", 0, "split", "challenger_weight"), "routes[0].split.challenger_weight"),
        (("backends", "sentiment-v2", "endpoints", 1), "backends.sentiment-v2.endpoints[1]"),
        (("a", 0, 1, "b", 2), "a[0][1].b[2]"),
        ((0, "x"), "[0].x"),
    ],
)
def test_loc_to_path(loc: tuple[int | str, ...], path: str) -> None:
    assert _loc_to_path(loc) == path


def test_load_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load(MISSING_FILE, environ={})
    assert info.value.source == str(MISSING_FILE)
    assert info.value.problems == ["<file>: cannot read: No such file or directory"]


def test_weight_too_small_for_one_bucket_without_challenger_is_consistent() -> None:
    # check must not accept a file that the gateway then refuses to build.
    document = with_change("routes.0.challenger", None)
    document["routes"][0]["split"] = {"challenger_weight": 0.00001}
    try:
        config = parse(document, environ={})
    except ConfigError:
        return
    Gateway(config)  # builds its routes and applies their weights


@pytest.mark.parametrize("text", ["${V", "${}", "${1X}", "${A:-${B}}", "${VAR-x}", "a ${V b"])
def test_malformed_references_are_errors_not_literals(text: str) -> None:
    # A typo in a reference must not silently become part of a URL or a token.
    with pytest.raises(ConfigError, match=r"k: cannot expand"):
        expand_env({"k": text}, {"V": "v", "A": "a", "B": "b", "VAR": "x"})
