"""The ``gateway`` command as an operator runs it: ``status`` and ``weight`` against a
running gateway's admin API, and ``gateway demo`` from banner to Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import time

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from tests.cli_support import CLI, ROOT, CliResult, cli_env, run_cli
from tests.conftest import StartApp, StartGateway
from tests.helpers.ports import free_port
from tests.support import admin_url, gateway_document

TOKEN = "cli-s3cret"


async def start_cli_gateway(start_gateway: StartGateway, token: str = "") -> Gateway:
    # The backends are never called: status and weight only talk to the admin listener.
    document = gateway_document(
        {
            "sentiment-v1": {"url": "http://127.0.0.1:9"},
            "sentiment-v2": {"url": "http://127.0.0.1:9"},
        },
        [
            {
                "name": "sentiment",
                "match": {"path_prefix": "/v1/models/sentiment"},
                "champion": "sentiment-v1",
                "challenger": "sentiment-v2",
                "split": {"challenger_weight": 0.1},
            },
            {
                "name": "chat",
                "match": {"path_prefix": "/v1/chat/completions"},
                "champion": "sentiment-v1",
                "split": {"key": "header:X-User-ID"},
            },
        ],
        admin={"token": token},
    )
    return await start_gateway(document)


def assert_clean_failure(result: CliResult, *fragments: str) -> None:
    """Exit 1, a message naming the problem on stderr, no traceback."""
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.output, result.describe()
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.describe()}"


def table(result: CliResult) -> list[list[str]]:
    assert result.returncode == 0, result.describe()
    return [line.split() for line in result.stdout.splitlines() if line.strip()]


async def test_status_table_and_json(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_cli_gateway(start_gateway)
    admin = admin_url(gateway)
    text, as_json = await asyncio.gather(
        run_cli("status", "--admin", admin), run_cli("status", "--admin", admin, "--json")
    )
    rows = table(text)
    assert rows[0][0] == "ROUTE"
    assert rows[1:] == [
        ["sentiment", "sentiment-v1", "sentiment-v2", "0.1", "2/2", "request_id"],
        ["chat", "sentiment-v1", "-", "0", "1/1", "header:X-User-ID"],
    ]
    assert as_json.returncode == 0, as_json.describe()
    async with http.get(admin_url(gateway, "/api/v1/routes")) as r:
        assert json.loads(as_json.stdout) == await r.json()


async def test_status_with_a_token(start_gateway: StartGateway) -> None:
    gateway = await start_cli_gateway(start_gateway, token=TOKEN)
    admin = admin_url(gateway)
    missing, wrong, flag, from_env = await asyncio.gather(
        run_cli("status", "--admin", admin),
        run_cli("status", "--admin", admin, "--token", "nope"),
        run_cli("status", "--admin", admin, "--token", TOKEN),
        # Both the token and the admin URL may come from the environment.
        run_cli("status", env=cli_env(GATEWAY_ADMIN_TOKEN=TOKEN, GATEWAY_ADMIN_URL=admin)),
    )
    for result in (missing, wrong):
        assert_clean_failure(result, "401", "/api/v1/routes")
    assert "nope" not in wrong.output  # a token, even a wrong one, is not echoed
    assert table(flag)[1][0] == "sentiment"
    assert table(from_env) == table(flag)


async def test_weight_sets_the_weight(start_gateway: StartGateway) -> None:
    gateway = await start_cli_gateway(start_gateway)
    result = await run_cli("weight", "sentiment", "0.35", "--admin", admin_url(gateway))
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() == "sentiment: challenger weight 0.35"
    assert gateway.routes["sentiment"].weight == 0.35
    after = await run_cli("status", "--admin", admin_url(gateway))
    assert table(after)[1] == [
        "sentiment", "sentiment-v1", "sentiment-v2", "0.35", "2/2", "request_id"
    ]  # fmt: skip


async def test_weight_with_a_token(start_gateway: StartGateway) -> None:
    gateway = await start_cli_gateway(start_gateway, token=TOKEN)
    admin = admin_url(gateway)
    refused = await run_cli("weight", "sentiment", "0.5", "--admin", admin)
    assert_clean_failure(refused, "401")
    assert gateway.routes["sentiment"].weight == 0.1
    accepted = await run_cli("weight", "sentiment", "0.5", "--admin", admin, "--token", TOKEN)
    assert accepted.returncode == 0, accepted.describe()
    assert gateway.routes["sentiment"].weight == 0.5


async def test_weight_refusals_are_clear(start_gateway: StartGateway) -> None:
    gateway = await start_cli_gateway(start_gateway)
    admin = admin_url(gateway)
    too_big, negative, unknown, solo, not_a_number = await asyncio.gather(
        run_cli("weight", "sentiment", "1.5", "--admin", admin),
        run_cli("weight", "sentiment", "-0.1", "--admin", admin),
        run_cli("weight", "nope", "0.5", "--admin", admin),
        run_cli("weight", "chat", "0.2", "--admin", admin),
        run_cli("weight", "sentiment", "half", "--admin", admin),
    )
    assert_clean_failure(too_big, "400", "between 0 and 1", "1.5")
    assert_clean_failure(negative, "400", "between 0 and 1", "-0.1")
    assert_clean_failure(unknown, "404", "'nope'")
    assert_clean_failure(solo, "409", "'chat'")
    # argparse's own usage error.
    assert not_a_number.returncode == 2, not_a_number.describe()
    assert "invalid float value: 'half'" in not_a_number.stderr
    assert gateway.routes["sentiment"].weight == 0.1
    assert gateway.routes["chat"].weight == 0.0


async def test_unreachable_admin_api() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    status, weight = await asyncio.gather(
        run_cli("status", "--admin", closed),
        run_cli("weight", "sentiment", "0.5", "--admin", closed),
    )
    for result in (status, weight):
        assert_clean_failure(result, "cannot reach the admin API", closed)
        assert result.stdout == ""


async def test_admin_url_pointing_at_something_else(start_app: StartApp) -> None:
    """A wrong --admin (some other web server answering 200 with HTML) is an operator
    mistake, not a crash."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    other = await start_app(app)
    status, weight = await asyncio.gather(
        run_cli("status", "--admin", other),
        run_cli("weight", "sentiment", "0.5", "--admin", other),
    )
    for result in (status, weight):
        assert_clean_failure(result, other)


