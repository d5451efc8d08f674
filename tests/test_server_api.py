"""The HTTP API end to end: a real uvicorn server (tiny random LLaMA, fp32) and real clients."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter
from prolora_serve.server.config import ServerConfig

MiB = 1 << 20
PROMPT = "the cat sat on the mat"
ADAPTER_CONFIGS = {
    "alpha": ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=16,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj")),
    "beta": ProLoRAConfig(r=4, unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=8,
                          target_modules=("q_proj", "v_proj", "down_proj"), peft_type="LORA"),
    "gamma": ProLoRAConfig(r=16, unshared_r=0, reduce_lora_A_x=4, reduce_lora_B_x=4,
                           lora_alpha=32, target_modules=("gate_proj", "up_proj", "o_proj")),
}


def write_adapter(path: Path, config: ProLoRAConfig, shapes, seed: int) -> Path:
    """A random adapter with non-zero B (so it visibly changes outputs), single-file form."""
    save_adapter(random_adapter(config, shapes, seed=seed, b_std=0.3), path, single_file=True)
    return path


def upload(url: str, name: str, path: Path, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(path, "rb") as handle:
        return httpx.post(f"{url}/adapters", data={"name": name}, files={"file": handle},
                          headers=headers, timeout=60)


def tiny_config(model_dir: Path, adapter_dir: Path, **overrides) -> ServerConfig:
    settings = dict(model=str(model_dir), dtype="fp32", adapter_dir=adapter_dir,
                    adapter_memory=16 * MiB, kv_cache_memory=16 * MiB, max_batch=8,
                    max_model_len=256)
    return ServerConfig.from_options(**{**settings, **overrides})


@pytest.fixture(scope="module")
def server(live_server, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    server = live_server(tiny_config(tiny_llama_dir, root / "adapters"))
    shapes = server.app.state.registry.linear_shapes
    for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items()):
        response = upload(server.url, name, write_adapter(root / f"{name}.safetensors", config,
                                                          shapes, seed))
        assert response.status_code == 201, response.text
    server.files = root
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base_name(server) -> str:
    return server.app.state.model_name


def greedy(client: openai.OpenAI, model: str, prompt: str = PROMPT, max_tokens: int = 12, **extra):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body={"ignore_eos": True, **extra})


# ---- OpenAI client round trips -------------------------------------------------------------
def test_completion_round_trip_counts_usage(client, base_name) -> None:
    result = greedy(client, base_name, max_tokens=7)
    choice = result.choices[0]
    assert result.object == "text_completion" and result.model == base_name
    assert choice.finish_reason == "length" and choice.text
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == 6  # six words in the word-level vocabulary
    assert result.usage.total_tokens == 13


def test_adapter_by_model_name_or_field_is_the_same_and_differs_from_base(client, base_name) -> None:
    base = greedy(client, base_name).choices[0].text
    by_model = greedy(client, "alpha").choices[0].text
    by_field = greedy(client, base_name, adapter="alpha").choices[0].text
    assert by_model == by_field
    assert by_model != base
    assert greedy(client, "alpha").model == "alpha"


def test_streaming_matches_the_whole_response(client) -> None:
    whole = greedy(client, "beta", max_tokens=10).choices[0].text
    stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_round_trip_with_adapter_and_streaming(client, base_name) -> None:
    messages = [{"role": "user", "content": "what color is the sky ?"}]
    whole = client.chat.completions.create(model=base_name, messages=messages, max_tokens=8,
                                           temperature=0, extra_body={"adapter": "gamma",
                                                                      "ignore_eos": True})
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="gamma", messages=messages, max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    base = client.chat.completions.create(model=base_name, messages=messages, max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert base.choices[0].message.content != whole.choices[0].message.content


def test_chat_logprobs_format(client) -> None:
    result = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "say hello"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert 1 <= len(entry.top_logprobs) <= 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)


def test_legacy_logprobs_and_echo(client, base_name) -> None:
    result = greedy(client, base_name, max_tokens=3, logprobs=2, echo=True)
    choice = result.choices[0]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == 6 + 3  # echoed prompt tokens, then the completion
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in logprobs.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    plain = greedy(client, base_name, max_tokens=3, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[6:]


def test_prompt_forms_and_n(client, base_name) -> None:
    ids = greedy(client, base_name, max_tokens=3).usage.prompt_tokens
    assert ids == 6
    batch = client.completions.create(model=base_name, prompt=[[10, 11, 12], [13, 14]],
                                      max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.prompt_tokens == 5
    sampled = client.completions.create(model=base_name, prompt=["the cat", "the dog"], n=2,
                                        max_tokens=6, temperature=1.0, seed=7,
                                        extra_body={"ignore_eos": True})
    again = client.completions.create(model=base_name, prompt=["the cat", "the dog"], n=2,
                                      max_tokens=6, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_stop_strings_end_the_text(client, base_name) -> None:
    text = greedy(client, base_name, max_tokens=12).choices[0].text
    words = text.split()
    stop = words[len(words) // 2]
    stopped = greedy(client, base_name, max_tokens=12, stop=[stop]).choices[0]
    assert stop not in stopped.text and stopped.finish_reason == "stop"
    assert text.startswith(stopped.text)


def test_models_list_base_and_adapters(client, base_name) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {base_name, "alpha", "beta", "gamma"} <= set(models)
    assert models["alpha"].parent == base_name and models["alpha"].root == base_name
    assert getattr(models[base_name], "parent", None) is None


def test_unknown_model_and_adapter_are_404_never_the_base(client, base_name) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        greedy(client, "no-such-model")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        greedy(client, base_name, adapter="no-such-adapter")
    assert err.value.body["code"] == "adapter_not_found"
    with pytest.raises(openai.BadRequestError):
        greedy(client, "alpha", adapter="beta")


# ---- concurrency ---------------------------------------------------------------------------
async def _all_at_once(url: str, bodies: list[dict]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        responses = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["choices"][0]["text"] for r in responses]


def test_concurrent_mixed_adapters_match_one_by_one(server) -> None:
    prompts = [PROMPT, "the dog sat on a red mat", "what color is the sky", "one two three"]
    adapters = [None, "alpha", "beta", "gamma", "alpha", None, "gamma", "beta"]
    bodies = [{"prompt": prompts[i % len(prompts)], "adapter": adapter, "max_tokens": 16,
               "temperature": 0, "ignore_eos": True} for i, adapter in enumerate(adapters)]
    together = asyncio.run(_all_at_once(server.url, bodies))
    alone = [httpx.post(f"{server.url}/v1/completions", json=b, timeout=120).json()["choices"][0]["text"]
             for b in bodies]
    assert together == alone
    assert len({(b["prompt"], t) for b, t in zip(bodies, alone)}) > len(prompts)  # adapters matter


# ---- adapters over HTTP --------------------------------------------------------------------
def test_upload_use_delete_then_404(server, client) -> None:
    shapes = server.app.state.registry.linear_shapes
    path = write_adapter(server.files / "temp.safetensors", ADAPTER_CONFIGS["alpha"], shapes, 42)
    created = upload(server.url, "temp", path)
    assert created.status_code == 201
    info = created.json()
    assert info["id"] == "temp" and info["num_params"] > 0 and info["stored_bytes"] > info["nbytes"]
    assert greedy(client, "temp").choices[0].text
    shown = httpx.get(f"{server.url}/adapters/temp").json()
    assert shown["resident"] is True and shown["resident_bytes"] == info["num_params"] * 4
    assert httpx.delete(f"{server.url}/adapters/temp").json() == {"id": "temp", "object": "adapter",
                                                                  "deleted": True}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "temp")
    assert httpx.get(f"{server.url}/adapters/temp").status_code == 404
    assert httpx.delete(f"{server.url}/adapters/temp").status_code == 404
    assert "temp" not in {a["id"] for a in httpx.get(f"{server.url}/adapters").json()["data"]}


def test_peft_pair_upload(server) -> None:
    shapes = server.app.state.registry.linear_shapes
    folder = server.files / "pair"
    save_adapter(random_adapter(ADAPTER_CONFIGS["beta"], shapes, seed=3), folder)
    with open(folder / "adapter_config.json", "rb") as config, \
            open(folder / "adapter_model.safetensors", "rb") as weights:
        response = httpx.post(f"{server.url}/adapters", data={"name": "pair"},
                              files={"config": config, "weights": weights})
    assert response.status_code == 201 and response.json()["config"]["peft_type"] == "LORA"
    assert httpx.delete(f"{server.url}/adapters/pair").status_code == 200


# ---- errors --------------------------------------------------------------------------------
def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "logprobs": 9}, "logprobs"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
])
def test_invalid_requests_are_400_in_openai_shape(server, body, param) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_and_unroutable_requests(server) -> None:
    broken = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and _error(broken)["type"] == "invalid_request_error"
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT,
                                                               "use_beam_search": True})
    assert refused.status_code == 400 and "use_beam_search" in _error(refused)["message"]
    assert _error(httpx.get(f"{server.url}/v1/nothing-here"))["code"] == "not_found"
    not_allowed = httpx.get(f"{server.url}/v1/completions")
    assert not_allowed.status_code == 405 and _error(not_allowed)["code"] == "method_not_allowed"
    too_long = httpx.post(f"{server.url}/v1/completions", json={"prompt": "the " * 300})
    assert too_long.status_code == 400 and _error(too_long)["code"] == "context_length_exceeded"


def test_metrics_expose_requests_tokens_and_engine_state(server, client, base_name) -> None:
    greedy(client, base_name, max_tokens=5)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("prolora_http_requests_total", "prolora_prompt_tokens_total",
                 "prolora_generated_tokens_total", "prolora_queue_depth", "prolora_running_requests",
                 "prolora_batch_size", "prolora_adapter_cache_hits_total",
                 "prolora_adapter_cache_misses_total", "prolora_adapter_cache_loads_total",
                 "prolora_adapter_cache_evictions_total", "prolora_adapter_resident_bytes",
                 "prolora_adapters_resident", "prolora_adapters_registered", "prolora_kv_blocks_used",
                 "prolora_kv_blocks_total"):
        assert f"\n{name}" in text, name
    assert 'endpoint="/v1/completions"' in text and 'status="200"' in text
    assert "prolora_adapters_registered 3.0" in text


def test_health(server) -> None:
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ok" and body["adapters"] == 3
    # float32 on the CPU: the fused C++ adapter kernel and decode attention, never a silent fallback
    assert body["backends"] == {"adapter": "cpu", "decode_attention": "cpu"}


# ---- slots are freed when a streaming client goes away -------------------------------------
def _engine_idle(server) -> bool:
    stats = server.app.state.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0


def test_streaming_disconnect_frees_the_slot(server) -> None:
    body = {"prompt": PROMPT, "adapter": "alpha", "max_tokens": None, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["choices"]
            assert server.app.state.engine.stats().num_running == 1
    deadline = time.monotonic() + 30
    while not _engine_idle(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_idle(server)
    assert all(info.in_use == 0 for info in server.app.state.engine.adapter_cache.resident())


def test_too_many_choices_and_model_ids_with_slashes(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["the"] * 40, "n": 4})
    assert response.status_code == 400 and _error(response)["code"] == "too_many_choices"
    missing = httpx.get(f"{server.url}/v1/models/org/some-model")
    assert missing.status_code == 404 and _error(missing)["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/v1/models/alpha").json()["parent"] == server.app.state.model_name


def test_non_streaming_disconnect_aborts_the_request(server) -> None:
    # 128 choices of ~250 tokens each: many seconds of work, far beyond the 1 s read timeout.
    body = {"prompt": [PROMPT] * 32, "n": 4, "max_tokens": None, "ignore_eos": True}
    aborted_before = server.app.state.engine.stats().num_aborted
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    deadline = time.monotonic() + 30
    while not _engine_idle(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_idle(server)
    assert server.app.state.engine.stats().num_aborted > aborted_before


# ---- every OpenAI / vLLM field honoured or refused -----------------------------------------
@pytest.mark.parametrize("route, extra, name", [
    ("completions", {"no_such_field": 1}, "no_such_field"),
    ("completions", {"suffix": "tail"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"bad_words": ["cat"]}, "bad_words"),
    ("completions", {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("chat", {"audio": {"voice": "x"}}, "audio"),
    ("chat", {"store": True}, "store"),
    ("chat", {"service_tier": "flex"}, "service_tier"),
    ("chat", {"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
])
def test_fields_not_implemented_are_refused_by_name(server, route, extra, name) -> None:
    if route == "completions":
        url, body = "/v1/completions", {"prompt": PROMPT, **extra}
    else:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(f"{server.url}{url}", json=body)
    assert response.status_code == 400 and name in _error(response)["message"], response.text


def test_max_tokens_beyond_the_context_is_refused_as_openai_does(client, base_name) -> None:
    with pytest.raises(openai.BadRequestError) as err:  # the tiny server holds 256 tokens
        client.completions.create(model=base_name, prompt=PROMPT, max_tokens=251)
    assert "maximum context length is 256 tokens" in err.value.body["message"]
    assert "you requested 257 tokens (6 in the prompt, 251 in the completion)" in err.value.body["message"]
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "max_tokens"
    fits = greedy(client, base_name, max_tokens=250)
    assert fits.usage.completion_tokens == 250 and fits.choices[0].finish_reason == "length"
    whole = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=None,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 250  # absent: the rest of the context
    with pytest.raises(openai.BadRequestError) as chat_err:
        client.chat.completions.create(model=base_name, max_completion_tokens=10_000,
                                       messages=[{"role": "user", "content": "hi"}])
    assert chat_err.value.body["param"] == "max_completion_tokens"


def test_logit_bias_min_tokens_and_penalties_reach_the_sampler(client, base_name, server) -> None:
    token = server.app.state.engine.tokenizer.encode("mat", add_special_tokens=False)[0]
    forced = greedy(client, base_name, max_tokens=5, logit_bias={str(token): 100})
    assert forced.choices[0].text.split() == ["mat"] * 5
    with pytest.raises(openai.BadRequestError) as err:
        greedy(client, base_name, logit_bias={"999999": 5})
    assert err.value.body["param"] == "logit_bias" and err.value.body["code"] == "invalid_token_id"
    plain = greedy(client, base_name, max_tokens=12).choices[0].text
    penalized = greedy(client, base_name, max_tokens=12, frequency_penalty=2.0,
                       presence_penalty=2.0).choices[0].text
    repeated = greedy(client, base_name, max_tokens=12, repetition_penalty=5.0).choices[0].text
    assert penalized != plain and repeated != plain
    assert len(set(penalized.split())) >= len(set(plain.split()))
    eos = server.app.state.engine.engine.eos_token_ids
    stop_early = client.completions.create(
        model=base_name, prompt=PROMPT, max_tokens=8, temperature=0,
        logit_bias={str(t): 100 for t in eos}, extra_body={"min_tokens": 4})
    # EOS is masked for the first 4 tokens, then forced: the 5th token is EOS (counted, not shown)
    assert stop_early.usage.completion_tokens == 5 and stop_early.choices[0].finish_reason == "stop"


def test_min_p_one_is_greedy_and_chat_template_options(client, base_name) -> None:
    greedy_text = greedy(client, base_name, max_tokens=8).choices[0].text
    sampled = client.completions.create(model=base_name, prompt=PROMPT, max_tokens=8, temperature=1.5,
                                        seed=3, extra_body={"ignore_eos": True, "min_p": 1.0})
    assert sampled.choices[0].text == greedy_text
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]
    continued = client.chat.completions.create(
        model=base_name, messages=messages, max_tokens=2,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    fresh = client.chat.completions.create(model=base_name, messages=messages, max_tokens=2)
    assert continued.usage.prompt_tokens < fresh.usage.prompt_tokens  # no end-of-turn, no new turn


def test_prefix_cache_hits_show_in_metrics_and_dashboard_state(client, base_name, server) -> None:
    long_prompt = " ".join(["the cat sat on the mat"] * 8)  # 48 words: three full 16-token blocks
    before = httpx.get(f"{server.url}/v1/dashboard/state").json()["prefix_cache"]["hits"]
    for _ in range(2):
        client.completions.create(model=base_name, prompt=long_prompt, max_tokens=2, temperature=0)
    state = httpx.get(f"{server.url}/v1/dashboard/state").json()
    assert state["prefix_cache"]["hits"] >= before + 2 and state["kv_cache"]["kv_blocks_cached"] >= 2
    text = httpx.get(f"{server.url}/metrics").text
    hits = float(re.search(r"^prolora_prefix_cache_hits_total (\S+)$", text, re.M).group(1))
    assert hits == state["prefix_cache"]["hits"] and "prolora_prefix_cache_misses_total" in text
    assert re.search(r"^prolora_kv_blocks_cached \S+$", text, re.M)
