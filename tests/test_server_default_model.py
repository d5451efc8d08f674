"""End to end on the real embedded default model (SmolLM2-135M-Instruct, NF4), as shipped:
``prolora-serve serve`` defaults, the official openai client, an uploaded adapter."""

from __future__ import annotations

import httpx
import openai
import pytest

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter
from prolora_serve.server.config import ServerConfig

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ADAPTER = ProLoRAConfig(r=8, unshared_r=1, reduce_lora_A_x=7, reduce_lora_B_x=7, lora_alpha=16,
                        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def server(live_server, default_model_dir, tmp_path_factory):
    # default_model_dir converts the GGUF once; the server then finds it in the same cache.
    config = ServerConfig.from_options(adapter_dir=tmp_path_factory.mktemp("default") / "adapters",
                          adapter_memory=64 << 20, kv_cache_memory=64 << 20)
    assert config.engine.model is None and config.engine.dtype == "nf4"
    server = live_server(config)
    yield server
    server.stop()


def test_default_model_answers_and_an_adapter_changes_it(server, tmp_path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    base_name = client.models.list().data[0].id
    assert "SmolLM2" in base_name
    answer = client.chat.completions.create(model=base_name, messages=QUESTION, max_tokens=20,
                                            temperature=0)
    assert "Paris" in answer.choices[0].message.content

    shapes = server.app.state.registry.linear_shapes
    assert len(shapes) == 30 * 7
    path = tmp_path / "adapter.safetensors"
    # b_std 0.1 changes the answer from its first tokens; at 0.05 the one change was a near tie
    # 13 tokens in ("Light" / "Love", logprobs 1e-3 apart), which float rounding order decides
    save_adapter(random_adapter(ADAPTER, shapes, seed=0, b_std=0.1), path, single_file=True)
    with open(path, "rb") as handle:
        created = httpx.post(f"{server.url}/adapters", data={"name": "smol-demo"},
                             files={"file": handle}, timeout=120)
    assert created.status_code == 201, created.text
    tuned = client.chat.completions.create(model="smol-demo", messages=QUESTION, max_tokens=20,
                                           temperature=0)
    assert tuned.choices[0].message.content != answer.choices[0].message.content
    stream = client.completions.create(model="smol-demo", prompt="The capital of France is",
                                       max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    whole = client.completions.create(model="smol-demo", prompt="The capital of France is",
                                      max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "prolora_adapters_resident 1.0" in metrics
    base_bytes = float(next(line.split()[1] for line in metrics.splitlines()
                            if line.startswith("prolora_base_model_bytes")))
    # NF4 projections + the float32 embedding and its packed output-layer copy: below the
    # 650 MB that fp32 weights (and their packed output layer) take.
    assert base_bytes < 300e6
