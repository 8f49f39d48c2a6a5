"""The YAML configuration: pydantic models, ``${VAR}`` expansion, and errors with key paths.

``load(path)`` is the only entry point the rest of the gateway needs. Every problem it
finds is reported as ``key.path: message, got VALUE`` so that an operator can fix a bad
file without reading a traceback.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from yarl import URL

from gateway.core.paths import BadPath, normalise_path
from gateway.core.reference import Reference, is_reference, parse_reference, promotable
from gateway.core.split import weight_problem


class ConfigError(Exception):
    """A configuration file that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(problems))


class _Strict(BaseModel):
    """Base of every config section: unknown keys are errors, never silently ignored, and
    so are infinite or NaN numbers (``.inf`` would overflow a timer, ``.nan`` compares
    false with everything)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_a_bool(value: object) -> object:
    # Before pydantic's conversion, which takes YAML's true/yes as 1 (strings stay: a
    # ${VAR} expands to one).
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


Number = BeforeValidator(_not_a_bool)
Int = Annotated[int, Number]
Float = Annotated[float, Number]
Probability = Annotated[Float, Field(ge=0.0, le=1.0)]
Port = Annotated[Int, Field(ge=0, le=65535)]
# Timers take any finite duration; past a week a timeout is a typo (and far past it,
# event loops overflow converting it to milliseconds).
MAX_SECONDS = 7 * 24 * 3600
PositiveSeconds = Annotated[Float, Field(gt=0, le=MAX_SECONDS)]
# What a client is given to send something: below this, no client could.
ClientSeconds = Annotated[Float, Field(ge=0.1, le=MAX_SECONDS)]
Bytes = Annotated[Int, Field(gt=0, le=2**40)]

# RFC 9110 5.6.2: a header (or cookie) name is a token. A name with anything else (a CR
# or LF above all) would break every request or answer it is written to.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"must be an HTTP header name (letters, digits, -), got {value!r}")
    return value


HeaderName = Annotated[str, AfterValidator(_header_name)]


def _normal_path(value: str) -> str:
    """A path as requests are matched and forwarded: absolute and normalised."""
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    if "?" in value:
        raise ValueError(f"must be a path without a query, got {value!r}")
    try:
        normal = normalise_path(value)
    except BadPath as error:
        raise ValueError(f"must be a plain path ({error}), got {value!r}") from None
    if normal != value:
        raise ValueError(
            f"must be written normalised, as request paths are matched: {normal!r}, "
            f"got {value!r}"
        )
    return value


NormalPath = Annotated[str, AfterValidator(_normal_path)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http_url(url: str, *, webhook: bool = False) -> str:
    """An upstream base URL: scheme, host and optional port and path; nothing else. A
    webhook's URL may carry a query too (tokens often travel there), and is kept as is."""
    try:
        parsed = URL(url)
        port = parsed.port  # yarl checks the port only when asked
    except (ValueError, TypeError):
        parsed, port = None, None
    if (
        parsed is None
        or parsed.scheme not in ("http", "https")
        or not parsed.host
        or port is None
        or re.search(r"\s", url)
        or (parsed.query_string and not webhook)
        or parsed.fragment
    ):
        raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
    return url if webhook else url.rstrip("/")


class ServerConfig(_Strict):
    host: str = "0.0.0.0"
    port: Port = 8080
    max_body_bytes: Bytes = 10 * 1024 * 1024
    request_id_header: HeaderName = "X-Request-ID"
    # A client has this long to send a request's head (from its first byte, or from
    # connecting for a new connection's first request): past it, 408 and closed.
    header_timeout_seconds: ClientSeconds = 10.0
    # A kept-alive connection with no next request this long after an answer is closed.
    idle_timeout_seconds: ClientSeconds = 60.0
    # Longest gap between two pieces of a request body: past it, 408 and closed.
    body_timeout_seconds: ClientSeconds = 60.0
    # Request line and headers together; past it, 431.
    max_header_bytes: Annotated[Int, Field(ge=1024, le=1024 * 1024)] = 64 * 1024
    # Client connections per process; new ones past it are closed at once.
    max_connections: Annotated[Int, Field(ge=1, le=1_000_000)] = 10_000
    # Request bodies held in memory at once, over all requests (read to match a route on
    # the body's model, or to rewrite it for a backend's model_name); past it, 503.
    max_buffered_bytes: Bytes = 128 * 1024 * 1024
    # How long SIGTERM waits for in-flight requests before closing them.
    drain_timeout_seconds: PositiveSeconds = 30.0
    workers: Annotated[Int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> ServerConfig:
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_bytes: must be at least max_body_bytes "
                f"({self.max_body_bytes}), got {self.max_buffered_bytes}"
            )
        return self


