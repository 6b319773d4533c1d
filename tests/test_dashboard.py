"""The live `/dashboard` page in a real headless Chromium (Debian's), driven by Playwright.

Tests assert on what the browser renders, not on the HTML served: rows, badges, numbers,
the key prompt, the empty and unreachable states. Every request the page makes is watched;
anything not addressed to the gateway is blocked and fails the test (no CDN, no fonts).
One test runs against the real gateway over a real vLLM engine and keeps a screenshot in
`test-output/dashboard.png`; the rest run against the gateway over the fake vLLM, served
by uvicorn on a loopback port so the browser can reach it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from adapters.base_checkpoint import BaseCheckpoint
from adapters.store import CompiledStore
from gateway.app import create_app
from gateway.config import load_config
from gateway.engine.process import free_port
from gateway.registry import AdapterRegistry
from gateway.registry.artifacts import LocalArtifacts
from gateway.upstream.pool import BackendPool
from tests.conftest import TEST_OUTPUT
from tests.gateway_fakes import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    FakeVllm,
    fake_transport,
    sqlite_registry,
    write_config,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
METRICS_KEY = "sk-metrics-0123456789abcdef"
MINUS = "\u2212"
DASH = "\u2014"
# Long enough for a couple of 2 s polls on a slow machine; nothing asserts on timing.
POLLS_MS = 15_000
MS_COLUMNS = ("ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms")
NUMBER = re.compile(r"^\d{1,3}(,\d{3})*(\.\d+)?$")
PERCENT = re.compile(rf"^([+{MINUS}]\d+\.\d|0\.0)%$")


# ---- browser --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def dashboard(browser: Browser, gateway_url: str,
              requests: list[Request] | None = None) -> Iterator[Page]:
    """`/dashboard` in a fresh 1280x800 browser context, every request it makes appended to
    `requests`; afterwards, no request may have left for anywhere but the gateway."""
    context = browser.new_context(viewport=VIEWPORT)
    foreign: list[str] = []
    if requests is not None:
        context.on("request", lambda request: requests.append(request))

    def only_the_gateway(route: Route) -> None:
        if route.request.url.startswith(gateway_url + "/"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_gateway)
    context.on("request", lambda request: None if request.url.startswith(
        (gateway_url + "/", "data:")) else foreign.append(request.url))
    page = context.new_page()
    page.goto(gateway_url + "/dashboard")
    yield page
    context.close()
    assert foreign == [], f"the page reached outside the gateway: {foreign}"


def row(page: Page, adapter: str):
    return page.locator(f'#rows tr[data-adapter="{adapter}"]')


def cell_text(page: Page, adapter: str, column: str) -> str:
    return row(page, adapter).locator(f'[data-col="{column}"]').inner_text().strip()


def rendered_rows(page: Page) -> list[dict[str, str]]:
    """Every rendered row as {column: text}, in page order."""
    return page.eval_on_selector_all("#rows tr", """rows => rows.map(tr => Object.fromEntries(
        [...tr.querySelectorAll('[data-col]')].map(c => [c.dataset.col, c.innerText.trim()])))""")


def number(text: str) -> float:
    assert NUMBER.match(text), f"not a number: {text!r}"
    return float(text.replace(",", ""))


def percent(text: str) -> float:
    assert PERCENT.match(text), f"not a signed percentage: {text!r}"
    return float(text.replace(MINUS, "-").rstrip("%"))


# ---- the gateway over the fake vLLM, on a real port -----------------------------------

class LiveGateway:
    """A gateway app served by uvicorn in a thread (its own event loop), on a fixed port so
    it can be stopped and served again at the same address."""

    def __init__(self, build: Callable[[], Awaitable[FastAPI]]) -> None:
        self._build = build
        self.app: FastAPI | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server = uvicorn.Server(uvicorn.Config(self.app or FastAPI(), host="127.0.0.1",
                                               port=self.port, log_level="warning"))
        self._server = server

        async def main() -> None:
            if self.app is None:
                self.app = await self._build()
            server.config.app = self.app
            await server.serve()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert self._thread.is_alive(), "the gateway's server thread ended"
            assert time.monotonic() < deadline, "the gateway's server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=30)


@contextmanager
def live_gateway(tmp_path: Path, base_dir: Path, demo_adapters: Path, store_dir: Path,
                 metrics: str = "", acme: str = "") -> Iterator[LiveGateway]:
    """The fake-vLLM gateway of tests/gateway_fakes.py (acme: caps and plain; globex: all of
    `caps`, `pirate` (DoRA) and `plain` (LoRA)), with `metrics` as its `[metrics]` table and
    `acme` as more `[tenants.acme]` keys."""
    vllm = FakeVllm()
    adapters_dir = shutil.copytree(demo_adapters, tmp_path / "adapters")
    (tmp_path / "extra-root").mkdir()
    path = write_config(tmp_path, base_dir, adapters_dir, extra_root=tmp_path / "extra-root",
                        backends=[vllm.url], eager=False, acme=acme)
    if metrics:
        path.write_text(path.read_text() + "\n[metrics]\n" + metrics)
    config = load_config(path)

    async def build() -> FastAPI:
        pool = BackendPool(config.engine.backends,
                           httpx.AsyncClient(transport=fake_transport(vllm)))
        registry = AdapterRegistry(BaseCheckpoint(base_dir),
                                   LocalArtifacts(CompiledStore(store_dir), tmp_path / "uploads"),
                                   config.adapters.roots, pool, sqlite_registry(tmp_path),
                                   uploads=tmp_path / "uploads")
        await registry.add_directory(config.adapters.dir)
        return create_app(config, registry, pool)

    gateway = LiveGateway(build)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def stream(client: httpx.Client, model: str, max_tokens: int = 6) -> None:
    """One streamed completion, read to its end."""
    body = {"model": model, "prompt": "The ocean is", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        text = "".join(response.iter_text())
    assert "data: [DONE]" in text


def wait_for_requests(gateway_url: str, counts: dict[str, int], key: str | None = None) -> dict:
    """`/dashboard/data` once it counts at least `counts` requests per adapter (a request is
    counted when its answer is complete, a moment after the client has read it)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 30
    while True:
        data = httpx.get(gateway_url + "/dashboard/data", headers=headers, timeout=10).json()
        seen = {row["adapter"]: row["requests"] for row in data["adapters"]}
        if all(seen.get(name, 0) >= count for name, count in counts.items()):
            return data
        assert time.monotonic() < deadline, f"requests not counted: {seen}"
        time.sleep(0.05)


