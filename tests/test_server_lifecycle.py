"""Server lifecycle: restart keeps adapters, --register, eviction under a tiny adapter budget,
queue full (429) and a stopped engine (503)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter
from prolora_serve.server.config import ServerConfig

MiB = 1 << 20
CONFIGS = [ProLoRAConfig(r=8, unshared_r=u, reduce_lora_A_x=2, reduce_lora_B_x=3, lora_alpha=16,
                         target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
           for u in (1, 2, 3)]


def tiny(model_dir: Path, adapter_dir: Path, **overrides) -> ServerConfig:
    settings = dict(model=str(model_dir), dtype="fp32", adapter_dir=adapter_dir,
                    adapter_memory=16 * MiB, kv_cache_memory=8 * MiB, max_model_len=256)
    return ServerConfig.from_options(**{**settings, **overrides})


def linear_shapes(live_server, model_dir: Path, root: Path) -> dict:
    server = live_server(tiny(model_dir, root / "probe"))
    shapes = dict(server.app.state.registry.linear_shapes)
    server.stop()
    return shapes


def write_demo_adapters(folder: Path, shapes: dict) -> list[str]:
    names = []
    for i, config in enumerate(CONFIGS):
        save_adapter(random_adapter(config, shapes, seed=i, b_std=0.3), folder / f"demo-{i}")
        names.append(f"demo-{i}")
    return names


def complete(url: str, adapter: str | None, max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": "the dog sat on a mat", "adapter": adapter, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True})


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def test_register_restart_and_eviction(live_server, tiny_llama_dir, tmp_path) -> None:
    demo = tmp_path / "demo"
    names = write_demo_adapters(demo, linear_shapes(live_server, tiny_llama_dir, tmp_path))
    store = tmp_path / "store"
    first = live_server(tiny(tiny_llama_dir, store, register=[demo]))
    assert sorted(a["id"] for a in httpx.get(f"{first.url}/adapters").json()["data"]) == names
    expected = {name: complete(first.url, name).json()["choices"][0]["text"] for name in names}
    assert len(set(expected.values())) == len(names)
    sizes = {a["id"]: a["num_params"] * 4 for a in httpx.get(f"{first.url}/adapters").json()["data"]}
    first.stop()

    # Restart on the same store (and the same --register dir: nothing is registered twice),
    # with room for one adapter at a time: every adapter is still served, by evicting.
    budget = max(sizes.values())
    assert 2 * min(sizes.values()) > budget
    second = live_server(tiny(tiny_llama_dir, store, register=[demo], adapter_memory=budget))
    assert sorted(a["id"] for a in httpx.get(f"{second.url}/adapters").json()["data"]) == names
    for name in names + names[::-1]:
        assert complete(second.url, name).json()["choices"][0]["text"] == expected[name]
    assert metric(second.url, "prolora_adapter_cache_evictions_total") >= 2 * len(names) - 2

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=second.url, timeout=120) as http:
            bodies = [{"prompt": "the dog sat on a mat", "adapter": n, "max_tokens": 12,
                       "temperature": 0, "ignore_eos": True} for n in names * 2]
            responses = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0]["text"] for r in responses]

    assert asyncio.run(together()) == [expected[n] for n in names * 2]
    assert metric(second.url, "prolora_adapter_resident_bytes") <= budget
    second.stop()


def test_queue_full_is_429_and_too_large_adapter_is_413(live_server, tiny_llama_dir, tmp_path) -> None:
    server = live_server(tiny(tiny_llama_dir, tmp_path / "store", max_batch=1, max_queue=1,
                              adapter_memory=1024))
    shapes = server.app.state.registry.linear_shapes
    path = tmp_path / "big.safetensors"
    save_adapter(random_adapter(CONFIGS[0], shapes, b_std=0.3), path, single_file=True)
    with open(path, "rb") as handle:
        assert httpx.post(f"{server.url}/adapters", data={"name": "big"},
                          files={"file": handle}).status_code == 201
    too_large = complete(server.url, "big")
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "adapter_too_large"

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            body = {"prompt": "the cat", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(5)))

    statuses = sorted(r.status_code for r in asyncio.run(flood()))
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    refused = next(r for r in asyncio.run(flood()) if r.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert complete(server.url, None, max_tokens=2).status_code == 200
    server.stop()


def test_stopped_engine_is_503(live_server, tiny_llama_dir, tmp_path) -> None:
    server = live_server(tiny(tiny_llama_dir, tmp_path / "store"))
    server.app.state.engine.shutdown()
    response = complete(server.url, None)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped"
    assert httpx.get(f"{server.url}/health").status_code == 503
    server.stop()