class AdminConfig(_Strict):
    host: str = "127.0.0.1"
    port: Port = 9090
    token: str = ""
    # /metrics answers without the token unless this is set.
    metrics_auth: bool = False

    @model_validator(mode="after")
    def _token_required_off_loopback(self) -> AdminConfig:
        if not self.token and not _is_loopback(self.host):
            raise ValueError(
                f"host: an admin listener on a non-loopback address needs admin.token, "
                f"got host {self.host!r} and no token"
            )
        if self.metrics_auth and not self.token:
            raise ValueError("metrics_auth: needs admin.token to check, got no token")
        if self.token != self.token.strip() or re.search(r"[\x00-\x1f\x7f]", self.token):
            raise ValueError("token: may not hold control characters or start or end blank")
        return self


def _check_redis_url(url: str | None) -> str | None:
    """A URL the Redis client takes (it is built at start, so a bad one would only fail
    there). Whether a server answers is not checked: the gateway starts without one."""
    if url is None:
        return None
    from gateway.store.redis import check_url

    problem = check_url(url)
    if problem is not None:
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL ({problem}), got {url!r}")
    return url


RedisURL = Annotated[str | None, AfterValidator(_check_redis_url)]


def _state_file_problem(path: str) -> str | None:
    """Why the embedded store could not open (or create) its SQLite file at ``path``."""
    if "\x00" in path:
        return "a path may not contain NUL"
    if path == ":memory:":
        return None
    file = Path(path)
    if file.exists():
        if not file.is_file():
            return "exists and is not a file"
        if not os.access(file, os.R_OK | os.W_OK):
            return "is not readable and writable by this user"
    # The store creates missing directories: the nearest one that exists must let it.
    # (SQLite also writes its -wal and -shm files next to the database.)
    directory = file.absolute().parent
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    if not directory.is_dir():
        return f"{str(directory)!r} is not a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {str(directory)!r} is not writable by this user"
    return None


class StateConfig(_Strict):
    backend: Literal["embedded", "redis"] = "embedded"
    path: str = "./gateway-state.db"
    redis_url: RedisURL = None
    key_prefix: str = "gateway"

    @model_validator(mode="after")
    def _redis_needs_url(self) -> StateConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url: required when backend is 'redis', got nothing")
        return self


class TracingConfig(_Strict):
    enabled: bool = True
    interval_seconds: Annotated[Int, Field(ge=1, le=3600)] = 10
    key_prefix: str = "aibrix"
    ttl_seconds: Annotated[Int, Field(ge=1, le=365 * 24 * 3600)] = 600
    # Where traces are written. Defaults to state.redis_url; with neither, traces are
    # kept in memory and served by the admin API only.
    redis_url: RedisURL = None


FiniteSeconds = Annotated[Float, Field(gt=0, allow_inf_nan=False)]


class OutlierDetectionConfig(_Strict):
    """Passive ejection of failing endpoints (gateway.core.health says exactly how)."""

    # Failures in a row (no connection, a timeout, a 5xx, a broken answer) that eject.
    consecutive_failures: Annotated[Int, Field(ge=1)] = 5
    # The first ejection's length; each ejection in a row doubles it (up to 300 s).
    base_ejection_seconds: FiniteSeconds = 30.0
    # Never more than this share of a backend's endpoints out at once (but at least one
    # of several).
    max_ejection_percent: Annotated[Float, Field(ge=0, le=100)] = 50.0