@pytest.fixture
def fake_gateway(tmp_path, llama_base, demo, store_dir) -> Iterator[LiveGateway]:
    with live_gateway(tmp_path, llama_base, demo, store_dir) as gateway:
        yield gateway


# ---- against the real gateway and vLLM ------------------------------------------------

@pytest.mark.vllm
def test_dashboard_shows_live_latency_of_the_real_gateway(real_gateway, browser):
    sent = ("base", "caps", "caps-lora")
    with real_gateway.client(GLOBEX_KEY) as client:
        for model in sent:
            for _ in range(2):
                stream(client, model)
        wait_for_requests(real_gateway.url, dict.fromkeys(sent, 2))

        with dashboard(browser, real_gateway.url) as page:
            for model in sent:
                expect(row(page, model)).to_be_visible(timeout=POLLS_MS)
            expect(page.locator("#status")).to_have_attribute("data-state", "live")
            expect(page.locator("h1")).to_contain_text("dora-gateway")
            expect(page.locator("#window")).to_have_text("5 minutes")
            expect(page.locator("#updated")).not_to_have_text("never")
            expect(page.locator("#empty")).to_be_hidden()

            names = [shown["adapter"] for shown in rendered_rows(page)]
            assert names[0] == "base"
            assert names[1:] == sorted(names[1:])
            badges = {model: row(page, model).locator(".badge").inner_text() for model in sent}
            assert badges == {"base": "base", "caps": "DoRA", "caps-lora": "LoRA"}
            for model in sent:
                assert int(cell_text(page, model, "requests")) >= 2
                assert number(cell_text(page, model, "rate_per_s")) > 0
                for column in MS_COLUMNS:
                    assert number(cell_text(page, model, column)) > 0, (model, column)
                assert cell_text(page, model, "errors") == "0"
            assert cell_text(page, "base", "ttft_overhead_pct") == "baseline"
            for column in ("ttft_overhead_pct", "tpot_overhead_pct"):
                overhead = percent(cell_text(page, "caps", column))
                level = row(page, "caps").locator(f'[data-col="{column}"]').get_attribute(
                    "data-level")
                assert level == ("warn" if overhead > 2 else "good" if overhead < -2
                                 else "neutral")
            # The engine's figure: measured in vLLM, read by the gateway's health checks.
            assert cell_text(page, "base", "added_cost_pct") == "baseline"
            for model in ("caps", "caps-lora"):
                expect(row(page, model).locator('[data-col="added_cost_pct"]')).to_have_text(
                    PERCENT, timeout=POLLS_MS * 2)
                assert percent(cell_text(page, model, "added_cost_pct")) > 0
            assert 0 < percent(cell_text(page, "caps", "dora_cost_pct")) < percent(
                cell_text(page, "caps", "added_cost_pct"))
            assert cell_text(page, "caps-lora", "dora_cost_pct") == "0.0%"
            # Every column fits a laptop's width, without scrolling the table sideways.
            assert page.eval_on_selector("#panel", "p => p.scrollWidth <= p.clientWidth")

            # Live: one more request shows up without a reload (pirate may already be in the
            # window when other engine tests ran first, so count rather than look for a row).
            pirate = row(page, "pirate")
            before = int(cell_text(page, "pirate", "requests")) if pirate.count() else 0
            stream(client, "pirate")
            expect(pirate.locator('[data-col="requests"]')).to_have_text(
                str(before + 1), timeout=POLLS_MS)
            expect(pirate.locator(".badge")).to_have_text("DoRA")
            assert number(cell_text(page, "pirate", "ttft_p50_ms")) > 0

            TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=TEST_OUTPUT / "dashboard.png", full_page=True)


