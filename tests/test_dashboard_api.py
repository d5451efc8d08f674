"""The dashboard's JSON API on a minimal app: capacity numbers, validation, live state, assets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fastapi import FastAPI
from fastapi.testclient import TestClient

from prolora_serve.adapters import accounting as acc
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.presets import preset
from prolora_serve.server.api import dashboard
from prolora_serve.server.api.capacity import CapacityRequestError, capacity_json

GIB = 1 << 30
TABLE1_7B = {"lora-r2": 4_997_120, "lora-r8": 19_988_480, "lora-r16": 39_976_960,
             "lora-r64": 159_907_840, "prolora-r8-u1-m7-n7": 4_999_520,
             "prolora-r32-u4-m7-n7": 19_998_080}


@dataclass
class Record:  # the fields of adapters.registry.AdapterRecord the dashboard reads
    adapter_id: str
    config: dict[str, Any]
    num_params: int
    nbytes: int
    created: float = 0.0


@dataclass
class FakeRegistry:  # the queries of adapters.registry.AdapterRegistry the dashboard makes
    records: list[Record] = field(default_factory=list)

    def list(self, limit: int | None = None, after: str | None = None) -> list[Record]:
        ordered = sorted(self.records, key=lambda r: r.adapter_id)
        ordered = [r for r in ordered if after is None or r.adapter_id > after]
        return ordered[:limit] if limit is not None else ordered

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, adapter_id: object) -> bool:
        return any(r.adapter_id == adapter_id for r in self.records)


REGISTRY = FakeRegistry([
    Record("support-bot", {"peft_type": "PROLORA", "r": 32, "unshared_r": 4, "reduce_lora_A_x": 7,
                           "reduce_lora_B_x": 7, "lora_alpha": 16, "target_modules": ["q_proj"]}, 1000, 4000),
    Record("legacy-lora", {"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                           "target_modules": ["q_proj", "v_proj"]}, 2000, 8000),
])


def make_app(engine: Any = None, registry: Any = REGISTRY) -> FastAPI:
    app = FastAPI()
    app.state.engine = engine
    app.state.registry = registry
    app.include_router(dashboard.router)
    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app())


def rows_by_id(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in body["rows"]}


def test_default_capacity_reproduces_table1_and_counts_fit(client: TestClient) -> None:
    response = client.get("/v1/capacity")
    assert response.status_code == 200
    body = response.json()
    assert (body["unit"], body["bytes_per_unit"], body["memory_gb"]) == ("GiB", GIB, 20.0)
    assert body["base"]["name"] == "llama2-7b" and body["dtype"] == "fp32"
    rows = rows_by_id(body)
    assert list(rows) == list(TABLE1_7B)
    for row_id, params in TABLE1_7B.items():
        row = rows[row_id]
        assert row["params"] == params
        assert row["bytes_per_adapter"] == 4 * params
        assert row["fit"] == (20 * GIB) // (4 * params)
        assert row["fit_next_to_model"] is None
    assert rows["lora-r16"]["fit"] == 134 and rows["prolora-r32-u4-m7-n7"]["fit"] == 268


def test_equal_quality_pairing_shows_about_twice_the_adapters(client: TestClient) -> None:
    pairing = client.get("/v1/capacity", params={"memory_gb": "20"}).json()["pairing"]
    assert (pairing["prolora"], pairing["lora"]) == ("prolora-r32-u4-m7-n7", "lora-r16")
    assert (pairing["prolora_params"], pairing["lora_params"]) == (19_998_080, 39_976_960)
    assert pairing["fit_ratio"] == pytest.approx(2.0)
    assert pairing["params_ratio"] == pytest.approx(39_976_960 / 19_998_080)


@pytest.mark.parametrize("memory_gb", ["0.5", "1", "7.25", "80", "1000"])
def test_fit_is_floor_of_memory_over_adapter_bytes(client: TestClient, memory_gb: str) -> None:
    body = client.get("/v1/capacity", params={"memory_gb": memory_gb, "dtype": "bf16"}).json()
    memory = int(float(memory_gb) * GIB)
    assert body["memory_bytes"] == memory
    for row in body["rows"]:
        assert row["bytes_per_adapter"] == 2 * row["params"]
        assert row["fit"] == math.floor(memory / row["bytes_per_adapter"])


def test_curve_matches_rows_and_spans_twice_the_memory(client: TestClient) -> None:
    body = client.get("/v1/capacity", params={"memory_gb": "20"}).json()
    curve = body["curve"]
    xs = curve["memory_gb"]
    assert xs[0] == 0 and xs[-1] >= 40 and xs == sorted(xs)
    for row in body["rows"]:
        series = curve["series"][row["id"]]
        assert len(series) == len(xs) and series[0] == 0
        assert all(n == int(x * GIB) // row["bytes_per_adapter"] for x, n in zip(xs, series))
        assert 20.0 in xs and series[xs.index(20.0)] == row["fit"]


def test_gpu_budget_subtracts_base_weights_and_kv_cache(client: TestClient) -> None:
    body = client.get("/v1/capacity", params={"gpu_gb": "24", "kv_cache_gb": "2",
                                              "weight_dtype": "nf4"}).json()
    base_bytes = acc.base_model_nbytes(acc.ModelShape.from_config(preset("llama2-7b")), "nf4")
    gpu = body["gpu"]
    assert gpu["base_weight_bytes"] == body["base"]["weight_bytes"] == base_bytes
    assert gpu["available_bytes"] == 24 * GIB - base_bytes - 2 * GIB
    assert gpu["fits_base_and_kv"] is True
    for row in body["rows"]:
        assert row["fit_next_to_model"] == gpu["available_bytes"] // row["bytes_per_adapter"]
    assert body["pairing"]["fit_ratio_next_to_model"] == pytest.approx(2.0, abs=0.02)


def test_gpu_too_small_for_the_base_fits_no_adapter(client: TestClient) -> None:
    body = client.get("/v1/capacity", params={"base": "llama2-70b", "gpu_gb": "24",
                                              "weight_dtype": "bf16"}).json()
    assert body["gpu"]["fits_base_and_kv"] is False
    assert body["gpu"]["available_bytes"] == 0
    assert all(row["fit_next_to_model"] == 0 for row in body["rows"])
    assert body["pairing"]["fit_ratio_next_to_model"] is None


@pytest.mark.parametrize("base,lora_r2", [("llama2-13b", 7_823_360), ("llama2-70b", 25_886_720)])
def test_larger_bases_use_published_shapes_and_say_the_paper_differs(client: TestClient, base: str,
                                                                    lora_r2: int) -> None:
    body = client.get("/v1/capacity", params={"base": base}).json()
    assert rows_by_id(body)["lora-r2"]["params"] == lora_r2
    assert any("Table 1" in note and f"{lora_r2 / 1e6:.2f}M" in note for note in body["notes"])
    if base == "llama2-70b":
        assert body["base"]["linear_shapes"]["k_proj"] == [8192, 1024]


def test_custom_row_equals_a_real_adapter_on_that_base(client: TestClient) -> None:
    body = client.get("/v1/capacity", params={"base": "smollm2-135m", "r": "12", "unshared_r": "3",
                                              "reduce_a": "5", "reduce_b": "4"}).json()
    custom = rows_by_id(body)["custom"]
    assert (custom["custom"], custom["kind"]) == (True, "prolora")
    assert (custom["r"], custom["unshared_r"], custom["reduce_a"], custom["reduce_b"]) == (12, 3, 5, 4)
    config = acc.AdapterVariant(12, 3, 5, 4).config()
    shapes = acc.ModelShape.from_config(preset("smollm2-135m")).linear_shapes()
    adapter = random_adapter(config, shapes)
    assert custom["params"] == adapter.num_params
    assert custom["bytes_per_adapter"] == adapter.nbytes  # float32 tensors


def test_custom_row_defaults_and_target_modules(client: TestClient) -> None:
    body = client.get("/v1/capacity", params={"r": "8", "target_modules": "q_proj,v_proj"}).json()
    custom = rows_by_id(body)["custom"]
    assert (custom["unshared_r"], custom["reduce_a"], custom["reduce_b"]) == (0, 1, 1)
    assert body["target_modules"] == ["q_proj", "v_proj"]
    assert rows_by_id(body)["lora-r2"]["params"] == 32 * 2 * 2 * (4096 + 4096)


BAD_QUERIES = [
    ({"memory_gb": "abc"}, "memory_gb"), ({"memory_gb": "-1"}, "memory_gb"),
    ({"memory_gb": "0"}, "memory_gb"), ({"memory_gb": "nan"}, "memory_gb"),
    ({"memory_gb": "inf"}, "memory_gb"), ({"memory_gb": "1e12"}, "memory_gb"),
    ({"base": "gpt2"}, "base"), ({"base": "loaded"}, "base"), ({"dtype": "int4"}, "dtype"),
    ({"r": "0"}, "r"), ({"r": "1.5"}, "r"), ({"r": "-3"}, "r"), ({"r": "²"}, "r"),
    ({"r": "8", "unshared_r": "9"}, "unshared_r"), ({"reduce_a": "7"}, "r"),
    ({"r": "8", "reduce_b": "0"}, "reduce_b"), ({"gpu_gb": "0"}, "gpu_gb"),
    ({"gpu_gb": "24", "kv_cache_gb": "-1"}, "kv_cache_gb"), ({"weight_dtype": "fp8"}, "weight_dtype"),
    ({"target_modules": "q_proj,lm_head"}, "target_modules"), ({"target_modules": ","}, "target_modules"),
]


@pytest.mark.parametrize("params,param", BAD_QUERIES, ids=[str(p) for p, _ in BAD_QUERIES])
def test_bad_queries_get_400_in_openai_error_shape(client: TestClient, params: dict, param: str) -> None:
    response = client.get("/v1/capacity", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"] or "r is required" in error["message"]


QUERY_NAMES = ("memory_gb", "base", "dtype", "r", "unshared_r", "reduce_a", "reduce_b", "gpu_gb",
               "kv_cache_gb", "weight_dtype", "target_modules")
query_values = st.one_of(st.text(max_size=12), st.integers(-5, 70000).map(str),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.sampled_from(["llama2-13b", "smollm2-135m", "bf16", "int8", "q_proj,up_proj"]))


@settings(max_examples=150, deadline=None)
@given(params=st.dictionaries(st.sampled_from(QUERY_NAMES), query_values, max_size=6))
def test_any_query_gives_a_report_or_a_named_400(params: dict[str, str]) -> None:
    try:
        body = capacity_json(params, None)
    except CapacityRequestError as err:
        assert err.param in QUERY_NAMES and str(err)
        return
    for row in body["rows"]:
        assert row["fit"] == body["memory_bytes"] // row["bytes_per_adapter"]


def test_state_without_engine_lists_registered_adapters_as_cold(client: TestClient) -> None:
    state = client.get("/v1/dashboard/state").json()
    assert state["engine_running"] is False
    for key in ("model", "base_model_bytes", "kv_cache", "scheduler", "counters", "adapter_cache"):
        assert state[key] is None
    assert state["resident"] == [] and state["num_registered"] == 2
    cold = {entry["id"]: entry for entry in state["cold"]}
    assert cold["support-bot"]["label"] == "PRoLoRA r=32 u=4 m=n=7"
    assert cold["legacy-lora"]["label"] == "LoRA r=16"
    assert (cold["legacy-lora"]["num_params"], cold["legacy-lora"]["nbytes"]) == (2000, 8000)


def test_state_sends_a_bounded_page_of_cold_adapters_and_counts_them_all() -> None:
    many = FakeRegistry([Record(f"ad{i:05d}", {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                               "target_modules": ["q_proj"]}, 10, 40)
                         for i in range(dashboard.COLD_LIMIT + 300)])
    state = TestClient(make_app(registry=many)).get("/v1/dashboard/state").json()
    assert state["num_registered"] == state["num_cold"] == dashboard.COLD_LIMIT + 300
    assert [e["id"] for e in state["cold"]] == [f"ad{i:05d}" for i in range(dashboard.COLD_LIMIT)]


def test_state_without_registry_or_engine() -> None:
    state = TestClient(make_app(registry=None)).get("/v1/dashboard/state").json()
    assert (state["num_registered"], state["cold"], state["resident"]) == (None, [], [])


def test_page_and_assets_are_served(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, media in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
                         ("favicon.svg", "image/svg+xml")):
        assert f"/dashboard/static/{asset}" in page.text
        response = client.get(f"/dashboard/static/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media)
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no network
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard"


@pytest.mark.parametrize("name", ["nope.js", "..%2Fdashboard.py", "__init__.py"])
def test_unknown_assets_are_404(client: TestClient, name: str) -> None:
    response = client.get(f"/dashboard/static/{name}")
    assert response.status_code == 404
    assert "import" not in response.text  # no source file leaks out


# --- the real app: a tiny random LLaMA served by uvicorn, real registry and engine -------------

MiB = 1 << 20
REAL_ADAPTERS = {
    "alpha": acc.AdapterVariant(8, 2, 3, 5).config(),
    "beta": acc.lora(4).config(("q_proj", "v_proj", "down_proj")),
    "gamma": acc.AdapterVariant(16, 0, 4, 4).config(("gate_proj", "up_proj", "o_proj")),
}


def start_real_server(live_server: Any, model_dir: Path, root: Path, **overrides: Any) -> Any:
    """The real app (create_app) on a tiny fp32 model with three registered adapters."""
    from prolora_serve.adapters.format import save_adapter
    from prolora_serve.server.config import ServerConfig

    settings = dict(model=str(model_dir), dtype="fp32", adapter_dir=root / "adapters",
                    adapter_memory=16 * MiB, kv_cache_memory=16 * MiB, max_batch=4, max_model_len=128)
    server = live_server(ServerConfig.from_options(**{**settings, **overrides}))
    registry = server.app.state.registry
    for seed, (adapter_id, config) in enumerate(REAL_ADAPTERS.items()):
        path = root / f"{adapter_id}.safetensors"
        save_adapter(random_adapter(config, registry.linear_shapes, seed=seed), path, single_file=True)
        registry.register_path(adapter_id, path)
    return server


def complete(server: Any, adapter_id: str, headers: dict[str, str] | None = None) -> None:
    response = httpx.post(f"{server.url}/v1/completions", headers=headers or {}, timeout=120,
                          json={"model": adapter_id, "prompt": "the cat sat", "max_tokens": 3})
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def real_server(live_server: Any, tiny_llama_dir: Path, tmp_path_factory: Any) -> Any:
    server = start_real_server(live_server, tiny_llama_dir, tmp_path_factory.mktemp("dashboard"))
    yield server
    server.stop()


def test_real_app_capacity_for_the_loaded_model(real_server: Any) -> None:
    engine, registry = real_server.app.state.engine, real_server.app.state.registry
    body = httpx.get(f"{real_server.url}/v1/capacity", params={"base": "loaded", "gpu_gb": "1", "r": "8",
                                                                "unshared_r": "2", "reduce_a": "3",
                                                                "reduce_b": "5"}).json()
    assert "loaded" in body["choices"]["bases"]
    assert (body["base"]["source"], body["base"]["name"]) == ("loaded", engine.model_name)
    # The calculator's module paths and shapes are the served model's own.
    assert acc.ModelShape.from_config(engine.hf_config).linear_shapes() == registry.linear_shapes
    assert body["base"]["weight_bytes"] == engine.loaded.nbytes
    assert body["gpu"]["kv_cache_bytes"] == engine.stats().kv_cache_bytes
    custom = rows_by_id(body)["custom"]
    assert custom["params"] == registry.get("alpha").num_params
    assert custom["bytes_per_adapter"] == registry.get("alpha").nbytes


def test_real_app_state_follows_residency(real_server: Any) -> None:
    engine, registry = real_server.app.state.engine, real_server.app.state.registry
    complete(real_server, "alpha")
    state = httpx.get(f"{real_server.url}/v1/dashboard/state").json()
    assert state["engine_running"] is True and state["model"] == engine.model_name
    assert state["base_model_bytes"] == engine.loaded.nbytes
    assert state["backends"] == {"adapter": engine.model.backends.adapter,
                                 "decode_attention": engine.model.backends.decode_attention}
    assert state["kv_cache"]["kv_cache_bytes"] == engine.stats().kv_cache_bytes
    assert state["num_registered"] == 3
    resident = {entry["id"]: entry for entry in state["resident"]}
    assert list(resident) == ["alpha"]
    assert {entry["id"] for entry in state["cold"]} == {"beta", "gamma"} and state["num_cold"] == 2
    alpha = resident["alpha"]
    # Residency overhead 0: resident bytes are the compact parameters at the pool's 4 bytes.
    assert alpha["nbytes"] == registry.get("alpha").nbytes == 4 * alpha["num_params"]
    assert alpha["in_use"] == 0 and alpha["label"] == "PRoLoRA r=8 u=2 m=3 n=5"
    cache = state["adapter_cache"]
    assert cache["used_bytes"] == alpha["nbytes"] and cache["budget_bytes"] == 16 * MiB
    assert cache["loads"] == 1 and cache["misses"] >= 1
    assert state["counters"]["num_finished"] >= 1 and state["counters"]["generated_tokens"] >= 3
