"""Whatever ``gateway check`` accepts starts and serves; whatever it refuses, it refuses
with a message, never a traceback. Checked over generated configs (hypothesis).

Each example starts from a valid document and changes up to four keys to values drawn
from a pool of plausible, wrong-typed and hostile ones (infinities, NaN, booleans, CR/LF,
unnormalised paths, unusable URLs and state paths, huge numbers); about a quarter are
accepted. Every example goes through what ``check`` does (``loads``: YAML text in,
``ConfigError`` or a config out). Every accepted one is then started for real, as ``run``
starts it but in-process (about 0.1 s each, so all of them, not a sample): its state
store opened at the configured path (embedded, or Redis that is not there), trace
writer, listeners, timers and limits; and it answers a request sent through the first
route, with the config's limits and rewrites, to a live upstream. Listening ports and
hosts are the machine's business, not the file's (a port in use is not a config error):
the started copy binds loopback port 0, and the placeholder backend URL points at the
live upstream (other drawn URLs are kept, and answered 502).

CI runs ``GATEWAY_CONFIG_EXAMPLES`` (600 by default) examples: about 20 s.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from gateway.config import ConfigError, GatewayConfig, loads
from tests.helpers.apps import catch_all_app

EXAMPLES = int(os.environ.get("GATEWAY_CONFIG_EXAMPLES", "600"))
_TMP = Path(tempfile.mkdtemp(prefix="gw-config-property-"))
(_TMP / "a-file").write_text("not a directory")
UPSTREAM = "http://127.0.0.1:9"  # replaced by a live upstream when a config is started

BASE: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 8080},
    "admin": {"host": "127.0.0.1", "port": 9090},
    "state": {"backend": "embedded", "path": str(_TMP / "state.db")},
    "tracing": {"enabled": False},
    "backends": {
        "one": {"url": UPSTREAM},
        "two": {"endpoints": [UPSTREAM, UPSTREAM + "/base"]},
    },
    "routes": [
        {
            "name": "r",
            "match": {"path_prefix": "/v1/models/m"},
            "champion": "one",
            "challenger": "two",
        },
    ],
}

HOSTILE: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    0.5,
    1e-9,
    3.0,
    1e9,
    1e300,
    10**20,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    " ",
    "x",
    "8080",
    "yes",
    "1e3",
    "inf",
    "nan",
    "${HOME}",
    "${UNSET_VARIABLE}",
    "${UNSET_VARIABLE:-7}",
    "$${literal}",
    "a\r\nb",
    "é",
    "\x00",
    [],
    {},
    [1],
    {"a": 1},
]
SECONDS = [1e-9, 0.001, 0.1, 1, 2.5, "30", 600, 604800, 604801]
PATHS = [
    "/",
    "/v1",
    "/v1/",
    "/v1/models/m",
    "/v1/x/../y",
    "/v1/%7Ex",
    "/v1/%7ex",
    "v1",
    "/v1?x",
    "/a%2Fb",
    "/a b",
    "/..",
    "/v1/models/m:predict",
]
URLS = [
    UPSTREAM,
    UPSTREAM + "/prefix/",
    "https://127.0.0.1:1",
    "http://127.0.0.1:99999",
    "ftp://127.0.0.1:1",
    "http://",
    "127.0.0.1:1",
    "http://127.0.0.1:1?q=1",
]
REDIS = [
    "redis://127.0.0.1:9/0",
    "redis://127.0.0.1:abc/0",
    "redis://h/x",
    "unix:///nope",
    "rediss://127.0.0.1:9",
    "redis://127.0.0.1:9/0?protocol=9",
    "http://x",
]
STATE_PATHS = [
    str(_TMP / "s1.db"),
    str(_TMP / "new-dir" / "s.db"),
    ":memory:",
    str(_TMP),
    str(_TMP / "a-file" / "s.db"),
    "/dev/null/s.db",
    "",
]
HEADERS = ["X-Request-ID", "x-id", "X Id", "X-Id\r\n", "", "X-Id:", "Trace-Id"]

# Keys a mutation may set, with values likely for each (besides the hostile pool).
KEYS: dict[tuple[Any, ...], list[Any]] = {
    # Whole sections, so that settings that only work together come up together.
    ("state",): [
        {"backend": "redis", "redis_url": "redis://127.0.0.1:9/0"},
        {"backend": "redis", "redis_url": "unix:///nope", "key_prefix": "x"},
        {"backend": "embedded", "path": str(_TMP / "deeper" / "s.db")},
    ],
    ("tracing",): [
        {"enabled": True, "interval_seconds": 1},
        {"enabled": True, "redis_url": "redis://127.0.0.1:9/0"},
    ],
    ("admin",): [
        {"host": "127.0.0.1", "token": "t0ken", "metrics_auth": True},
        {"host": "0.0.0.0", "token": "t0ken"},
    ],
    ("server",): [
        {
            "header_timeout_seconds": 0.1,
            "idle_timeout_seconds": 0.1,
            "body_timeout_seconds": 0.1,
            "max_header_bytes": 1024,
            "max_connections": 1,
            "max_body_bytes": 64,
            "max_buffered_bytes": 64,
        }
    ],
    ("backends", "one"): [{"url": UPSTREAM + "/base", "path_prefix": "/v2", "model_name": "x"}],
    ("routes", 0, "match"): [
        {"path_prefix": "/v1/models/m", "model": "m"},
        {"path_prefix": "/", "header": {"name": "X-A", "value": ""}},
    ],
    ("server", "host"): ["127.0.0.1", "::1", "localhost", "0.0.0.0", "example.invalid"],
    ("server", "port"): [0, 8080, 65535, 65536, True],
    ("server", "max_body_bytes"): [1, 100, 10_000_000, 2**41],
    ("server", "request_id_header"): HEADERS,
    ("server", "header_timeout_seconds"): SECONDS,
    ("server", "idle_timeout_seconds"): SECONDS,
    ("server", "body_timeout_seconds"): SECONDS,
    ("server", "drain_timeout_seconds"): SECONDS,
    ("server", "max_header_bytes"): [1024, 4096, 65536, 1023, 2**21],
    ("server", "max_connections"): [1, 100, 10_000, 0, 10**7],
    ("server", "max_buffered_bytes"): [1, 10_000_000, 2**30],
    ("server", "workers"): [1, 2, 64, 65],
    ("admin", "host"): ["127.0.0.1", "localhost", "0.0.0.0"],
    ("admin", "token"): ["", "s3cret", " padded ", "a\nb"],
    ("admin", "metrics_auth"): [True, False],
    ("state", "backend"): ["embedded", "redis", "sqlite"],
    ("state", "path"): STATE_PATHS,
    ("state", "redis_url"): REDIS,
    ("tracing", "enabled"): [True, False],
    ("tracing", "interval_seconds"): [1, 10, 3600, 3601],
    ("tracing", "ttl_seconds"): [1, 600, 10**9],
    ("tracing", "redis_url"): REDIS,
    ("backends", "one", "url"): URLS,
    ("backends", "one", "timeout_seconds"): SECONDS,
    ("backends", "one", "connect_timeout_seconds"): SECONDS,
    ("backends", "one", "path_prefix"): PATHS,
    ("backends", "one", "model_name"): ["m-v2", "", "é"],
    ("backends", "one", "model"): ["m", ""],
    ("backends", "one", "max_connections"): [1, 1024, 0],
    ("backends", "one", "queue_timeout_seconds"): SECONDS,
    ("backends", "one", "outlier_detection"): [
        {"consecutive_failures": 1},
        {"base_ejection_seconds": 0.5},
        {"max_ejection_percent": 100},
        {"max_ejection_percent": 101},
    ],
    ("backends", "one", "health_check"): [
        {"path": "/health"},
        {"path": "health"},
        {"path": "/h", "interval_seconds": 0.1},
    ],
    ("backends", "two", "endpoints"): [[UPSTREAM], [], [UPSTREAM, "nope"]],
    ("backends", "two", "load_balancing"): ["round_robin", "random", "least_request", "x"],
    ("backends", "two", "path_prefix"): PATHS,
    ("backends", "two", "model_name"): ["m-v3"],
    ("routes", 0, "match", "path_prefix"): PATHS,
    ("routes", 0, "match", "model"): ["m", None],
    ("routes", 0, "match", "header"): [
        {"name": "X-Canary", "value": "1"},
        {"name": "X Canary", "value": "1"},
    ],
    ("routes", 0, "challenger"): ["two", "one", "three", None],
    ("routes", 0, "split", "challenger_weight"): [0, 0.1, 0.5, 1, 1.5, "0.2"],
    ("routes", 0, "split", "key"): [
        "request_id",
        "header:X-User",
        "cookie:uid",
        "query:user",
        "header:X User",
        "header:",
    ],
    ("routes", 0, "split", "allow_override"): [True, False],
    ("routes", 0, "split", "salt"): ["", "s", "$${x}"],
    ("routes", 0, "shadow"): [
        {"sample_rate": 0.5},
        {"target": "one", "sample_rate": 1},
        {"sample_rate": 1, "max_body_bytes": 10},
    ],
    ("routes", 0, "canary"): [
        {"steps": [0.1, 0.5]},
        {"steps": []},
        {"initial_weight": 0.01, "step_size": 1e-9},
        {"step_size": 0.2, "max_weight": 0.9},
        {"steps": [0.5, 0.1]},
    ],
}
_KEY_LIST = list(KEYS)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(yaml.safe_dump(BASE))  # a deep copy
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(_KEY_LIST))
        value = draw(st.sampled_from(KEYS[path]) | st.sampled_from(HOSTILE))
        _set(document, path, value)
    return document


def _set(document: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set the key at ``path``, making the sections on the way (unless an earlier change
    put something other than a section there)."""
    node = document
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return
    if isinstance(node, dict):
        node[path[-1]] = value


