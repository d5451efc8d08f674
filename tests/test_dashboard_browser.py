"""The dashboard page in Debian's headless Chromium against a real uvicorn server."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from prolora_serve.server.api import dashboard

from test_dashboard_api import REGISTRY, FakeRegistry, Record, complete, start_real_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """uvicorn on 127.0.0.1 in a thread; ``url`` once it accepts connections."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def registry() -> FakeRegistry:
    return FakeRegistry(list(REGISTRY.records))


@pytest.fixture(scope="module")
def server(registry: FakeRegistry) -> Iterator[BackgroundServer]:
    app = FastAPI()
    app.state.engine = None
    app.state.registry = registry
    app.include_router(dashboard.router)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: install Debian's chromium (make browser)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


class Page:
    """A page plus every console error and uncaught exception it produced."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        with self.page.expect_response(lambda r: "/v1/capacity" in r.url) as first:
            self.page.goto(url + "/dashboard")
        self.last_capacity = first.value.json()
        self.page.wait_for_selector("#numbers tbody tr[data-row-id]")

    def change(self, selector: str, value: str) -> dict[str, Any]:
        """Set a control; the JSON of the capacity request it caused."""
        with self.page.expect_response(lambda r: "/v1/capacity" in r.url) as answer:
            if self.page.locator(selector).evaluate("e => e.tagName") == "SELECT":
                self.page.select_option(selector, value)
            else:
                self.page.fill(selector, value)
        response = answer.value
        self.page.wait_for_timeout(100)  # let the render finish
        return {"status": response.status, "url": response.url, "body": response.json()}

    def table(self) -> dict[str, dict[str, dict[str, str]]]:
        return numbers_table(self.page)


def numbers_table(page: Any) -> dict[str, dict[str, dict[str, str]]]:
    """Row id -> field -> the cell's data-value and shown text."""
    return page.evaluate("""() => Object.fromEntries(
        Array.from(document.querySelectorAll('#numbers tbody tr')).map(tr => [tr.dataset.rowId,
          Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field,
            {value: td.dataset.value, text: td.textContent}]))]))""")


@pytest.fixture()
def page(browser: Any, server: BackgroundServer) -> Iterator[Page]:
    opened = Page(browser, server.url)
    yield opened
    opened.page.close()


