"""Structured outputs over HTTP with the official client: response_format (json_object,
json_schema, parse() with a pydantic model) and vLLM's guided_* fields, each row of a mixed
batch under its own adapter and grammar. A tiny random model over a byte-level tokenizer:
whatever it would say, the grammar decides what it may say."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter
from prolora_serve.server.config import ServerConfig

PROMPT = "the cat sat on the mat"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}
ADAPTERS = {
    "pro": ProLoRAConfig(r=8, unshared_r=1, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=16,
                         target_modules=("q_proj", "v_proj", "down_proj")),
    "lora": ProLoRAConfig(r=4, unshared_r=4, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=8,
                          target_modules=("q_proj", "o_proj"), peft_type="LORA"),
}


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def server(live_server, tiny_bytes_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    config = ServerConfig.from_options(model=str(tiny_bytes_llama_dir), dtype="fp32",
                                       adapter_dir=root / "adapters", adapter_memory=16 << 20,
                                       kv_cache_memory=16 << 20, max_batch=16, max_model_len=512)
    server = live_server(config)
    shapes = server.app.state.registry.linear_shapes
    for seed, (name, adapter_config) in enumerate(ADAPTERS.items()):
        path = root / f"{name}.safetensors"
        save_adapter(random_adapter(adapter_config, shapes, seed=seed, b_std=0.3), path, single_file=True)
        with open(path, "rb") as handle:
            response = httpx.post(f"{server.url}/adapters", data={"name": name}, files={"file": handle})
        assert response.status_code == 201, response.text
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.app.state.model_name


def test_parse_with_a_pydantic_model_round_trips(client, base) -> None:
    for model in (base, "pro"):
        completion = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "is the sky blue?"}],
            response_format=Verdict, max_tokens=64, temperature=0)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)
        assert Verdict.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_and_json_object_with_sampling_logprobs_and_streaming(client, base) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA, "strict": True}}
    sampled = client.chat.completions.create(
        model=base, messages=[{"role": "user", "content": "hi"}], response_format=fmt,
        max_tokens=64, temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    body = json.loads(sampled.choices[0].message.content)
    assert set(body) == {"ok", "color"} and body["color"] in ("red", "green", "blue")
    assert len(sampled.choices[0].logprobs.content) == sampled.usage.completion_tokens
    stream = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": "hi"}], response_format=fmt,
        max_tokens=64, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text).keys() == {"ok", "color"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    anything = client.completions.create(model=base, prompt=PROMPT, max_tokens=24, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}})
    text = anything.choices[0].text
    assert text.lstrip().startswith(("{", "["))  # the builtin grammar: JSON from the first byte
    if anything.choices[0].finish_reason == "stop":
        json.loads(text)


def test_guided_choice_regex_and_grammar(client, base) -> None:
    choice = client.completions.create(model=base, prompt=PROMPT, max_tokens=16, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].text in ("yes", "no", "maybe")
    assert choice.choices[0].finish_reason == "stop"
    regex = client.completions.create(model="pro", prompt=PROMPT, max_tokens=16, temperature=0.8,
                                      seed=1, extra_body={"guided_regex": "[a-c]{3}-[0-9]{2}"})
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", regex.choices[0].text)
    ebnf = 'root ::= "(" digit digit ")"\ndigit ::= [0-9]'
    grammar = client.completions.create(model=base, prompt=PROMPT, max_tokens=16, temperature=0,
                                        extra_body={"guided_grammar": ebnf})
    assert re.fullmatch(r"\(\d\d\)", grammar.choices[0].text)
    stopped = client.completions.create(model=base, prompt=PROMPT, max_tokens=16, temperature=0,
                                        stop=["-"], extra_body={"guided_regex": "[a-c]{3}-[0-9]{2}"})
    assert re.fullmatch("[a-c]{3}", stopped.choices[0].text)  # stop strings still apply


def _requests() -> list[dict]:
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}
    return [
        {"model": "pro", "extra_body": {"guided_choice": ["alpha", "beta", "gamma"]}},
        {"model": "lora", "extra_body": {"response_format": fmt}},
        {"model": None, "extra_body": {"guided_regex": "[0-9]{4}"}},
        {"model": "pro", "extra_body": {}},  # no grammar in the same batch
        {"model": None, "extra_body": {"response_format": fmt}},
        {"model": "lora", "extra_body": {"guided_regex": "(ab|cd)+x"}},
    ]


def test_grammars_in_a_mixed_batch_equal_the_same_requests_alone(server, base) -> None:
    async def one(client: openai.AsyncOpenAI, spec: dict) -> str:
        result = await client.completions.create(
            model=spec["model"] or base, prompt=PROMPT, max_tokens=40, temperature=0,
            extra_body=spec["extra_body"])
        return result.choices[0].text

    async def run(together: bool) -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        if together:
            return list(await asyncio.gather(*(one(client, spec) for spec in _requests())))
        return [await one(client, spec) for spec in _requests()]

    alone = asyncio.run(run(False))
    together = asyncio.run(run(True))
    assert together == alone
    assert alone[0] in ("alpha", "beta", "gamma") and re.fullmatch("[0-9]{4}", alone[2])
    assert json.loads(alone[1]).keys() == json.loads(alone[4]).keys() == {"ok", "color"}


@pytest.mark.parametrize("extra, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"guided_regex": "([a-z"}, "guided_regex", "regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, None, "at most one"),
])
def test_bad_grammars_are_400_with_the_compilers_message(server, extra, param, fragment) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, **extra})
    error = response.json()["error"]
    assert response.status_code == 400 and fragment in error["message"], error
    if param is not None:
        assert error["param"] == param
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