# ---- against the gateway over the fake vLLM -------------------------------------------

def test_empty_state_then_rows_appear_live_with_the_gateways_numbers(fake_gateway, browser):
    with dashboard(browser, fake_gateway.url) as page:
        expect(page.locator("#empty")).to_have_text("No requests in the last 5 minutes",
                                                    timeout=POLLS_MS)
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#rows tr")).to_have_count(0)
        expect(page.locator("#status")).to_have_attribute("data-state", "live")
        expect(page.locator("#adapters caption")).to_have_text(
            "Latency per adapter over the last 5 minutes, all tenants together")

        with fake_gateway.client(GLOBEX_KEY) as client:
            for model in ("base", "caps", "caps", "plain"):
                stream(client, model)
            response = client.post("/v1/completions", json={"model": "pirate", "prompt": "x",
                                                            "max_tokens": 4})
            assert response.status_code == 200
        data = wait_for_requests(fake_gateway.url,
                                 {"base": 1, "caps": 2, "plain": 1, "pirate": 1})

        expect(page.locator("#rows tr")).to_have_count(4, timeout=POLLS_MS)
        for expected in data["adapters"]:
            expect(row(page, expected["adapter"]).locator('[data-col="requests"]')).to_have_text(
                str(expected["requests"]), timeout=POLLS_MS)
        expect(page.locator("#empty")).to_be_hidden()
        shown = rendered_rows(page)
        assert [r["adapter"] for r in shown] == [r["adapter"] for r in data["adapters"]] == [
            "base", "caps", "pirate", "plain"]
        badges = page.locator("#rows .badge").all_inner_texts()
        assert badges == ["base", "DoRA", "DoRA", "LoRA"]
        for expected, rendered in zip(data["adapters"], shown, strict=True):
            assert rendered["requests"] == str(expected["requests"])
            assert rendered["errors"] == str(expected["errors"])
            for column in MS_COLUMNS:
                if expected[column] is None:
                    assert rendered[column] == DASH, column
                else:
                    assert number(rendered[column]) == pytest.approx(expected[column],
                                                                     rel=0.01, abs=0.006)
        # The unstreamed request counts for the rate but has no time to first token.
        assert cell_text(page, "pirate", "ttft_p50_ms") == DASH
        assert cell_text(page, "pirate", "ttft_overhead_pct") == DASH
        percent(cell_text(page, "caps", "ttft_overhead_pct"))