def _text(document: dict[str, Any]) -> str:
    # YAML can say anything generated here but a NUL; a file with one is refused whole.
    return yaml.safe_dump(document, allow_unicode=True)


class Tally:
    examples = 0
    accepted = 0
    started = 0
    statuses: ClassVar[Counter[int]] = Counter()
    features: ClassVar[Counter[str]] = Counter()


def _features(config: GatewayConfig) -> list[str]:
    backends = config.backends.values()
    found = {
        "redis state": config.state.backend == "redis",
        "path_prefix": any(b.path_prefix for b in backends),
        "model_name": any(b.model_name for b in backends),
        "metrics_auth": config.admin.metrics_auth,
        "tracing": config.tracing.enabled,
        "header timeout < 0.1s": config.server.header_timeout_seconds < 0.1,
        "shadow": any(r.shadow for r in config.routes),
        "canary": any(r.canary for r in config.routes),
    }
    return [name for name, present in found.items() if present]


def _served(config: GatewayConfig, upstream: str) -> GatewayConfig:
    """The config as the sample starts it: on loopback port 0, with the placeholder
    backend URL pointing at a live upstream (its own path kept; other URLs as drawn)."""
    server = config.server.model_copy(update={"host": "127.0.0.1", "port": 0})
    admin = config.admin.model_copy(update={"host": "127.0.0.1", "port": 0})

    def live(url: str) -> str:
        return upstream + url[len(UPSTREAM) :] if url.startswith(UPSTREAM) else url

    backends = {}
    for name, backend in config.backends.items():
        if backend.url is not None:
            backends[name] = backend.model_copy(update={"url": live(backend.url)})
        else:
            endpoints = [live(url) for url in backend.endpoints or []]
            backends[name] = backend.model_copy(update={"endpoints": endpoints})
    state = config.state
    if (
        state.backend == "embedded"
        and state.path != ":memory:"
        and not Path(state.path).is_absolute()
    ):
        # Relative to the working directory, as the gateway takes it: here, the temp one.
        state = state.model_copy(update={"path": str(_TMP / state.path)})
    return config.model_copy(
        update={"server": server, "admin": admin, "backends": backends, "state": state}
    )


