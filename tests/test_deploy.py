"""What ships around the gateway, checked as its users' tools would: the Grafana
dashboard's queries against the metrics the gateway exports, the alert rules with
``promtool`` (``check rules`` and their unit tests), the Kubernetes manifests against the
Kubernetes schemas (``kubernetes-validate``) and against the gateway (``gateway check``
on the ConfigMap, probes and drain), and the Dockerfile's health check against a running
gateway on a port that is not 9090.

``promtool`` comes from Debian's ``prometheus`` package; outside CI a missing tool skips
its tests with one line (tests/helpers/tools.py), under ``CI=true`` it fails them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.metrics import Metrics
from tests.cli_support import ROOT, cli_env, run_cli_sync
from tests.helpers.ports import free_port
from tests.helpers.tools import executable, missing
from tests.support import gateway_document, spawn_gateway, wait_ready

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yaml"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # the oldest release still maintained upstream in 2025
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


# --- the metrics the gateway exports -------------------------------------------------------


def exported() -> dict[str, set[str]]:
    """Every series name the gateway can export, with its labels: counters as
    ``*_total``, histograms as ``*_bucket`` (with ``le``), ``*_sum`` and ``*_count``;
    and Prometheus's own ``up``."""
    metrics = Metrics()
    names: dict[str, set[str]] = {"up": set()}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, labels = metric._name, set(metric._labelnames)
        kind = metric._type
        if kind == "counter":
            names[f"{name}_total"] = labels
        elif kind == "histogram":
            names[f"{name}_bucket"] = labels | {"le"}
            names[f"{name}_sum"] = names[f"{name}_count"] = labels
        else:
            names[name] = labels
    return names


_FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "and", "or", "unless", "on", "ignoring", "label_values", "changes",
    "absent", "humanizePercentage", "clamp_min", "clamp_max", "topk", "bottomk", "group_left",
}  # fmt: skip
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def problems_of(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Metric names a PromQL expression uses that the gateway does not export, labels it
    matches or groups by that those metrics do not have, and a query using no metric."""
    text = re.sub(r'"[^"]*"', '""', expr)  # label values and strings out of the way
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations ([5m], [$__rate_interval])
    problems, used, labels = [], set(), set()
    for match in _SELECTOR.finditer(text):
        name, matchers = match.group(1), match.group(2) or ""
        start = match.start()
        if name in _FUNCTIONS or text[start - 1 : start] in ("$", ".") or name.isdigit():
            continue
        if re.fullmatch(r"[0-9.]+[a-z]*", name) or name in ("le",):
            continue
        if text[match.end() :].lstrip().startswith("(") and not matchers:
            continue  # a function call
        if name not in known:
            if not re.search(rf"\b(by|without)\s*\([^)]*\b{name}\b", text):
                problems.append(f"{name}: not a metric the gateway exports")
            continue
        used.add(name)
        for label in _MATCHER.findall(matchers):
            if label[0] not in known[name] | TARGET_LABELS:
                problems.append(f"{name}: has no label {label[0]!r}")
        labels |= known[name]
    for group in _GROUPING.findall(text):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in labels | TARGET_LABELS:
                problems.append(f"by ({label}): no metric of the query has it")
    if not used:
        problems.append("uses no metric of the gateway")
    return problems


def test_the_query_checker_catches_what_it_should() -> None:
    known = exported()
    good = 'sum by (route, le) (rate(gateway_request_duration_seconds_bucket{route=~"$r"}[5m]))'
    assert problems_of(good, known) == []
    assert problems_of("rate(gateway_request_total[5m])", known) == [
        "gateway_request_total: not a metric the gateway exports",
        "uses no metric of the gateway",
    ]
    assert problems_of('gateway_challenger_weight{variant="x"}', known) == [
        "gateway_challenger_weight: has no label 'variant'"
    ]
    assert problems_of("sum by (backend) (gateway_trace_writes_total)", known) == [
        "by (backend): no metric of the query has it"
    ]


# --- Grafana -------------------------------------------------------------------------------


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every query: panels' targets, annotations, template variables."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield f"panel {panel['title']!r}", target["expr"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            yield f"annotation {annotation['name']!r}", annotation["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL): checked as the grouping it amounts to.
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert inner is not None, variable
            yield f"variable {variable['name']!r}", f"sum by ({inner[2]}) ({inner[1]})"


def test_dashboard_queries_use_only_metrics_the_gateway_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported()
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 20
    problems = [f"{where}: {p}" for where, expr in queries for p in problems_of(expr, known)]
    assert problems == []
    used = {name for _, expr in queries for name in known if re.search(rf"\b{name}\b", expr)}
    # Every metric of the gateway is on the dashboard (histograms through their buckets).
    unused = {n for n in known if not n.endswith(("_sum", "_count"))} - used
    assert unused == set()


def test_dashboard_shows_what_an_operator_looks_for() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for title in ("Requests per second", "Error rate (5xx share)", "Latency quantiles",
                  "Challenger weight", "Canary state", "Shadow outcomes per second",
                  "Shadow latency delta (shadow minus champion)", "Upstream errors per second",
                  "Endpoint health", "Trace writes per second"):  # fmt: skip
        assert title in titles
    latency = next(p for p in panels if p["title"] == "Latency quantiles")
    assert [t["expr"].split(",")[0] for t in latency["targets"]] == [
        "histogram_quantile(0.5",
        "histogram_quantile(0.9",
        "histogram_quantile(0.99",
    ]
    assert all("variant" in t["expr"] for t in latency["targets"])
    decisions = [a for a in dashboard["annotations"]["list"] if a.get("expr")]
    assert len(decisions) == 1 and "gateway_canary_decisions_total" in decisions[0]["expr"]
    # Every panel on the Prometheus data source variable; ids unique; none overlapping.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        area = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area


# --- Prometheus alert rules ----------------------------------------------------------------


def promtool() -> str:
    return executable("promtool", "apt-get install prometheus")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def test_promtool_checks_the_rules() -> None:
    done = run_promtool("check", "rules", ALERTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = run_promtool("test", "rules", ALERT_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_fail_on_a_wrong_rule(tmp_path: Path) -> None:
    # The unit tests can fail: with the canary alert's "for" halved they do.
    rules = ALERTS.read_text().replace("for: 30m", "for: 15m")
    assert rules != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(rules)
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    done = subprocess.run(
        [promtool(), "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "GatewayCanaryStuckHolding" in done.stdout + done.stderr


def test_alerts_cover_the_failures_and_use_exported_metrics() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert set(by_name) == {
        "GatewayDown", "GatewayCanaryRolledBack", "GatewayCanaryStuckHolding",
        "GatewayChallengerErrorRateAboveChampion", "GatewayShadowMismatchRateHigh",
        "GatewayEndpointEjected", "GatewayBackendWithoutHealthyEndpoint",
        "GatewayTraceWritesFailing",
    }  # fmt: skip
    known = exported()
    problems = [f"{n}: {p}" for n, r in by_name.items() for p in problems_of(r["expr"], known)]
    assert problems == []
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    assert tested == set(by_name)
    # Each alert is tested where it must not fire as well as where it must.
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert quiet >= set(by_name) - {"GatewayBackendWithoutHealthyEndpoint"}


# --- Kubernetes ----------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kind(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs
        if d["kind"] == kind
        and (component is None
             or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]  # fmt: skip
    assert len(found) == 1, f"{kind} {component}: {len(found)} found"
    return found[0]


def test_manifests_are_valid_kubernetes_objects() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate", "pip install -e '.[test]'")
    docs = manifests()
    assert {d["kind"] for d in docs} == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "StatefulSet"
    }  # fmt: skip
    for doc in docs:
        # strict: unknown fields are errors too
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = json.loads(json.dumps(kind(docs, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def configmap_config(docs: list[dict[str, Any]]) -> str:
    return str(kind(docs, "ConfigMap")["data"]["gateway.yaml"])


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The gateway container's environment, a secret's value standing in as a word."""
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", "from-a-secret") for e in env}


def test_the_configmap_is_a_config_gateway_check_accepts(tmp_path: Path) -> None:
    docs = manifests()
    deployment = kind(docs, "Deployment")
    config = tmp_path / "gateway.yaml"
    config.write_text(configmap_config(docs))
    # With the Deployment's environment: every ${VAR} the config uses is set there.
    result = run_cli_sync("check", "-c", str(config), env=cli_env(**container_env(deployment)))
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip().endswith("ok (2 backends, 1 route)")
    without = run_cli_sync("check", "-c", str(config))
    assert without.returncode == 1 and "GATEWAY_ADMIN_TOKEN" in without.stderr


def test_the_deployment_probes_drains_and_shares_its_state() -> None:
    docs = manifests()
    deployment = kind(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    config = yaml.safe_load(configmap_config(docs))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config["server"]["port"], "admin": config["admin"]["port"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert config["admin"]["host"] == "0.0.0.0"  # the kubelet probes the pod's address
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]
    # Termination: the preStop sleep, then the drain, fit in the grace period.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(config["server"]["drain_timeout_seconds"])
    grace = pod["terminationGracePeriodSeconds"]
    assert int(command[1]) + drain + 5 <= grace <= int(command[1]) + drain + 15
    # The config is the ConfigMap, mounted where the image's command reads it.
    assert container["args"] == ["run", "-c", "/etc/gateway/gateway.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["config"] == "/etc/gateway"
    assert volumes["config"]["configMap"]["name"] == kind(docs, "ConfigMap")["metadata"]["name"]
    # The replicas share weights and canaries through the Redis the manifests run.
    env = container_env(deployment)
    assert config["state"] == {"backend": "redis", "redis_url": "${GATEWAY_REDIS_URL}"}
    redis_service = kind(docs, "Service", "redis")
    redis_port = redis_service["spec"]["ports"][0]["port"]
    assert env["GATEWAY_REDIS_URL"] == (
        f"redis://{redis_service['metadata']['name']}:{redis_port}/0"
    )
    redis = kind(docs, "StatefulSet", "redis")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("redis:")


def test_services_and_budget_select_the_right_pods() -> None:
    docs = manifests()
    gateway_labels = kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    redis_labels = kind(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    gateway_service = kind(docs, "Service", "gateway")
    assert selects(gateway_service["spec"]["selector"], gateway_labels)
    assert not selects(gateway_service["spec"]["selector"], redis_labels)
    assert {p["targetPort"] for p in gateway_service["spec"]["ports"]} == {"http", "admin"}
    budget = kind(docs, "PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], gateway_labels)
    assert not selects(budget["spec"]["selector"]["matchLabels"], redis_labels)
    assert budget["spec"]["minAvailable"] == 1  # of 2: one at a time
    redis_service = kind(docs, "Service", "redis")
    assert selects(redis_service["spec"]["selector"], redis_labels)


# --- Docker: the health check follows the config; the example reaches its backends ---------


def dockerfile_healthcheck() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("HEALTHCHECK")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return [str(word) for word in command]


async def test_the_dockerfile_health_check_follows_the_configs_admin_port(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    command = dockerfile_healthcheck()
    assert "9090" not in " ".join(command)
    assert command[0] == "python"
    command[0] = sys.executable  # the image's python, here the suite's
    admin_port = free_port()
    document = gateway_document(
        {"m": {"url": "http://127.0.0.1:9"}},
        [{"name": "a", "match": {"path_prefix": "/"}, "champion": "m"}],
        server={"port": free_port()},
        admin={"host": "0.0.0.0", "port": admin_port, "token": "t"},
        state={"path": str(tmp_path / "state.db")},
    )

    async def health_check() -> subprocess.CompletedProcess[str]:
        env = cli_env(GATEWAY_CONFIG=str(tmp_path / "gateway.yaml"))
        return await asyncio.to_thread(
            subprocess.run, command, env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip

    process = await spawn_gateway(document, tmp_path, capture=False)
    try:
        await wait_ready(http, f"http://127.0.0.1:{admin_port}", process=process)
        healthy = await health_check()
        assert healthy.returncode == 0, healthy.stderr
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 20)
    gone = await health_check()
    assert gone.returncode == 1
    assert f"unhealthy: http://127.0.0.1:{admin_port}/healthz" in gone.stderr


def readme_docker_run() -> list[str]:
    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"^\s*(docker run .*?)\n\s*```", text, re.MULTILINE | re.DOTALL)
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_docker_example_reaches_its_backends(tmp_path: Path) -> None:
    words = readme_docker_run()
    mount = next(w for w in words if w.endswith(":/etc/gateway/gateway.yaml:ro"))
    config_file = ROOT / mount.replace("$PWD/", "").split(":")[0]
    env = dict(w.split("=", 1) for w in words if "=" in w and w.startswith("GATEWAY_"))
    result = run_cli_sync("check", "-c", str(config_file), env=cli_env(**env))
    assert result.returncode == 0, result.describe()
    config = yaml.safe_load(config_file.read_text())
    urls = [b.get("url", "") for b in config["backends"].values()]
    urls += [e for b in config["backends"].values() for e in b.get("endpoints", ())]
    assert urls and not [u for u in urls if re.search(r"//(127\.|localhost|\[::1\])", u)]
    if any("host.docker.internal" in u for u in urls):
        assert "--add-host=host.docker.internal:host-gateway" in words  # for Linux
    # The published ports are the config's, on every interface of the container.
    published = {w.split(":")[1] for w in words if re.fullmatch(r"\d+:\d+", w)}
    assert published == {str(config["server"]["port"]), str(config["admin"]["port"])}
    assert config["server"]["host"] == config["admin"]["host"] == "0.0.0.0"
    # No config with loopback backends is built into the image either.
    assert "COPY config" not in (ROOT / "Dockerfile").read_text()


# --- README: the broken config it shows ----------------------------------------------------


def test_the_readme_check_example_runs_as_shown() -> None:
    text = (ROOT / "README.md").read_text()
    (shown,) = re.findall(r"```sh\n\$ \.venv/bin/(gateway check .*?)\n(.*?)```", text, re.DOTALL)
    command, output = shown
    result = run_cli_sync(*shlex.split(command)[1:])
    assert result.returncode == 1, result.describe()
    assert result.stderr == output
    assert os.path.exists(ROOT / shlex.split(command)[-1])
