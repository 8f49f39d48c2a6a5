"""Config files that used to pass ``check`` and then fail, or hang the loader, or crash a
reload: each is now a config error with its key path, from ``check``, ``run`` and
``POST /api/v1/reload`` alike, never a traceback. (``tests/broken_configs`` holds one
file per kind for ``gateway check``; ``test_config_property.py`` the generated ones.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import MAX_CONFIG_BYTES, ConfigError, load, loads
from tests.cli_support import run_cli
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import named_app
from tests.support import admin_url, gateway_document, proxy_url

pytestmark = pytest.mark.timeout(60)

VALID = """
backends:
  one: {url: "http://127.0.0.1:9"}
routes:
  - {name: r, match: {path_prefix: /v1}, champion: one}
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        loads(text, environ=environ or {})
    return caught.value.problems


def test_a_literal_dollar_brace_is_written_twice() -> None:
    text = VALID.replace("champion: one}", 'champion: one, split: {salt: "$${USER}-${A}$${"}}')
    config = loads(text, environ={"A": "x", "USER": "nobody"})
    assert config.routes[0].split.salt == "${USER}-x${"
    text = VALID.replace("champion: one}", 'champion: one, split: {salt: "${UNSET:-$${no}}"}}')
    assert loads(text, environ={}).routes[0].split.salt == "${no}"


def test_keys_given_twice_are_errors_wherever_they_are() -> None:
    assert "duplicate key 'routes'" in problems(VALID + "routes: []\n")[0]
    nested = VALID.replace('{url: "http://127.0.0.1:9"}', '{url: "http://x:1", url: "http://y:1"}')
    assert "duplicate key 'url'" in problems(nested)[0]
    # A merge key's keys may be overridden: that is what it is for.
    merged = """
backends:
  one: &one {url: "http://127.0.0.1:9", timeout_seconds: 5, load_balancing: random}
  two: {<<: *one, timeout_seconds: 7}
routes:
  - {name: r, match: {path_prefix: /v1}, champion: one}
"""
    config = loads(merged, environ={})
    assert config.backends["two"].timeout_seconds == 7
    assert config.backends["two"].load_balancing == "random"
    assert "duplicate key" in problems(merged.replace("timeout_seconds: 7", "url: a, url: b"))[0]


def test_oversized_and_hostile_documents_are_refused_quickly(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="larger than"):
        load(huge)
    assert time.monotonic() - started < 1.0  # refused before reading it all
    laughs = "a: &a [" + ", ".join(["x"] * 10) + "]\n"
    for level in "bcdefghij":
        previous = chr(ord(level) - 1)
        laughs += f"{level}: &{level} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    started = time.monotonic()
    assert "values once aliases are expanded" in problems(laughs)[0]
    assert time.monotonic() - started < 5.0
    assert "nested more than" in problems("a: &a [*a]\n")[0]  # an alias inside itself
    deep = "a: " + "[" * 900 + "]" * 900 + "\n"
    assert "nested more than" in problems(deep)[0]


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(path)


@pytest.mark.parametrize(
    ("section", "value", "problem"),
    [
        ("server: {port: true}", None, "server.port: must be a number"),
        ("server: {workers: yes}", None, "server.workers: must be a number"),
        ("tracing: {interval_seconds: false}", None, "tracing.interval_seconds: must be a"),
        ("server: {drain_timeout_seconds: .inf}", None, "finite"),
        ("server: {idle_timeout_seconds: .nan}", None, "finite"),
        ("server: {header_timeout_seconds: 0.001}", None, "greater than or equal to 0.1"),
        ("server: {max_buffered_bytes: 10}", None, "at least max_body_bytes"),
        ('server: {request_id_header: "X-Id "}', None, "HTTP header name"),
        ('server: {request_id_header: "X-Id\\nX: 1"}', None, "HTTP header name"),
        ('admin: {token: "t\\r\\n"}', None, "control characters"),
        ('tracing: {redis_url: "redis://localhost/notanumber"}', None, "database number"),
        ('state: {backend: redis, redis_url: "http://x"}', None, "redis://"),
    ],
)
def test_values_that_would_fail_at_run_time_are_check_errors(
    section: str, value: Any, problem: str
) -> None:
    found = problems(VALID + section + "\n")
    assert any(problem in p for p in found), found


