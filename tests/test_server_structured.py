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


# ---- tools ---------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "weather in Paris?"}]


def _check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "celsius"} and args["city"] in ("Paris", "Oslo")
    assert isinstance(args["celsius"], bool)


def test_named_tool_choice_returns_a_valid_call(client, base) -> None:
    for model in (base, "pro"):
        result = client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER, TIME], max_tokens=64, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        _check_weather(call.function.arguments)


def test_required_tool_choice_calls_one_of_the_tools(client, base) -> None:
    result = client.chat.completions.create(
        model="lora", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=0.7, seed=5)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        _check_weather(call.function.arguments)
    else:
        assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_tool_calls_stream_as_openai_streams_them(client, base) -> None:
    stream = client.chat.completions.create(
        model=base, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas = [c.choices[0] for c in stream if c.choices]
    first = deltas[0].delta.tool_calls[0]
    assert deltas[0].delta.role == "assistant" and first.id.startswith("call_")
    assert first.function.name == "get_weather" and first.index == 0
    arguments = "".join(d.delta.tool_calls[0].function.arguments or "" for d in deltas if d.delta.tool_calls)
    _check_weather(arguments)
    assert deltas[-1].finish_reason == "tool_calls"
    required = client.chat.completions.create(
        model=base, messages=ASK, tools=[TIME], tool_choice="required", max_tokens=80,
        temperature=0, stream=True)
    deltas = [c.choices[0] for c in required if c.choices]
    calls = [call for d in deltas for call in (d.delta.tool_calls or [])]
    assert calls and all(call.function.name == "get_time" for call in calls)
    assert deltas[-1].finish_reason == "tool_calls"


def test_tool_messages_render_through_the_template_and_auto_needs_template_support(client, base) -> None:
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"}]
    answer = client.chat.completions.create(model=base, messages=history, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content is not None and answer.usage.prompt_tokens > 40
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=base, messages=ASK, tools=[WEATHER], max_tokens=4)
    assert "chat template that renders tools" in err.value.body["message"]  # tool_choice auto
    plain = client.chat.completions.create(model=base, messages=ASK, tools=[WEATHER],
                                           tool_choice="none", max_tokens=4, temperature=0)
    assert plain.choices[0].message.tool_calls is None
    for extra, fragment in (({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "nope"),
                            ({"tool_choice": "required"}, "needs tools"),
                            ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=base, messages=ASK, max_tokens=4, extra_body=extra)
        assert fragment in bad.value.body["message"]


def test_hermes_tool_calls_are_parsed_from_auto_output() -> None:
    from prolora_serve.server.api.schemas import ChatCompletionRequest
    from prolora_serve.server.api.tools import plan_tools, template_renders_tools, tool_calls_from_text

    body = ChatCompletionRequest(messages=ASK, tools=[WEATHER, TIME])
    assert not template_renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_renders_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    plan = plan_tools(body, renders_tools=True)
    assert plan.mode == "auto" and plan.grammar is None and len(plan.template_tools) == 2
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", '
            '"celsius": false}}</tool_call>\n<tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    calls, content = tool_calls_from_text(plan, text)
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo", "celsius": False}
    assert content == "Let me check."
    assert tool_calls_from_text(plan, "no calls here") == ([], "no calls here")


def test_grammar_mask_matches_the_reference_on_explicit_allowed_sets() -> None:
    import torch

    from conftest import build_byte_tokenizer
    from prolora_serve.server.engine.grammar import Grammars, GrammarSpec, reference_mask

    tokenizer = build_byte_tokenizer()
    grammars = Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    matcher = grammars.matcher(GrammarSpec.choice(["ab", "cd"]))
    logits = torch.randn(2, len(tokenizer))
    allowed = {tokenizer.convert_tokens_to_ids(c) for c in "ac"}  # the choices' first bytes
    expected = reference_mask(logits, [allowed, None])  # row 1: no grammar, left as it is
    assert grammars.mask_logits(logits, [matcher, None]) == []
    assert torch.equal(logits, expected)