class HealthCheckConfig(_Strict):
    """Active checks: ``GET path`` on every endpoint every ``interval_seconds`` (jittered);
    a 2xx within ``timeout_seconds`` passes."""

    path: str
    interval_seconds: FiniteSeconds = 5.0
    timeout_seconds: FiniteSeconds = 1.0
    healthy_threshold: Annotated[Int, Field(ge=1)] = 2
    unhealthy_threshold: Annotated[Int, Field(ge=1)] = 3

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or re.search(r"[\s#]", value):
            raise ValueError(f"must be a path starting with '/', got {value!r}")
        return value


class BackendConfig(_Strict):
    url: str | None = None
    endpoints: list[str] | None = None
    load_balancing: Literal["round_robin", "random", "least_request"] = "round_robin"
    # Longest wait for the answer's headers and, once it streams, between two chunks.
    timeout_seconds: PositiveSeconds = 30.0
    connect_timeout_seconds: PositiveSeconds = 5.0
    # The model name this backend's load is traced under (defaults to the backend name).
    model: str | None = None
    # Rewrites of what this backend is sent: path_prefix replaces the part of the path
    # the route's match.path_prefix matched; model_name replaces the JSON body's "model".
    path_prefix: NormalPath | None = None
    model_name: Annotated[str, Field(min_length=1)] | None = None
    # Requests in flight to one endpoint at most (each holds one connection); beyond it
    # a request waits up to queue_timeout_seconds for a free one, then gets 503.
    max_connections: Annotated[Int, Field(ge=1)] = 1024
    queue_timeout_seconds: Annotated[Float, Field(ge=0, allow_inf_nan=False)] = 5.0
    outlier_detection: OutlierDetectionConfig = OutlierDetectionConfig()
    health_check: HealthCheckConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one URL, got an empty list")
        return [_check_http_url(url) for url in value]

    @model_validator(mode="after")
    def _one_of_url_or_endpoints(self) -> BackendConfig:
        if (self.url is None) == (self.endpoints is None):
            raise ValueError("url: give exactly one of 'url' or 'endpoints'")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if self.url is not None else list(self.endpoints or [])


class HeaderMatch(_Strict):
    name: HeaderName
    value: str


class MatchConfig(_Strict):
    # Matched at segment boundaries against the normalised request path (see
    # gateway.core.paths), so it must be written normalised itself.
    path_prefix: NormalPath
    model: str | None = None
    header: HeaderMatch | None = None


# A header or cookie NAME is an HTTP token (see _TOKEN).
_KEY_SOURCE = re.compile(r"^(request_id|(header|cookie):[!#$%&'*+\-.^_`|~0-9A-Za-z]+|query:.+)$")