def test_tenants_use_against_their_limits(tmp_path, llama_base, demo, store_dir, browser):
    """A budget does not refill, so what is left of it is exact: 50,000 less the usage vLLM
    reported for acme's two requests (the fake reports 6 tokens each)."""
    limits = "requests_per_minute = 60\ntokens_per_minute = 10000\ntoken_budget = 50000"
    with live_gateway(tmp_path, llama_base, demo, store_dir, acme=limits) as gateway:
        with gateway.client(ACME_KEY) as client:
            for _ in range(2):
                stream(client, "caps")
        deadline = time.monotonic() + 30
        while tenant_data(gateway.url, "acme")["limits"]["budget"]["remaining"] != 49_988:
            assert time.monotonic() < deadline, tenant_data(gateway.url, "acme")
            time.sleep(0.05)

        with dashboard(browser, gateway.url) as page:
            acme = page.locator('#tenant-rows tr[data-tenant="acme"]')
            expect(acme).to_be_visible(timeout=POLLS_MS)
            expect(acme.locator('[data-col="budget"] .limit-text')).to_have_text(
                "49,988 of 50,000 left today")
            assert re.fullmatch(r"\d+ of 60 left", acme.locator(
                '[data-col="requests"] .limit-text').inner_text())
            assert re.fullmatch(r"[\d,]+ of 10,000 left", acme.locator(
                '[data-col="tokens"] .limit-text').inner_text())
            assert acme.locator('[data-col="in_flight"]').inner_text() == "0 / 2"
            globex = page.locator('#tenant-rows tr[data-tenant="globex"]')
            assert [globex.locator(f'[data-col="{name}"]').inner_text()
                    for name in ("requests", "tokens", "budget")] == ["no limit"] * 3


def tenant_data(gateway_url: str, tenant: str) -> dict:
    data = httpx.get(gateway_url + "/dashboard/data", timeout=10).json()
    return next(item for item in data["tenants"] if item["tenant"] == tenant)


