"""The admin listener at the edge: the Host check without a token (DNS rebinding), a
deeply nested weight body, and /metrics behind the token on request."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.admin.common import loopback_host
from gateway.app import Gateway
from tests.conftest import StartApp, StartGateway
from tests.helpers.apps import named_app
from tests.helpers.raw import RawConnections
from tests.support import admin_url, gateway_document

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret"


async def admin_gateway(
    start_app: StartApp, start_gateway: StartGateway, **admin: object
) -> Gateway:
    one, two = await start_app(named_app("one")), await start_app(named_app("two"))
    return await start_gateway(
        gateway_document(
            {"one": {"url": one}, "two": {"url": two}},
            [{"name": "m", "match": {"path_prefix": "/m"}, "champion": "one", "challenger": "two"}],
            admin=admin,
        )
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:9090", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.0.0.1:9090", True),
        ("127.8.9.10:1", True),
        ("[::1]", True),
        ("[::1]:9090", True),
        ("::1", True),
        ("evil.example", False),
        ("evil.example:9090", False),
        ("localhost.evil.example", False),
        ("10.0.0.1:9090", False),
        ("[::2]:9090", False),
        ("", False),
        ("[::1", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert loopback_host(host) is loopback


async def test_without_a_token_only_loopback_hosts_are_answered(
    start_app: StartApp, start_gateway: StartGateway, raw: RawConnections
) -> None:
    """A page on evil.example that resolves its name to 127.0.0.1 (DNS rebinding) makes
    the browser send ``Host: evil.example``: refused, whatever the path."""
    gateway = await admin_gateway(start_app, start_gateway)
    for path in ("/api/v1/routes", "/metrics", "/healthz"):
        for host, status in (("evil.example:9090", 403), ("localhost:9090", 200)):
            conn = await raw.open(gateway.admin_port)
            await conn.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            answer = await conn.answer()
            assert answer.status == status, (path, host)
            if status == 403:
                assert answer.json()["error"]["code"] == "forbidden_host"
    conn = await raw.open(gateway.admin_port)
    await conn.send(
        b"PUT /api/v1/routes/m/weight HTTP/1.1\r\nHost: evil.example\r\n"
        b'Content-Length: 25\r\n\r\n{"challenger_weight": 1}'
    )
    assert (await conn.answer()).status == 403
    assert gateway.routes["m"].weight == 0.0


async def test_with_a_token_any_host_may_call(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await admin_gateway(start_app, start_gateway, token=TOKEN)
    headers = {"Host": "gateway.internal:9090", "Authorization": f"Bearer {TOKEN}"}
    async with http.get(admin_url(gateway, "/api/v1/routes"), headers=headers) as response:
        assert response.status == 200


async def test_a_deeply_nested_weight_is_a_400(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await admin_gateway(start_app, start_gateway)
    url = admin_url(gateway, "/api/v1/routes/m/weight")
    for depth in (1000, 100_000):
        body = b'{"challenger_weight": ' + b"[" * depth + b"]" * depth + b"}"
        async with http.put(url, data=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["code"] in ("bad_weight", "bad_json")
    async with http.put(url, json={"challenger_weight": {"a": [1]}}) as response:
        assert response.status == 400
        assert "JSON object" in (await response.json())["error"]["message"]


async def test_metrics_can_require_the_token(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await admin_gateway(start_app, start_gateway, token=TOKEN, metrics_auth=True)
    url = admin_url(gateway, "/metrics")
    async with http.get(url) as response:
        assert response.status == 401
    async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        assert "gateway_requests_total" in await response.text()
    async with http.get(admin_url(gateway, "/healthz")) as response:
        assert response.status == 200  # probes need no token
    # By default /metrics stays open, as Prometheus scrapes expect.
    gateway = await admin_gateway(start_app, start_gateway, token=TOKEN)
    async with http.get(admin_url(gateway, "/metrics")) as response:
        assert response.status == 200
