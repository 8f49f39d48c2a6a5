"""``gateway demo``: two small built-in model servers and a gateway in front of them.

The servers speak two common model APIs so the demo looks like real traffic:
TF Serving's ``:predict`` (class scores) and OpenAI's ``/v1/chat/completions`` (with
``stream: true`` as server-sent events and a ``usage`` block). The challenger answers a
little differently from the champion, and can be told to fail a share of requests.

The ``sentiment`` route runs a canary, started with the demo and fed by a built-in load
generator: a healthy challenger walks its steps to ``awaiting_promotion`` in about a
minute; one with ``--error-rate 0.2`` is rolled back within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import config as config_module
from gateway.app import Gateway
from gateway.core.canary import Action

# What the load generator asks the sentiment model about.
TEXTS = (
    "I love this",
    "this is terrible",
    "not bad at all",
    "could be better",
    "absolutely wonderful",
    "I want my money back",
    "it works",
    "meh",
)


def gateway_command() -> str:
    """How to run ``gateway`` from where the demo was started, for the banner: its name
    when PATH finds this installation's, else its path (``.venv/bin/gateway`` after ``make
    demo``, where the virtual environment is not activated)."""
    # The script beside this interpreter, not resolved: a venv's python is a symlink.
    script = Path(sys.executable).parent / "gateway"
    if not script.is_file():
        return shlex.join([sys.executable, "-m", "gateway.cli"])
    found = shutil.which("gateway")
    if found is not None and Path(found).resolve() == script.resolve():
        return "gateway"
    cwd = Path.cwd()
    if cwd != Path(cwd.anchor) and script.is_relative_to(cwd):
        return shlex.quote(str(script.relative_to(cwd)))
    return shlex.quote(str(script))


@dataclass(frozen=True)
class ModelBehaviour:
    name: str
    # Added to the positive-class score: the challenger "disagrees a little".
    bias: float = 0.0
    error_rate: float = 0.0
    reply_suffix: str = ""
    latency_seconds: float = 0.0


def _scores(text: str, bias: float) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    # The challenger disagrees on about a third of the inputs, not on all of them.
    shift = bias if digest[1] % 3 == 0 else 0.0
    positive = min(1.0, max(0.0, digest[0] / 255 + shift))
    return [round(1.0 - positive, 4), round(positive, 4)]


def model_server_app(
    behaviour: ModelBehaviour, rng: random.Random | None = None
) -> web.Application:
    """A tiny model server. Deterministic given the input, apart from the error rate."""
    rng = rng or random.Random()

    def should_fail() -> bool:
        return behaviour.error_rate > 0 and rng.random() < behaviour.error_rate

    async def predict(request: web.Request) -> web.StreamResponse:
        if behaviour.latency_seconds:
            await asyncio.sleep(behaviour.latency_seconds)
        if should_fail():
            return web.json_response({"error": "model crashed"}, status=500)
        try:
            body = orjson.loads(await request.read())
            instances = body["instances"]
            texts = [str(item) for item in instances]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.json_response({"error": 'expected {"instances": [...]}'}, status=400)
        return web.json_response(
            {
                "predictions": [_scores(t, behaviour.bias) for t in texts],
                "model_version": behaviour.name,
            }
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        if behaviour.latency_seconds:
            await asyncio.sleep(behaviour.latency_seconds)
        if should_fail():
            return web.json_response({"error": {"message": "model crashed"}}, status=500)
        try:
            body = orjson.loads(await request.read())
            messages = body["messages"]
            prompt = " ".join(str(m.get("content", "")) for m in messages)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return web.json_response({"error": {"message": "expected messages"}}, status=400)
        words = f"You said: {prompt}.{behaviour.reply_suffix}".split()
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": len(words),
            "total_tokens": len(prompt.split()) + len(words),
        }
        common: dict[str, Any] = {
            "id": f"chatcmpl-{rng.getrandbits(48):x}",
            "created": int(time.time()),
            "model": behaviour.name,
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    **common,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(words):
            chunk = {
                **common,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
            }
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.05)
        final = {**common, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        await response.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": behaviour.name})

    app = web.Application()
    app.router.add_post("/v1/models/{model}:predict", predict)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", health)
    return app


@dataclass(frozen=True)
class CanaryTimings:
    """The demo canary's pace. The defaults walk a healthy challenger through its four
    steps in about a minute at the load generator's default rate (each step needs
    ``min_requests`` per variant: 0.1 x 50 requests/s gives the challenger 60 in its
    first 12 s), and roll back one failing a fifth of its requests within about ten
    seconds. Tests pass faster ones."""

    steps: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    step_interval_seconds: float = 12.0
    evaluation_interval_seconds: float = 2.0
    min_requests: int = 30

    def canary_block(self) -> dict[str, Any]:
        block = asdict(self)
        block["steps"] = list(self.steps)
        return block


def demo_config(
    champion_url: str,
    challenger_url: str,
    port: int,
    admin_port: int,
    weight: float,
    state_path: str,
    canary: CanaryTimings | None = None,
) -> config_module.GatewayConfig:
    """The demo's gateway. ``weight``: the chat route's challenger weight (and the
    sentiment route's until its canary starts, which then sets it)."""
    canary = canary or CanaryTimings()
    return config_module.parse(
        {
            "server": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            # A fresh state file per demo: each run starts from the weights it was given.
            "state": {"backend": "embedded", "path": state_path},
            "backends": {
                "sentiment-v1": {"url": champion_url, "timeout_seconds": 10},
                "sentiment-v2": {"url": challenger_url, "timeout_seconds": 10},
            },
            "routes": [
                {
                    "name": "sentiment",
                    "match": {"path_prefix": "/v1/models/sentiment"},
                    "champion": "sentiment-v1",
                    "challenger": "sentiment-v2",
                    "split": {"challenger_weight": weight},
                    # The canary the demo starts: it ramps the challenger up step by step
                    # as long as it does as well as the champion, and rolls it back once
                    # it is significantly worse. Watch it with `gateway canary status`.
                    "canary": canary.canary_block(),
                    # Mirror half of the champion's traffic to the challenger and compare:
                    # its small score shift shows up in /api/v1/routes/sentiment/shadow.
                    "shadow": {
                        "sample_rate": 0.5,
                        "compare": {
                            "protocol": "tfserving",
                            "abs_tol": 0.01,
                            "ignore": ["$.model_version"],
                        },
                        "baseline": {
                            "sample_rate": 0.5,
                            "min_samples": 10,
                            "min_noise_samples": 5,
                        },
                    },
                },
                {
                    "name": "chat",
                    "match": {"path_prefix": "/v1/chat/completions"},
                    "champion": "sentiment-v1",
                    "challenger": "sentiment-v2",
                    "split": {"challenger_weight": weight, "key": "header:X-User-ID"},
                    "shadow": {"sample_rate": 1.0, "compare": {"protocol": "openai"}},
                },
            ],
        },
        environ={},
    )


class Demo:
    """The demo's three servers, its load generator and its canary, started and stopped
    together."""

    # The load generator never has more requests than this waiting for an answer: when
    # the gateway is slower than the rate, requests are skipped, not queued.
    MAX_IN_FLIGHT = 16

    def __init__(
        self,
        *,
        port: int = 8080,
        admin_port: int = 9090,
        weight: float = 0.2,
        error_rate: float = 0.0,
        canary: CanaryTimings | None = None,
        load_per_second: float = 50.0,
    ) -> None:
        self.port = port
        self.admin_port = admin_port
        self.weight = weight
        self.canary = canary or CanaryTimings()
        self.load_per_second = load_per_second
        self.champion = ModelBehaviour("sentiment-v1")
        self.challenger = ModelBehaviour(
            "sentiment-v2", bias=0.03, error_rate=error_rate, reply_suffix=" Anything else?"
        )
        self._model_runners: list[web.AppRunner] = []
        self.model_urls: list[str] = []
        self.gateway: Gateway | None = None
        self._state_dir: tempfile.TemporaryDirectory[str] | None = None
        self._load: asyncio.Task[None] | None = None
        # What the load generator got back: status code -> count (0: no answer).
        self.load_statuses: dict[int, int] = {}

    async def start(self) -> None:
        for behaviour in (self.champion, self.challenger):
            runner = web.AppRunner(model_server_app(behaviour), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._model_runners.append(runner)
            host, bound = runner.addresses[0][:2]
            self.model_urls.append(f"http://{host}:{bound}")
        self._state_dir = tempfile.TemporaryDirectory(prefix="gateway-demo-")
        state_path = os.path.join(self._state_dir.name, "state.db")
        cfg = demo_config(
            self.model_urls[0], self.model_urls[1], self.port, self.admin_port, self.weight,
            state_path, self.canary,
        )  # fmt: skip
        self.gateway = Gateway(cfg)
        await self.gateway.start()
        # A fresh state file: the canary is idle, and starts at its first step.
        await self.gateway.controller.command("sentiment", Action.START)
        if self.load_per_second > 0:
            self._load = asyncio.create_task(self._generate_load(), name="demo-load")

    async def stop(self) -> None:
        if self._load is not None:
            self._load.cancel()
            await asyncio.gather(self._load, return_exceptions=True)
        if self.gateway is not None:
            await self.gateway.stop()
        for runner in self._model_runners:
            await runner.cleanup()
        if self._state_dir is not None:
            self._state_dir.cleanup()

    async def _generate_load(self) -> None:
        """``load_per_second`` predict calls to the gateway, each with a request ID of its
        own (the split's key), until cancelled."""
        assert self.gateway is not None
        url = f"http://127.0.0.1:{self.gateway.proxy_port}/v1/models/sentiment:predict"
        run = f"{random.getrandbits(32):08x}"
        rng = random.Random()
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.load_per_second
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                due = loop.time()
                for n in itertools.count(1):
                    if len(in_flight) < self.MAX_IN_FLIGHT:
                        body = {"instances": [rng.choice(TEXTS)]}
                        task = loop.create_task(
                            self._one_request(session, url, f"load-{run}-{n}", body)
                        )
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                    due += interval
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:  # behind: go on at the rate from now rather than burst
                        due = loop.time()
                        await asyncio.sleep(0)
            finally:
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _one_request(
        self, session: aiohttp.ClientSession, url: str, request_id: str, body: dict[str, Any]
    ) -> None:
        status = 0
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.post(url, json=body, headers={"X-Request-ID": request_id}) as r:
                await r.read()
                status = r.status
        self.load_statuses[status] = self.load_statuses.get(status, 0) + 1

    def banner(self) -> str:
        assert self.gateway is not None
        gw = f"http://127.0.0.1:{self.gateway.proxy_port}"
        admin = f"http://127.0.0.1:{self.gateway.admin_port}"
        steps = " -> ".join(f"{w:g}" for w in self.canary.steps)
        gateway = gateway_command()
        if self.load_per_second > 0:
            load = f"{self.load_per_second:g} requests/s of built-in load"
        else:
            load = "no built-in load (--load 0): it waits for your requests"
        return "\n".join(
            [
                "gateway demo is running (Ctrl-C to stop)",
                f"  champion   sentiment-v1  {self.model_urls[0]}",
                f"  challenger sentiment-v2  {self.model_urls[1]}"
                f"  (error rate {self.challenger.error_rate:g})",
                f"  gateway    {gw}",
                f"  admin      {admin}  (the status page; /metrics, /api/v1/routes)",
                "",
                "try:",
                f"  curl -si {gw}/v1/models/sentiment:predict -H 'X-Request-ID: demo-1' "
                '-d \'{"instances": ["I love this"]}\'',
                f"  curl -sN {gw}/v1/chat/completions -H 'X-User-ID: alice' "
                '-d \'{"messages": [{"role": "user", "content": "hello"}], "stream": true}\'',
                f"  curl -s {admin}/api/v1/routes/sentiment/shadow   # champion vs challenger",
                f"  {gateway} status --admin {admin}",
                f"  {gateway} weight chat 0.5 --admin {admin}   # the canary steers sentiment's",
                "",
                f"canary: sentiment's challenger ramps up through weights {steps}, a step every "
                f"{self.canary.step_interval_seconds:g}s or more, under {load};",
                "it is rolled back as soon as it fails significantly more than the champion "
                f"(try {gateway} demo --error-rate 0.2). Watch it on {admin}/ or with:",
                f"  {gateway} canary status sentiment --watch --admin {admin}",
                "and once it is awaiting_promotion (or at any time):",
                f"  {gateway} canary promote sentiment --admin {admin}",
                f"  {gateway} canary rollback sentiment --admin {admin}",
            ]
        )


async def run_demo(
    port: int, admin_port: int, weight: float, error_rate: float, load_per_second: float = 50.0
) -> None:
    demo = Demo(
        port=port,
        admin_port=admin_port,
        weight=weight,
        error_rate=error_rate,
        load_per_second=load_per_second,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await demo.start()
        print(demo.banner(), flush=True)
        await stop.wait()
        print("\nstopping…", flush=True)
    finally:
        await demo.stop()