def test_rendering_of_known_figures_and_names_only_as_text(fake_gateway, browser):
    """Fixed figures (the data route answered by the test): number formats, signs and
    colours of the overhead, sorting, and an adapter name full of markup shown as text."""
    hostile = '<img src=x onerror="window.__pwned=1">'
    payload = {"window_seconds": 300, "generated_at": time.time(), "adapters": [
        _row("caps", "dora", requests=12, rate=0.04, ttft=(214.9, 300.0), tpot=(8.351, 9.0),
             overhead=(1.18, -0.4)),
        _row(hostile, "lora", requests=3, rate=0.01, ttft=(250.0, 260.0), tpot=(8.0, 8.0),
             overhead=(17.7, -3.8)),
        _row("base", "base", requests=40, rate=0.1333, ttft=(212.4, 1234.56),
             tpot=(8.314, 9.9), overhead=(0.0, 0.0)),
        _row("brief", "dora", requests=10, errors=3, rate=12.34, ttft=(286.8, 290.0),
             tpot=(7.275, 45.31), overhead=(35.04, -12.5)),
        _row("caps-lora", "lora", requests=1, rate=0.004, ttft=(None, None),
             tpot=(None, None), overhead=(None, None)),
    ], "engine": {
        "base": {"added_cost_pct": 0.0, "dora_cost_pct": 0.0, "tokens": 900},
        "caps": {"added_cost_pct": 12.34, "dora_cost_pct": 1.06, "tokens": 300},
        "brief": {"added_cost_pct": 1.5, "dora_cost_pct": 0.4, "tokens": 80},
        hostile: {"added_cost_pct": None, "dora_cost_pct": None, "tokens": 0},
    }}

    with dashboard(browser, fake_gateway.url) as page:
        page.route(fake_gateway.url + "/dashboard/data",
                   lambda route: route.fulfill(json=payload))
        expect(page.locator("#rows tr")).to_have_count(5, timeout=POLLS_MS)
        shown = rendered_rows(page)

    assert [r["adapter"] for r in shown] == ["base", hostile, "brief", "caps", "caps-lora"]
    by_name = {r["adapter"]: r for r in shown}
    assert by_name["base"] == {
        "adapter": "base", "type": "base", "requests": "40", "rate_per_s": "0.13",
        "ttft_p50_ms": "212", "ttft_p95_ms": "1,235", "ttft_bar": "",
        "tpot_p50_ms": "8.31", "tpot_p95_ms": "9.90",
        "ttft_overhead_pct": "baseline", "tpot_overhead_pct": "baseline",
        "added_cost_pct": "baseline", "dora_cost_pct": "baseline", "errors": "0"}
    assert by_name["caps"]["ttft_overhead_pct"] == "+1.2%"
    assert by_name["caps"]["tpot_overhead_pct"] == f"{MINUS}0.4%"
    assert by_name["brief"]["ttft_overhead_pct"] == "+35.0%"
    assert by_name["brief"]["tpot_overhead_pct"] == f"{MINUS}12.5%"
    assert by_name["brief"]["rate_per_s"] == "12.3"
    assert by_name["brief"]["tpot_p95_ms"] == "45.3"
    assert by_name["brief"]["errors"] == "3"
    assert (by_name["caps"]["added_cost_pct"], by_name["caps"]["dora_cost_pct"]) == (
        "+12.3%", "+1.1%")
    assert by_name["brief"]["added_cost_pct"] == "+1.5%"
    assert by_name[hostile]["added_cost_pct"] == by_name["caps-lora"]["added_cost_pct"] == DASH
    assert by_name["caps-lora"]["rate_per_s"] == "<0.01"
    assert {by_name["caps-lora"][column] for column in (*MS_COLUMNS, "ttft_overhead_pct")} == {
        DASH}
    assert by_name[hostile]["type"] == "LoRA"


def test_overhead_colours_and_markup_free_names(fake_gateway, browser):
    hostile = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    payload = {"window_seconds": 90, "generated_at": time.time(), "adapters": [
        _row("base", "base", ttft=(100.0, 100.0), tpot=(10.0, 10.0), overhead=(0.0, 0.0)),
        _row(hostile, "dora", ttft=(101.9, 102.0), tpot=(9.0, 9.0), overhead=(1.9, -10.0)),
        _row("edge", "dora", ttft=(102.04, 102.1), tpot=(9.796, 9.8), overhead=(2.04, -2.04)),
        _row("slow", "dora", ttft=(150.0, 150.0), tpot=(10.25, 11.0), overhead=(50.0, 2.5)),
    ]}
    with dashboard(browser, fake_gateway.url) as page:
        page.route(fake_gateway.url + "/dashboard/data",
                   lambda route: route.fulfill(json=payload))
        expect(page.locator("#rows tr")).to_have_count(4, timeout=POLLS_MS)
        levels = page.eval_on_selector_all(
            "#rows td.pct", "cells => cells.map(c => [c.innerText, c.dataset.level])")
        assert levels == [["+1.9%", "neutral"], [f"{MINUS}10.0%", "good"],
                          ["+2.0%", "neutral"], [f"{MINUS}2.0%", "neutral"],  # as shown
                          ["+50.0%", "warn"], ["+2.5%", "warn"]]
        colours = page.eval_on_selector_all(
            "#rows td.pct .pill", "pills => pills.map(p => getComputedStyle(p).color)")
        assert colours[0] == colours[2] == colours[3] != colours[4] != colours[1]
        # The name is text: the same string back, no element made from it, no script run.
        assert page.locator("#rows th").nth(1).inner_text() == hostile
        assert page.locator("#rows tr").nth(1).get_attribute("data-adapter") == hostile
        expect(page.locator("#rows img, #rows b")).to_have_count(0)
        assert page.evaluate("window.__pwned") is None
        expect(page.locator("#window")).to_have_text("90 seconds")