async def _start_and_ask(config: GatewayConfig) -> None:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"model": "m", "ok": True})

    runner = web.AppRunner(catch_all_app(answer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream = f"http://127.0.0.1:{runner.addresses[0][1]}"
    gateway = Gateway(_served(config, upstream))
    try:
        await gateway.start()
        route = config.routes[0]
        path = route.match.path_prefix
        headers = {}
        if route.match.header is not None:
            headers[route.match.header.name] = route.match.header.value
        body = b'{"model": "m", "inputs": [1]}'
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            url = f"http://127.0.0.1:{gateway.proxy_port}{path}"
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()
                # Any answer but the gateway failing: a 413 for a tiny max_body_bytes, a
                # 503 for a tiny buffer budget, a 502 for a backend URL drawn to point
                # nowhere are all answers.
                assert response.status in (200, 404, 413, 502, 503, 504), (
                    response.status,
                    await response.text(),
                )
                Tally.statuses[response.status] += 1
    finally:
        await gateway.stop()
        await runner.cleanup()


@pytest.mark.timeout(900)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(documents())
def test_check_never_tracebacks_and_what_it_accepts_starts_and_serves(
    document: dict[str, Any],
) -> None:
    Tally.examples += 1
    try:
        config = loads(_text(document), environ={"HOME": "/home/gateway"})
    except ConfigError as error:
        assert error.problems and all(p and "Traceback" not in p for p in error.problems)
        return
    Tally.accepted += 1
    Tally.features.update(_features(config))
    asyncio.run(_start_and_ask(config))
    Tally.started += 1


def test_the_property_test_saw_enough() -> None:
    """Runs after the property test (same module, file order): it generated the examples
    CI asks for, and both kinds (accepted, refused) in numbers."""
    if Tally.examples == 0:
        pytest.skip("the property test did not run in this session")
    print(
        f"\nconfig property: {Tally.examples} configs, {Tally.accepted} accepted and "
        f"started; answers {dict(Tally.statuses)}; accepted with {dict(Tally.features)}"
    )
    assert Tally.examples >= min(EXAMPLES, 500)
    assert Tally.accepted >= Tally.examples // 5
    assert Tally.examples - Tally.accepted >= Tally.examples // 5
    assert Tally.started == Tally.accepted
    assert Tally.statuses[200] >= Tally.accepted // 2  # most reach the upstream