def test_values_inside_a_route_too() -> None:
    route = VALID.replace(
        "champion: one}",
        "champion: one, shadow: {target: one, sample_rate: 1, timeout_seconds: .inf}}",
    )
    assert any("shadow.timeout_seconds" in p and "finite" in p for p in problems(route))
    header = VALID.replace(
        "match: {path_prefix: /v1}", 'match: {path_prefix: /v1, header: {name: "a b", value: x}}'
    )
    assert any("match.header.name" in p for p in problems(header))
    key = VALID.replace("champion: one}", 'champion: one, split: {key: "header:X\\r\\nY"}}')
    assert any("split.key" in p for p in problems(key))


# --- reload and run -------------------------------------------------------------------

BAD_FILES: dict[str, bytes] = {
    "not UTF-8": VALID.encode() + b"# caf\xe9\n",
    "a date that is not one": (VALID + "x: 2024-13-45\n").encode(),
    "an alias inside itself": b"a: &a [*a]\n" + VALID.encode(),
    "a billion laughs": (
        b'a: &a ["l","l","l","l","l","l","l","l","l","l"]\n'
        + b"".join(
            f"{c}: &{c} [{', '.join([f'*{chr(ord(c) - 1)}'] * 10)}]\n".encode() for c in "bcdefghij"
        )
    ),
    "a key given twice": (VALID + "routes: []\n").encode(),
    "an endless canary": VALID.replace(
        "champion: one}", "champion: one, challenger: one, canary: {step_size: 1e-9}}"
    ).encode(),
    "a huge file": b"#" * (MAX_CONFIG_BYTES + 10),
}


async def test_reload_refuses_every_bad_file_with_a_400_and_no_traceback(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one = await start_app(named_app("one"))
    document = gateway_document(
        {"one": {"url": one}},
        [{"name": "r", "match": {"path_prefix": "/v1"}, "champion": "one"}],
        state={"path": str(tmp_path / "s.db")},
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    gateway = await start_gateway(document, config_path=path)
    caplog.set_level(logging.DEBUG)
    for kind, content in BAD_FILES.items():
        path.write_bytes(content)
        started = time.monotonic()
        async with http.post(admin_url(gateway, "/api/v1/reload")) as response:
            assert response.status == 400, kind
            error = (await response.json())["error"]
        assert time.monotonic() - started < 10, kind
        assert error["code"] == "bad_config" and error["problems"], kind
        assert all(":" in problem for problem in error["problems"]), kind  # "<key path>: ..."
        async with http.get(proxy_url(gateway, "/v1/x")) as response:
            assert response.status == 200, kind  # the running config stays
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def test_run_says_why_it_cannot_start_without_a_traceback(tmp_path: Path) -> None:
    """A state file that exists but is not a database passes check (it may be one by
    then) and cannot be opened: ``run`` says so and exits 1."""
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a SQLite database, whatever its name says" * 100)
    config = tmp_path / "gateway.yaml"
    document = yaml.safe_load(VALID)
    document["server"] = {"host": "127.0.0.1", "port": 0}
    document["admin"] = {"host": "127.0.0.1", "port": 0}
    document["state"] = {"path": str(state)}
    config.write_text(yaml.safe_dump(document))
    result = await run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.describe()
    result = await run_cli("run", "-c", str(config))
    assert result.returncode == 1, result.describe()
    assert "cannot start" in result.stderr and "state store" in result.stderr
    assert "Traceback" not in result.output, result.describe()