def _row(name: str, kind: str, *, requests: int = 5, errors: int = 0, rate: float = 0.1,
         ttft: tuple, tpot: tuple, overhead: tuple) -> dict:
    return {"adapter": name, "type": kind, "requests": requests, "errors": errors,
            "rate_per_s": rate, "ttft_p50_ms": ttft[0], "ttft_p95_ms": ttft[1],
            "tpot_p50_ms": tpot[0], "tpot_p95_ms": tpot[1],
            "ttft_overhead_pct": overhead[0], "tpot_overhead_pct": overhead[1]}


def test_a_key_prompt_when_the_gateway_asks_for_one(tmp_path, llama_base, demo, store_dir,
                                                    browser):
    metrics = f'access = "key"\napi_keys = ["{METRICS_KEY}"]\n'
    with live_gateway(tmp_path, llama_base, demo, store_dir, metrics) as gateway:
        with gateway.client(GLOBEX_KEY) as client:
            stream(client, "caps")
        wait_for_requests(gateway.url, {"caps": 1}, key=ADMIN_KEY)
        requests: list[Request] = []
        with dashboard(browser, gateway.url, requests) as page:
            form = page.locator("#key-form")
            expect(form).to_be_visible(timeout=POLLS_MS)
            expect(page.locator("#key")).to_have_attribute("type", "password")
            expect(page.locator("#status")).to_have_attribute("data-state", "key")
            expect(page.locator("#panel")).to_be_hidden()

            page.locator("#key").fill("sk-not-a-metrics-key-0000")
            page.get_by_role("button", name="Show dashboard").click()
            expect(page.locator("#key-reason")).to_contain_text("not accepted",
                                                                timeout=POLLS_MS)
            expect(form).to_be_visible()
            assert page.evaluate("sessionStorage.length") == 0

            page.locator("#key").fill(METRICS_KEY)
            page.locator("#key").press("Enter")
            expect(row(page, "caps")).to_be_visible(timeout=POLLS_MS)
            expect(form).to_be_hidden()
            expect(page.locator("#status")).to_have_attribute("data-state", "live")
            assert json.dumps(page.evaluate("Object.values(sessionStorage)")) == json.dumps(
                [METRICS_KEY])

            page.reload()  # the tab keeps its key
            expect(row(page, "caps")).to_be_visible(timeout=POLLS_MS)
            expect(form).to_be_hidden()
            sent_keys = [request.all_headers().get("authorization") for request in requests
                         if request.url.endswith("/dashboard/data")]
        # No key until one is given; the wrong one once; then the right one, after a reload too.
        assert sent_keys[:3] == [None, "Bearer sk-not-a-metrics-key-0000",
                                 f"Bearer {METRICS_KEY}"]
        assert set(sent_keys[3:]) == {f"Bearer {METRICS_KEY}"}


def test_an_unreachable_gateway_keeps_the_last_figures_and_recovers(fake_gateway, browser):
    with fake_gateway.client(GLOBEX_KEY) as client:
        stream(client, "caps")
    wait_for_requests(fake_gateway.url, {"caps": 1})
    with dashboard(browser, fake_gateway.url) as page:
        expect(row(page, "caps")).to_be_visible(timeout=POLLS_MS)
        ttft = cell_text(page, "caps", "ttft_p50_ms")

        fake_gateway.stop()
        status = page.locator("#status")
        expect(status).to_have_attribute("data-state", "unreachable", timeout=POLLS_MS)
        expect(status).to_contain_text("unreachable, retrying")
        expect(status).to_be_visible()
        expect(row(page, "caps")).to_be_visible()
        assert cell_text(page, "caps", "ttft_p50_ms") == ttft
        expect(page.locator("#panel")).to_have_class(re.compile(r"\bstale\b"))
        page.screenshot(path=_output("dashboard-unreachable.png"))

        fake_gateway.start()
        expect(status).to_have_attribute("data-state", "live", timeout=POLLS_MS)
        expect(page.locator("#panel")).not_to_have_class(re.compile(r"\bstale\b"))
        expect(row(page, "caps")).to_be_visible()


def _output(name: str) -> Path:
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    return TEST_OUTPUT / name