def short_count(n: int) -> str:
    """How the page abbreviates a parameter count (5.00M, 14.85K)."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def assert_table_matches(table: dict, body: dict) -> None:
    assert list(table) == [row["id"] for row in body["rows"]]
    for row in body["rows"]:
        cells = table[row["id"]]
        for field in ("r", "unshared_r", "reduce_a", "reduce_b", "params", "bytes_per_adapter", "fit"):
            assert int(cells[field]["value"]) == row[field], (row["id"], field)
        assert cells["fit"]["text"].replace(",", "") == str(row["fit"])
        assert cells["params"]["text"] == short_count(row["params"])
        assert cells["label"]["text"] == row["label"]


def test_page_shows_the_api_numbers_and_follows_the_inputs(page: Page) -> None:
    first = page.last_capacity
    assert first["memory_gb"] == 20.0 and page.page.input_value("#memory_gb") == "20"
    assert_table_matches(page.table(), first)
    assert page.page.text_content("#pair-ratio") == "2.00×"
    assert page.page.text_content("#pair-prolora-fit") == f"{first['pairing']['prolora_fit']:,}"

    changed = page.change("#memory_gb", "40")
    assert changed["status"] == 200 and "memory_gb=40" in changed["url"]
    body = changed["body"]
    assert httpx.get(changed["url"]).json() == body  # what the page got is what the API says
    assert rows_fit(body)["lora-r16"] == (40 * GIB) // (4 * 39_976_960)
    assert_table_matches(page.table(), body)
    assert page.page.text_content("#th-fit") == "Fit in 40 GiB"
    assert page.page.locator("#fit-chart path[data-series]").count() == len(body["rows"])

    base = page.change("#base", "llama2-70b")["body"]
    assert base["base"]["name"] == "llama2-70b"
    assert_table_matches(page.table(), base)
    assert page.errors == []


def rows_fit(body: dict) -> dict[str, int]:
    return {row["id"]: row["fit"] for row in body["rows"]}


def test_custom_row_and_a_bad_value(page: Page) -> None:
    for selector, value in (("#r", "16"), ("#unshared_r", "2"), ("#reduce_a", "4")):
        page.change(selector, value)
    body = page.change("#reduce_b", "4")["body"]
    custom = next(row for row in body["rows"] if row["custom"])
    assert (custom["r"], custom["unshared_r"], custom["reduce_a"], custom["reduce_b"]) == (16, 2, 4, 4)
    assert_table_matches(page.table(), body)
    assert page.page.locator('tr[data-row-id="custom"]').count() == 1

    bad = page.change("#unshared_r", "17")
    assert bad["status"] == 400 and bad["body"]["error"]["param"] == "unshared_r"
    assert page.page.is_visible("#form-error")
    assert "unshared_r" in page.page.text_content("#form-error")
    assert page.page.get_attribute("#unshared_r", "aria-invalid") == "true"
    assert_table_matches(page.table(), body)  # the last good numbers stay on screen
    page.change("#unshared_r", "2")
    assert not page.page.is_visible("#form-error")
    # The 400 is the only console error: the browser logs the failed fetch itself.
    assert all("400" in error for error in page.errors)


def test_gpu_budget_and_screenshot(page: Page) -> None:
    body = page.change("#gpu_gb", "24")["body"]
    gpu = body["gpu"]
    assert gpu["gpu_gb"] == 24.0 and page.page.is_visible("#gpu-budget")
    table = page.table()
    for row in body["rows"]:
        assert int(table[row["id"]]["fit_next_to_model"]["value"]) == row["fit_next_to_model"]
    assert "24 GiB accelerator" in page.page.text_content("#gpu-title")
    page.change("#gpu_gb", "80")
    ARTIFACTS.mkdir(exist_ok=True)
    page.page.wait_for_timeout(300)
    page.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert page.errors == []


def test_live_state_renders_and_refreshes_without_reload(page: Page, registry: FakeRegistry) -> None:
    page.page.wait_for_function("() => document.querySelector('#cold-count').textContent === '2'")
    assert page.page.text_content("#engine-pill") == "no engine attached"
    cold = page.page.locator("#cold tbody tr[data-adapter-id]")
    assert sorted(cold.evaluate_all("rows => rows.map(r => r.dataset.adapterId)")) == ["legacy-lora", "support-bot"]
    assert "PRoLoRA r=32 u=4 m=n=7" in page.page.text_content('#cold tr[data-adapter-id="support-bot"]')
    page.page.evaluate("() => { window.__marker = 'same page'; }")
    registry.records.append(Record("new-upload", {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]},
                                   64, 256))
    try:
        page.page.wait_for_function("() => document.querySelector('#cold-count').textContent === '3'",
                                    timeout=10_000)
    finally:
        registry.records.pop()
    assert page.page.evaluate("() => window.__marker") == "same page"  # refreshed in place
    assert "LoRA r=4" in page.page.text_content('#cold tr[data-adapter-id="new-upload"]')
    assert page.errors == []


# --- the real app (create_app): API key, a served model, real residency -----------------------

API_KEY = "dashboard-test-key"
BEARER = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def keyed_server(live_server: Any, tiny_llama_dir: Path, tmp_path_factory: Any) -> Iterator[Any]:
    server = start_real_server(live_server, tiny_llama_dir, tmp_path_factory.mktemp("keyed"),
                               api_key=API_KEY)
    yield server
    server.stop()


def test_real_app_page_asks_for_the_key_then_shows_live_residency(browser: Any, keyed_server: Any) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(keyed_server.url + "/dashboard")
    page.wait_for_selector("#key-form", state="visible")
    assert page.locator("#numbers tbody tr[data-row-id]").count() == 0
    complete(keyed_server, "gamma", headers=BEARER)

    page.fill("#api-key", API_KEY)
    with page.expect_response(lambda r: "/v1/capacity" in r.url) as answer:
        page.click("#key-form button")
    assert answer.value.status == 200
    page.wait_for_selector("#numbers tbody tr[data-row-id]")
    page.wait_for_function("() => document.querySelector('#resident-count').textContent === '1'")
    assert not page.is_visible("#key-form")
    assert page.text_content("#engine-pill") == f"serving {keyed_server.app.state.model_name}"
    backends = keyed_server.app.state.engine.model.backends  # a slow fallback is visible here
    assert page.text_content('[data-stat="backends"] .v') == f"{backends.adapter} · {backends.decode_attention}"
    resident = page.locator("#resident tbody tr[data-adapter-id]")
    assert resident.evaluate_all("rows => rows.map(r => r.dataset.adapterId)") == ["gamma"]
    record = keyed_server.app.state.registry.get("gamma")
    assert int(page.get_attribute('#resident tr[data-adapter-id="gamma"] td[data-value]', "data-value")) == record.nbytes
    assert page.text_content("#cold-count") == "2"

    with page.expect_response(lambda r: "base=loaded" in r.url) as loaded:
        page.select_option("#base", "loaded")
    body = loaded.value.json()
    assert body == httpx.get(loaded.value.url, headers=BEARER).json()
    page.wait_for_timeout(100)
    assert_table_matches(numbers_table(page), body)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
    assert all("401" in error for error in errors), errors
    page.close()