class SplitConfig(_Strict):
    challenger_weight: float = 0.0
    key: str = "request_id"
    salt: str = ""
    allow_override: bool = False

    @field_validator("challenger_weight", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        # Before pydantic's conversion, which would take a YAML "yes" as 1.0 (strings
        # stay: ${VAR} expands to one).
        if isinstance(value, bool):
            raise ValueError(weight_problem(value))
        return value

    @field_validator("challenger_weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        problem = weight_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _KEY_SOURCE.match(value):
            raise ValueError(
                f"must be request_id, header:NAME, cookie:NAME or query:NAME, got {value!r}"
            )
        return value


class CompareConfig(_Strict):
    """How a shadow's answer is compared with the champion's (see gateway.core.compare)."""

    protocol: Literal["auto", "oip", "tfserving", "openai", "json", "bytes"] = "auto"
    # JSON paths left out of the comparison, e.g. "$.id", "$.choices[*].finish_reason".
    ignore: list[str] = []
    abs_tol: Annotated[Float, Field(ge=0)] = 1e-6
    rel_tol: Annotated[Float, Field(ge=0)] = 1e-5
    vector_match: Literal["tolerance", "argmax", "topk", "cosine"] = "tolerance"
    min_cosine: Annotated[Float, Field(ge=-1.0, le=1.0)] = 0.999
    top_k: Annotated[Int, Field(ge=1)] = 5
    text_match: Literal["exact", "whitespace"] = "exact"

    @field_validator("ignore")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        from gateway.core.extract import PathMatcher

        for pattern in value:
            try:
                PathMatcher((pattern,))
            except ValueError as error:
                raise ValueError(f"bad JSON path pattern {pattern!r}: {error}") from None
        return value


class BaselineConfig(_Strict):
    """Champion-vs-champion noise baseline: a field counts as a real difference only where
    the challenger's mismatch rate clearly exceeds the champion's own."""

    # Share of mirrored requests also sent a second time to the champion.
    sample_rate: Probability = 0.0
    confidence: Annotated[Float, Field(gt=0.5, lt=1.0)] = 0.99
    min_samples: Annotated[Int, Field(ge=1)] = 20
    min_noise_samples: Annotated[Int, Field(ge=0)] = 20
    min_net_rate: Probability = 0.0


class ShadowReportConfig(_Strict):
    max_fields: Annotated[Int, Field(ge=1, le=10_000)] = 256
    latency_window: Annotated[Int, Field(ge=1, le=1_000_000)] = 1024
    last_mismatches: Annotated[Int, Field(ge=0, le=10_000)] = 50
    max_value_chars: Annotated[Int, Field(ge=8)] = 256
    # Append every mismatch as one JSON line to this file, for offline analysis.
    mismatch_log: str | None = None


class ShadowConfig(_Strict):
    # Defaults to the route's challenger.
    target: str | None = None
    sample_rate: Probability = 0.0
    # random: each request independently; key: by the split key, so the same users
    # (or sessions, or request IDs) are always mirrored.
    sampling: Literal["random", "key"] = "random"
    max_in_flight: Annotated[Int, Field(ge=1, le=100_000)] = 32
    # Defaults to the target backend's timeout_seconds.
    timeout_seconds: PositiveSeconds | None = None
    # Requests and answers larger than this are not mirrored (counted as dropped).
    max_body_bytes: Annotated[Int, Field(gt=0)] = 1024 * 1024
    # PUT, PATCH and DELETE are mirrored only when the target may see them twice.
    allow_side_effects: bool = False
    compare: CompareConfig = CompareConfig()
    baseline: BaselineConfig = BaselineConfig()
    report: ShadowReportConfig = ShadowReportConfig()


WebhookEvent = Literal["started", "advanced", "rolled_back", "promoted", "paused", "resumed"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "started", "advanced", "rolled_back", "promoted", "paused", "resumed",
)  # fmt: skip


class WebhookConfig(_Strict):
    url: str
    # The events it is told about (default: all of them).
    events: list[WebhookEvent] = list(WEBHOOK_EVENTS)
    # A gate is also asked before each advance and before an automatic promotion: any
    # answer but a 2xx (or none within the timeout) keeps the canary holding.
    gate: bool = False
    timeout_seconds: PositiveSeconds = 5.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value, webhook=True)


MAX_CANARY_STEPS = 100


class CanaryConfig(_Strict):
    """How the canary controller ramps a route's challenger (see gateway.core.canary)."""

    # Either the challenger weights in order, or the shorthand that expands to them.
    steps: list[Float] | None = None
    initial_weight: Probability | None = None
    step_size: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    max_weight: Probability | None = None
    step_interval_seconds: PositiveSeconds = 60.0
    evaluation_interval_seconds: PositiveSeconds = 5.0
    min_requests: Annotated[Int, Field(ge=1)] = 200
    max_error_rate_increase: Probability = 0.01
    success_threshold: Probability = 0.99
    confidence: Annotated[Float, Field(gt=0.5, lt=1.0)] = 0.95
    # At least 1: below, a challenger exactly as fast as the champion would be "slower".
    max_latency_ratio: Annotated[Float, Field(ge=1.0)] | None = None
    latency_quantile: Annotated[Float, Field(gt=0.0, lt=1.0)] = 0.99
    min_shadow_agreement: Probability | None = None
    # Default: 10 x step_interval_seconds.
    max_step_seconds: PositiveSeconds | None = None
    on_inconclusive: Literal["hold", "rollback"] = "hold"
    auto_promote: bool = False
    webhooks: list[WebhookConfig] = []
    # One replica leads each route's canary: it holds a lease in the state store this
    # long, renewed at a third of it; another replica takes over once it runs out.
    leader_lease_seconds: Annotated[Float, Field(ge=1.0, le=600.0)] = 10.0

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one weight, got an empty list")
        if len(value) > MAX_CANARY_STEPS:
            raise ValueError(f"at most {MAX_CANARY_STEPS} steps, got {len(value)}")
        for weight in value:
            if not 0 < weight <= 1:
                raise ValueError(f"every step must be a weight in (0, 1], got {weight}")
        for before, after in itertools.pairwise(value):
            if after <= before:
                raise ValueError(f"steps must increase, got {after} after {before}")
        if value[0] >= 1:
            # At weight 1 the champion gets nothing to compare the challenger with.
            raise ValueError(f"the first step must be below 1, got {value[0]}")
        return value

    @model_validator(mode="after")
    def _steps_or_shorthand(self) -> CanaryConfig:
        shorthand = (self.initial_weight, self.step_size, self.max_weight)
        if self.steps is not None and any(v is not None for v in shorthand):
            raise ValueError(
                "steps: give either steps or initial_weight/step_size/max_weight, not both"
            )
        if self.steps is None:
            initial = 0.05 if self.initial_weight is None else self.initial_weight
            size = 0.1 if self.step_size is None else self.step_size
            maximum = 0.5 if self.max_weight is None else self.max_weight
            if (maximum - initial) / size > MAX_CANARY_STEPS:
                raise ValueError(
                    f"step_size: from {initial} to {maximum} in steps of {size} makes more "
                    f"than {MAX_CANARY_STEPS} steps"
                )
        initial, maximum = self.resolved_steps[0], self.resolved_steps[-1]
        if initial >= 1:
            raise ValueError(
                f"initial_weight: must be below 1 (the champion needs traffic to compare "
                f"with), got {initial}"
            )
        if initial <= 0 or maximum < initial:
            raise ValueError(
                f"max_weight: must be at least initial_weight ({initial}) and above 0, "
                f"got {maximum}"
            )
        return self

    @property
    def resolved_steps(self) -> tuple[float, ...]:
        """The weights the canary walks through, in order."""
        if self.steps is not None:
            return tuple(self.steps)
        initial = 0.05 if self.initial_weight is None else self.initial_weight
        size = 0.1 if self.step_size is None else self.step_size
        maximum = 0.5 if self.max_weight is None else self.max_weight
        steps = [initial]
        # Rounded so that 0.05 + 0.1 steps read 0.15, 0.25, ..., not 0.15000000000000002.
        while round(steps[-1] + size, 9) < maximum:
            steps.append(round(steps[-1] + size, 9))
        if steps[-1] < maximum:
            steps.append(maximum)
        return tuple(steps)


class RouteConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    match: MatchConfig
    champion: str
    challenger: str | None = None
    split: SplitConfig = SplitConfig()
    shadow: ShadowConfig | None = None
    canary: CanaryConfig | None = None

    @property
    def shadow_target(self) -> str | None:
        if self.shadow is None:
            return None
        return self.shadow.target or self.challenger

    @model_validator(mode="after")
    def _weight_needs_challenger(self) -> RouteConfig:
        problem = weight_problem(self.split.challenger_weight, self.challenger is not None)
        if problem is not None:
            raise ValueError(f"split.challenger_weight: {problem}")
        return self


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    tracing: TracingConfig = TracingConfig()
    backends: dict[str, BackendConfig]
    routes: list[RouteConfig]


def references(config: GatewayConfig) -> list[tuple[str, Reference]]:
    """Every registry reference of the routes (``model:NAME@ALIAS``), with its key path."""
    found = []
    for i, route in enumerate(config.routes):
        named = [("champion", route.champion), ("challenger", route.challenger)]
        if route.shadow is not None:
            named.append(("shadow.target", route.shadow.target))
        for field, name in named:
            if is_reference(name):
                assert name is not None
                found.append((f"routes[{i}].{field}", parse_reference(name)))
    return found


def semantic_problems(config: GatewayConfig) -> list[str]:
    """Cross-references pydantic cannot check one field at a time."""
    problems: list[str] = []
    known = sorted(config.backends)
    seen_names: dict[str, int] = {}
    seen_matches: dict[tuple[str, str | None, str | None, str | None], int] = {}
    for i, route in enumerate(config.routes):
        where = f"routes[{i}]"
        if route.name in seen_names:
            problems.append(
                f"{where}.name: duplicate route name {route.name!r} "
                f"(also routes[{seen_names[route.name]}])"
            )
        seen_names.setdefault(route.name, i)
        refs = [("champion", route.champion), ("challenger", route.challenger)]
        if route.shadow is not None:
            refs.append(("shadow.target", route.shadow.target))
            if route.shadow.target is None and route.challenger is None:
                problems.append(f"{where}.shadow.target: required when the route has no challenger")
            elif route.shadow_target == route.champion:
                problems.append(
                    f"{where}.shadow.target: must differ from the champion, got {route.champion!r}"
                )
        for field, backend in refs:
            if is_reference(backend):
                # The registry's: checked when it resolves, not here (it may be
                # registered after this file is written; ``gateway check`` warns).
                assert backend is not None
                try:
                    parse_reference(backend)
                except ValueError as error:
                    problems.append(f"{where}.{field}: {error}")
                continue
            if backend is not None and backend not in config.backends:
                problems.append(
                    f"{where}.{field}: unknown backend {backend!r} (known: {', '.join(known)})"
                )
        if route.canary is not None:
            if route.challenger is None:
                problems.append(f"{where}.canary: needs a challenger to ramp up, got none")
            if route.canary.auto_promote and not promotable(route.champion, route.challenger):
                problems.append(
                    f"{where}.canary.auto_promote: a promotion of a route by registry "
                    "references moves aliases, so champion and challenger must be two "
                    "aliases of one model (model:NAME@champion, model:NAME@challenger)"
                )
            if route.canary.min_shadow_agreement is not None and route.shadow is None:
                problems.append(
                    f"{where}.canary.min_shadow_agreement: needs the route's shadow section"
                )
        if route.challenger is not None and route.challenger == route.champion:
            problems.append(
                f"{where}.challenger: must differ from the champion, got {route.challenger!r}"
            )
        header = route.match.header
        match_key = (
            route.match.path_prefix,
            route.match.model,
            header.name.lower() if header else None,
            header.value if header else None,
        )
        if match_key in seen_matches:
            problems.append(
                f"{where}.match: same match as routes[{seen_matches[match_key]}], "
                "so this route could never be chosen"
            )
        seen_matches.setdefault(match_key, i)
    state = config.state
    if state.backend == "embedded":
        # Checked here, when a file is loaded, not by the model: the default path is
        # relative to wherever the gateway runs.
        problem = _state_file_problem(state.path)
        if problem is not None:
            problems.append(f"state.path: cannot hold the store: {problem}, got {state.path!r}")
    if (
        config.admin.port
        and config.admin.port == config.server.port
        and (
            config.admin.host == config.server.host
            or "0.0.0.0" in (config.admin.host, config.server.host)
        )
    ):
        problems.append(f"admin.port: must differ from server.port, got {config.admin.port}")
    return problems


# --- ${VAR} expansion -------------------------------------------------------------------

# "$${" is a literal "${" (as in Docker Compose); otherwise ${NAME} or ${NAME:-default}.
_VAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_LITERAL = "$${"


class _BadReference(Exception):
    def __init__(self, value: str) -> None:
        self.value = value


class _UnsetVariable(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _expand_string(value: str, environ: Mapping[str, str]) -> str:
    if "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name is None:
            return "${"  # $${
        if default is not None:
            if "${" in default.replace(_LITERAL, ""):
                raise _BadReference(value)
            default = default.replace(_LITERAL, "${")
        if name in environ and (environ[name] != "" or default is None):
            return environ[name]
        if default is not None:
            return default
        raise _UnsetVariable(name)

    if "${" in _VAR.sub("", value):
        raise _BadReference(value)
    return _VAR.sub(substitute, value)


def expand_env(node: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string value of a parsed document.

    Expansion happens after YAML parsing so that a value holding ``:`` or ``#`` cannot
    change the document's structure. A whole-value reference (``port: ${PORT}``) yields a
    string that pydantic then converts to the field's type.
    """
    if isinstance(node, str):
        try:
            return _expand_string(node, environ)
        except _BadReference as bad:
            raise ConfigError(
                [
                    f"{path or '<root>'}: cannot expand {bad.value!r}: write ${{VAR}} or "
                    "${VAR:-default} (defaults cannot nest), or $${ for a literal ${"
                ]
            ) from None
        except _UnsetVariable as unset:
            raise ConfigError(
                [
                    f"{path or '<root>'}: environment variable {unset.name} is not set "
                    "and has no default (write ${" + unset.name + ":-default})"
                ]
            ) from None
    if isinstance(node, dict):
        return {k: expand_env(v, environ, _join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, environ, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# --- error formatting ---------------------------------------------------------------------


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    return path


def _format_error(error: ErrorDetails) -> str:
    path = _loc_to_path(tuple(error["loc"]))
    message = error["msg"]
    # Our own validators raise "field: message": move the field into the path.
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
        field, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"[a-z_.]+", field):
            path, message = _join(path, field), rest
        return f"{path or '<root>'}: {message}"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    got = error.get("input")
    # Lowercase only the first letter: the rest may quote a case-sensitive pattern.
    message = message[:1].lower() + message[1:]
    return f"{path or '<root>'}: {message}, got {got!r}"


def parse(
    document: Any, environ: Mapping[str, str] | None = None, source: str = ""
) -> GatewayConfig:
    """Validate an already-parsed YAML document."""
    if not isinstance(document, dict):
        raise ConfigError(["<root>: must be a mapping with backends and routes"], source)
    problem = _size_problem(document)
    if problem is not None:
        raise ConfigError([f"<root>: {problem}"], source)
    try:
        expanded = expand_env(document, os.environ if environ is None else environ)
    except ConfigError as error:
        raise ConfigError(error.problems, source) from None
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as error:
        raise ConfigError([_format_error(e) for e in error.errors()], source) from None
    problems = semantic_problems(config)
    if problems:
        raise ConfigError(problems, source)
    return config


# --- reading YAML ------------------------------------------------------------------------

# A config with 20,000 routes is a few MB; anything near this is a mistake or an attack.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# Values in the document once aliases are followed (each use of an alias counts its
# whole value again: a "billion laughs" file stops here instead of exhausting memory),
# and how deeply they nest.
MAX_DOCUMENT_VALUES = 2_000_000
MAX_DOCUMENT_DEPTH = 64


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe subset, parsed in C where PyYAML has libyaml; a key given twice in one
    mapping is an error (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults": keys given here override the merged ones
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                break  # unhashable: the constructor says so below
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _size_problem(document: Any) -> str | None:
    """Whether the document is too large or too deep to validate (without recursion: a
    self-referencing alias makes a document infinitely deep)."""
    stack: list[tuple[Any, int]] = [(document, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_DOCUMENT_VALUES:
            return f"more than {MAX_DOCUMENT_VALUES} values once aliases are expanded"
        if depth > MAX_DOCUMENT_DEPTH:
            return f"nested more than {MAX_DOCUMENT_DEPTH} levels deep"
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    return None


def loads(text: str, environ: Mapping[str, str] | None = None, source: str = "") -> GatewayConfig:
    """Parse and validate YAML text."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"<file>: larger than {MAX_CONFIG_BYTES} bytes"], source)
    try:
        document = yaml.load(text, Loader=_Loader)  # a safe loader (see _Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"<yaml>: {where}{problem}"], source) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as error:
        # A value YAML's own types cannot hold (a timestamp such as 2024-13-45).
        raise ConfigError([f"<yaml>: {type(error).__name__}: {error}"], source) from None
    return parse(document, environ, source)


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, parse and validate a config file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([f"<file>: cannot read: {error.strerror}"], str(path)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"<file>: larger than {MAX_CONFIG_BYTES} bytes"], str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        problem = f"<file>: not UTF-8 text (byte {error.start}: {data[error.start:][:1]!r})"
        raise ConfigError([problem], str(path)) from None
    return loads(text, environ, str(path))