# --- gateway demo --------------------------------------------------------------------------


async def read_banner(stream: asyncio.StreamReader, deadline: float) -> list[str]:
    """Lines printed until the sentiment curl line, waiting at most until ``deadline``."""
    lines: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no curl line in the banner within the deadline: {lines}"
        line = await asyncio.wait_for(stream.readline(), remaining)
        assert line, f"demo closed stdout before printing a curl line: {lines}"
        lines.append(line.decode().rstrip("\n"))
        if lines[-1].strip().startswith("curl") and ":predict" in lines[-1]:
            return lines


def curl_request(line: str) -> tuple[str, dict[str, str], str]:
    """URL, headers and body of a ``curl URL -H ... -d ...`` line, as curl would send."""
    words = shlex.split(line)
    assert words[0] == "curl"
    url, headers, data = "", {}, ""
    i = 1
    while i < len(words):
        word = words[i]
        if word == "-H":
            name, _, value = words[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif word in ("-d", "--data"):
            data = words[i + 1]
            i += 2
        elif word.startswith("-"):
            i += 1
        else:
            url = word
            i += 1
    headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    return url, headers, data


async def test_demo_answers_its_curl_and_stops_on_ctrl_c(http: aiohttp.ClientSession) -> None:
    port = free_port()
    admin_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "demo",
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        banner = await read_banner(proc.stdout, time.monotonic() + 15)
        text = "\n".join(banner)
        assert f"http://127.0.0.1:{port}" in text
        assert f"http://127.0.0.1:{admin_port}" in text

        url, headers, data = curl_request(banner[-1])
        assert url.startswith(f"http://127.0.0.1:{port}/")
        async with http.post(url, data=data, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Gateway-Variant"] in ("champion", "challenger")
            if "X-Request-ID" in headers:
                assert r.headers["X-Request-ID"] == headers["X-Request-ID"]
            body = await r.json()
        assert len(body["predictions"]) == 1

        proc.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stdout + stderr, stderr.decode()
