"""``gateway models ...`` tried as a new user would, against a running gateway; and
``gateway check`` on routes that reference the registry."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway import config as config_module
from gateway.app import Gateway
from gateway.registry import Registry
from gateway.store.embedded import EmbeddedStore
from tests.cli_support import run_cli, run_cli_sync, run_main
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import named_app
from tests.models_support import admin, call, models_document, served_by

pytestmark = pytest.mark.timeout(120)

COMMANDS = ("list", "show", "register", "alias", "promote", "delete", "history")


@pytest.fixture
async def gateway(start_app: StartApp, start_gateway: StartGateway) -> Gateway:
    upstreams = {name: await start_app(named_app(name)) for name in ("v1", "v2")}
    return await start_gateway(models_document(upstreams))


def at(gateway: Gateway) -> tuple[str, str]:
    return "--admin", f"http://127.0.0.1:{gateway.admin_port}"


def test_every_command_has_help() -> None:
    done = run_cli_sync("models", "--help")
    assert done.returncode == 0, done.describe()
    for command in COMMANDS:
        assert command in done.stdout
    for command in COMMANDS:
        done = run_cli_sync("models", command, "--help")
        assert done.returncode == 0 and "usage: gateway models " + command in done.stdout, (
            done.describe()
        )
        assert "--json" in done.stdout and "--admin" in done.stdout


async def test_a_new_users_walk_through(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], http: aiohttp.ClientSession
) -> None:
    admin_url = at(gateway)
    done = await run_main(capsys, "models", "list", *admin_url)
    assert done.returncode == 0 and "no models registered" in done.stdout, done.describe()

    done = await run_main(
        capsys, "models", "register", "iris", "--backend", "v1", "--meta", "f1=0.91",
        "team=vision", *admin_url,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "iris: version 1 registered (backend v1)\n")
    url_v2 = gateway.config.backends["v2"].url or ""
    done = await run_main(
        capsys, "models", "register", "iris", "--url", url_v2, "--version", "5", *admin_url
    )
    assert done.stdout == f"iris: version 5 registered ({url_v2})\n", done.describe()
    done = await run_main(capsys, "models", "register", "iris", "--backend", "v2", "--json",
                          *admin_url)  # fmt: skip
    assert json.loads(done.stdout)["version"] == 6

    done = await run_main(capsys, "models", "alias", "iris", "champion", "1", *admin_url)
    assert done.stdout == "iris@champion -> version 1 (new alias)\n", done.describe()
    done = await run_main(capsys, "models", "alias", "iris", "challenger", "5", *admin_url)
    assert done.returncode == 0
    assert await served_by(http, gateway) == "v1"

    done = await run_main(capsys, "models", "list", *admin_url)
    assert done.stdout.splitlines()[1].split() == ["iris", "3", "6", "challenger=5", "champion=1"]
    done = await run_main(capsys, "models", "show", "iris", *admin_url)
    assert "metadata f1=0.91 team=vision" in done.stdout, done.describe()
    assert "route r: champion model:iris@champion, challenger model:iris@challenger" in (
        done.stdout
    )
    shown = json.loads(
        (await run_main(capsys, "models", "show", "iris", "--json", *admin_url)).stdout
    )
    assert shown["aliases"] == {"champion": 1, "challenger": 5}

    # A conditional move that lost the race is refused, in one line.
    done = await run_main(
        capsys, "models", "alias", "iris", "champion", "6", "--expect", "5", *admin_url
    )
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "409 iris@champion points at 1, not 5" in done.stderr

    done = await run_main(capsys, "models", "promote", "iris", *admin_url)
    assert done.returncode == 0, done.describe()
    assert done.stdout.splitlines() == [
        "iris: champion -> version 5 (previous: 1); challenger cleared",
        "route r: challenger weight 0",
    ]
    assert await served_by(http, gateway) == "v2"

    done = await run_main(capsys, "models", "delete", "iris", "5", *admin_url)
    assert done.returncode == 1 and "version_in_use" not in done.stderr
    assert "iris version 5 is what champion point(s) at" in done.stderr
    done = await run_main(capsys, "models", "delete", "iris", "6", *admin_url)
    assert done.stdout == "iris: version 6 deleted\n"

    done = await run_main(capsys, "models", "history", "iris", *admin_url)
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["#", "TIME", "ACTOR", "ACTION", "WHAT", "REASON"]
    whats = [" ".join(line.split()[4:]) for line in lines[1:]]
    promoted = "promoted iris@challenger (version 5)"
    assert whats == [
        "register version 1 -", "register version 5 -", "register version 6 -",
        "alias @champion -> 1 -", "alias @challenger -> 5 -",
        f"alias @champion -> 5 (was 1) {promoted}", f"alias @previous -> 1 {promoted}",
        f"unalias @challenger cleared (was 5) {promoted}", "delete version 6 -",
    ]  # fmt: skip
    history = json.loads((await run_main(capsys, "models", "history", "iris", "--json",
                                         *admin_url)).stdout)  # fmt: skip
    assert len(history["history"]) == 9


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("show", "nobody"), "404 no model named 'nobody'"),
        (("history", "nobody"), "404 no model named 'nobody'"),
        (("alias", "iris", "champion", "seven"), "a version is a number from 1, got 'seven'"),
        (("alias", "iris", "champion", "0"), "a version is a number from 1, got '0'"),
        (("alias", "iris", "champion", "\u00b2"), "a version is a number from 1, got '\u00b2'"),
        (("alias", "iris", "champion", "1", "--expect", "\u00b2"), "a version is a number"),
        (("alias", "iris", "champion", "9"), "404 model 'iris' has no version 9"),
        (("delete", "iris", "x"), "a version is a number from 1, got 'x'"),
        (("delete", "iris", "\u00b2"), "a version is a number from 1, got '\u00b2'"),
        (("delete", "iris", "9"), "404 model 'iris' has no version 9"),
        (("register", "iris", "--url", "not-a-url"), "--url must be an http:// or https:// URL"),
        (("register", "iris", "--url", "http://h:99999"), "--url must be an http://"),
        (("register", "iris", "--backend", "nope"), "backend must name a backend of the config"),
        (("register", "iris", "--backend", "v1", "--version", "-3"), "a version is a number"),
        (("register", "iris", "--backend", "v1", "--meta", "novalue"), "--meta takes KEY=VALUE"),
        (("register", "bad name", "--backend", "v1"), "a model name must be 1-128 of"),
        (("promote", "nobody"), "404 no model named 'nobody'"),
    ],
)
async def test_bad_input_is_one_line_and_exit_1(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], says: str
) -> None:
    await Registry(_store_of(gateway)).register("iris", backend="v1")
    done = await run_main(capsys, "models", *args, *at(gateway))
    assert done.returncode == 1, done.describe()
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.describe()
    assert says in done.stderr, done.describe()


def _store_of(gateway: Gateway) -> EmbeddedStore:
    assert isinstance(gateway.store, EmbeddedStore)
    return gateway.store


async def test_bad_input_as_a_process_has_no_traceback(gateway: Gateway) -> None:
    for args in (
        ("show", "nobody"),
        ("register", "iris", "--url", "ftp://x"),
        ("alias", "iris", "champion", "v2"),
    ):
        done = await run_cli("models", *args, *at(gateway))
        assert done.returncode == 1 and "Traceback" not in done.output, done.describe()
        assert len(done.stderr.splitlines()) == 1
    done = await run_cli("models", "list", "--admin", "http://127.0.0.1:1")
    assert done.returncode == 1 and "cannot reach the admin API" in done.stderr
    done = await run_cli("models", "register", "iris")  # neither --backend nor --url
    assert done.returncode == 2 and "one of the arguments --backend --url is required" in (
        done.stderr
    )


async def test_a_promoted_route_is_shown_by_status_and_the_route_view(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], http: aiohttp.ClientSession
) -> None:
    url = admin(gateway, "/models/iris")
    await call(http, "POST", url + "/versions", {"backend": "v1"})
    await call(http, "PUT", url + "/aliases/champion", {"version": 1})
    done = await run_main(capsys, "status", *at(gateway))
    assert done.stdout.splitlines()[1].split()[:3] == ["r", "v1", "-"], done.describe()


# --- gateway check ---------------------------------------------------------------------------


def _config_file(tmp_path: Path, state: Path, **route: object) -> Path:
    document = {
        "state": {"backend": "embedded", "path": str(state)},
        "backends": {"v1": {"url": "http://127.0.0.1:8001"}},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "champion": "model:iris@champion",
                "challenger": "model:iris@challenger",
                "shadow": {"target": "model:iris@7", "sample_rate": 0.1},
                **route,
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_check_accepts_references_and_warns_about_what_is_not_registered(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state.db"
    path = _config_file(tmp_path, state)
    done = await run_cli("check", "-c", str(path))
    assert done.returncode == 0, done.describe()
    assert not state.exists()  # check creates no store
    assert done.stderr.splitlines() == [
        "  warning: routes[0].champion: model:iris@champion: no model 'iris' in the registry "
        "yet (until then it serves nothing)",
        "  warning: routes[0].challenger: model:iris@challenger: no model 'iris' in the "
        "registry yet (until then it serves nothing)",
        "  warning: routes[0].shadow.target: model:iris@7: no model 'iris' in the registry "
        "yet (until then it serves nothing)",
    ]
    store = EmbeddedStore(state)
    try:
        registry = Registry(store)
        await registry.register("iris", backend="v1")
        await registry.move_alias("iris", "champion", 1)
    finally:
        await store.close()
    done = await run_cli("check", "-c", str(path))
    assert done.returncode == 0, done.describe()
    assert [line.split(": ", 2)[1] for line in done.stderr.splitlines()] == [
        "routes[0].challenger",
        "routes[0].shadow.target",
    ]
    assert "alias 'challenger' of model 'iris' points at no version yet" in done.stderr
    assert "model 'iris' has no version 7 yet" in done.stderr


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("model:iris", "routes[0].challenger: a registry reference is model:NAME@ALIAS"),
        ("model:@champion", "routes[0].challenger: a registry reference is model:NAME@ALIAS"),
        ("model:iris@0", "routes[0].challenger: versions start at 1, got 'model:iris@0'"),
        ("model:ir is@x", "routes[0].challenger: a registry reference is model:NAME@ALIAS"),
        ("model:iris@champion", "routes[0].challenger: must differ from the champion"),
    ],
)
def test_bad_references_are_config_errors(reference: str, problem: str) -> None:
    document = {
        "backends": {"v1": {"url": "http://127.0.0.1:8001"}},
        "routes": [
            {"name": "r", "match": {"path_prefix": "/"}, "champion": "model:iris@champion",
             "challenger": reference},
        ],
    }  # fmt: skip
    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(document, environ={})
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


def test_auto_promote_needs_a_promotable_route() -> None:
    document = {
        "backends": {"v1": {"url": "http://127.0.0.1:8001"}},
        "routes": [
            {"name": "r", "match": {"path_prefix": "/"}, "champion": "model:iris@champion",
             "challenger": "model:iris@7", "canary": {"steps": [0.5], "auto_promote": True}},
        ],
    }  # fmt: skip
    with pytest.raises(config_module.ConfigError) as error:
        config_module.parse(document, environ={})
    assert error.value.problems[0].startswith("routes[0].canary.auto_promote: a promotion")
    document["routes"][0]["challenger"] = "model:iris@challenger"  # type: ignore[index]
    config_module.parse(document, environ={})
