"""The status page at ``/`` of the admin listener, in a real headless Chromium driven by
Playwright, against a real gateway with real model servers: what a person sees, after a
weight change, a canary's start and with a token.

The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or ``GATEWAY_TEST_CHROMIUM``);
Playwright downloads no browser here. A screenshot of the page is left in
``test-artifacts/status-page.png`` (or ``$GATEWAY_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.demo import ModelBehaviour, model_server_app
from tests.cli_support import ROOT
from tests.conftest import StartApp, StartGateway
from tests.helpers.ports import free_port
from tests.helpers.tools import executable, missing
from tests.helpers.waiting import wait_until
from tests.support import admin_url, gateway_document, proxy_url

if TYPE_CHECKING:
    from playwright.async_api import Browser, Locator, Page

TOKEN = "status-s3cret"
# Long enough for a page that refreshes every 2 s to show a change, and a slow CI machine.
SEEN_WITHIN_MS = 15_000


def artefacts() -> Path:
    where = Path(os.environ.get("GATEWAY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    chromium = executable("chromium", "apt-get install chromium", env="GATEWAY_TEST_CHROMIUM")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        missing("playwright", "pip install -e '.[test]'")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium,
            # As root in a container Chromium needs --no-sandbox; CI runs as root.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
            timeout=30_000,
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(SEEN_WITHIN_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        await context.close()
    assert errors == [], f"the page's JavaScript failed: {errors}"


async def start_models_and_gateway(
    start_app: StartApp, start_gateway: StartGateway, **admin: Any
) -> Gateway:
    champion = await start_app(model_server_app(ModelBehaviour("sentiment-v1")))
    # A challenger whose scores differ on about a third of the inputs: some shadow
    # comparisons disagree.
    challenger = await start_app(model_server_app(ModelBehaviour("sentiment-v2", bias=0.05)))
    document = gateway_document(
        {"sentiment-v1": {"url": champion}, "sentiment-v2": {"url": challenger}},
        [
            {
                "name": "sentiment",
                "match": {"path_prefix": "/v1/models/sentiment"},
                "champion": "sentiment-v1",
                "challenger": "sentiment-v2",
                "split": {"challenger_weight": 0.1},
                "shadow": {
                    "sample_rate": 1.0,
                    "compare": {"protocol": "tfserving", "abs_tol": 0.01,
                                "ignore": ["$.model_version"]},
                },
                # Too few requests ever to advance: the canary holds where it starts.
                "canary": {"steps": [0.1, 0.5, 1.0], "evaluation_interval_seconds": 0.2,
                           "step_interval_seconds": 600, "min_requests": 100_000},
            },
            {
                "name": "chat",
                "match": {"path_prefix": "/v1/chat/completions"},
                "champion": "sentiment-v1",
                "challenger": "sentiment-v2",
                "split": {"challenger_weight": 0.2, "key": "header:X-User-ID"},
            },
        ],
        admin=admin,
    )  # fmt: skip
    return await start_gateway(document)


async def send_predictions(http: aiohttp.ClientSession, gateway: Gateway, n: int) -> int:
    """``n`` predictions; returns how many the champion answered (those are shadowed)."""
    by_champion = 0
    for i in range(n):
        async with http.post(
            proxy_url(gateway, "/v1/models/sentiment:predict"),
            json={"instances": [f"text number {i}"]},
            headers={"X-Request-ID": f"status-{i}"},
        ) as r:
            assert r.status == 200, await r.text()
            by_champion += r.headers["X-Gateway-Variant"] == "champion"
    return by_champion


async def api(http: aiohttp.ClientSession, gateway: Gateway, path: str, **kw: Any) -> Any:
    async with http.request(kw.pop("method", "GET"), admin_url(gateway, path), **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def card(page: Page, route: str) -> Locator:
    return page.locator(f'section.route[data-route="{route}"]')


async def expect_text(locator: Locator, pattern: str) -> None:
    from playwright.async_api import expect

    await expect(locator).to_have_text(re.compile(pattern), timeout=SEEN_WITHIN_MS)


async def test_what_a_person_sees_after_a_weight_change_and_a_canary_start(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    page: Page,
) -> None:
    gateway = await start_models_and_gateway(start_app, start_gateway)
    shadowed = await send_predictions(http, gateway, 40)

    async def settled() -> dict[str, Any] | None:
        shadow = (await api(http, gateway, "/api/v1/routes/sentiment"))["shadow"]
        done = shadow["outcomes"]["match"] + shadow["outcomes"]["mismatch"]
        return shadow if done == shadowed and shadow["in_flight"] == 0 else None

    shadow = await wait_until(settled, "every shadow comparison to be counted", within=15)
    assert shadow is not None
    match, compared = shadow["outcomes"]["match"], shadowed
    assert 0 < match < compared  # some agree, some do not: the counts mean something

    await page.goto(admin_url(gateway, "/"))
    sentiment, chat = card(page, "sentiment"), card(page, "chat")
    await expect_text(page.locator("#summary"), r"^2 routes · state store: embedded ok$")
    await expect_text(sentiment.locator("h2"), "^sentiment$")
    await expect_text(chat.locator("h2"), "^chat$")
    await expect_text(sentiment.locator('[data-field="weight"]'), r"^ 10 %$")
    await expect_text(chat.locator('[data-field="weight"]'), r"^ 20 %$")
    await expect_text(sentiment.locator('[data-field="canary-state"]'), "^idle$")
    await expect_text(sentiment.locator('[data-field="canary-step"]'), r"^no step yet \(3 steps\)$")
    await expect_text(
        sentiment.locator('[data-field="agreement"]'),
        rf"^{100 * match / compared:.1f} % \({match} of {compared} agree\)$",
    )
    assert await chat.locator('[data-field="canary-state"]').count() == 0  # no canary

    # An operator raises chat's weight: the page shows it by itself, without a reload.
    await api(http, gateway, "/api/v1/routes/chat/weight", method="PUT",
              json={"challenger_weight": 0.35})  # fmt: skip
    await expect_text(chat.locator('[data-field="weight"]'), r"^ 35 %$")
    await expect_text(chat, r"champion\s*sentiment-v1 65 %")

    # And starts sentiment's canary: state, step k of n, its weight, the last decision.
    await api(http, gateway, "/api/v1/routes/sentiment/canary/start", method="POST")
    await expect_text(sentiment.locator('[data-field="canary-step"]'), r"^step 1 of 3$")
    await expect_text(sentiment.locator(".steps .current"), r"^10 %$")
    decision = await wait_until(_decided(http, gateway), "the canary's first decision", within=15)
    # A step lasts step_interval_seconds whatever the counts: the controller holds.
    assert (decision["action"], decision["reason"]) == ("hold", "step_in_progress"), decision
    await expect_text(
        sentiment.locator('[data-field="canary-decision"]'),
        r"^hold \(step_in_progress\): step runs \d+s more$",
    )
    await expect_text(sentiment.locator('[data-field="canary-state"]'), "^progressing$")

    shot = artefacts() / "status-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def _decided(http: aiohttp.ClientSession, gateway: Gateway) -> Any:
    async def decision() -> dict[str, Any] | None:
        view = await api(http, gateway, "/api/v1/routes/sentiment/canary")
        last = view.get("last_decision")
        return last if isinstance(last, dict) else None

    return decision


async def test_with_a_token_no_route_data_until_it_is_given(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    page: Page,
) -> None:
    gateway = await start_models_and_gateway(start_app, start_gateway, token=TOKEN)
    authorizations: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            authorizations.append(request.headers.get("authorization"))
            if "/api/v1/" in request.url
            else None
        ),
    )
    await page.goto(admin_url(gateway, "/"))
    form = page.locator("#token-form")
    await form.wait_for(state="visible")
    body = await page.locator("body").inner_text()
    for secret in ("sentiment", "chat", "sentiment-v1", "/v1/models"):
        assert secret not in body, body
    assert await page.locator("section.route").count() == 0

    await page.fill("#token", "not-the-token")
    await page.click("#token-form button")
    await expect_text(page.locator("#problem"), "^That token was refused.$")
    assert await page.locator("section.route").count() == 0

    await page.fill("#token", TOKEN)
    await page.click("#token-form button")
    await expect_text(card(page, "sentiment").locator("h2"), "^sentiment$")
    assert await form.is_hidden()
    assert f"Bearer {TOKEN}" in authorizations
    # Kept for the tab: a reload shows the routes at once, and "forget" asks again.
    await page.reload()
    await expect_text(card(page, "chat").locator("h2"), "^chat$")
    assert await page.evaluate("sessionStorage.getItem('gateway-admin-token')") == TOKEN
    await page.click("#forget-token")
    await form.wait_for(state="visible")
    assert await page.locator("section.route").count() == 0


async def test_the_page_and_its_files_are_served_without_a_token(
    start_app: StartApp, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gateway = await start_models_and_gateway(start_app, start_gateway, token=TOKEN)
    for path, kind in (("/", "text/html"), ("/static/status.js", "text/javascript"),
                       ("/static/status.css", "text/css")):  # fmt: skip
        async with http.get(admin_url(gateway, path)) as r:
            assert r.status == 200 and r.content_type == kind, path
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            text = await r.text()
        # The page holds no data of its own: route names only come from the API.
        assert "sentiment" not in text, path
    async with http.get(admin_url(gateway, "/api/v1/routes")) as r:
        assert r.status == 401
    async with http.get(admin_url(gateway, "/static/../config.py")) as r:
        assert r.status == 404


async def test_endpoint_health_shows_an_ejected_endpoint(
    start_app: StartApp,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    page: Page,
) -> None:
    live = await start_app(model_server_app(ModelBehaviour("v1")))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    document = gateway_document(
        {
            "v1": {
                "endpoints": [live, dead],
                "outlier_detection": {"consecutive_failures": 1, "base_ejection_seconds": 600},
            }
        },
        [{"name": "model", "match": {"path_prefix": "/v1/models"}, "champion": "v1"}],
    )
    gateway = await start_gateway(document)

    async def ejected() -> bool:
        # Requests until the dead endpoint has failed once and is out of rotation (the
        # failed connection is retried on the live one: the client sees no error).
        async with http.post(
            proxy_url(gateway, "/v1/models/m:predict"), json={"instances": ["x"]}
        ) as r:
            assert r.status == 200, await r.text()
        view = await api(http, gateway, "/api/v1/routes/model")
        return any(not e["healthy"] for e in view["endpoints"]["v1"])

    await wait_until(ejected, "the dead endpoint to be ejected", within=15)
    await page.goto(admin_url(gateway, "/"))
    endpoints = card(page, "model").locator("ul.endpoints li")
    await expect_text(endpoints.filter(has_text=dead), rf"^○ out of rotation {dead} \(.+\)$")
    await expect_text(endpoints.filter(has_text=live), rf"^● healthy {live}$")
    await page.screenshot(path=str(artefacts() / "status-page-endpoints.png"), full_page=True)
