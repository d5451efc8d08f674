"""The typed client, the CLI's remote adapter commands and the load generator, against a real
server (tiny random LLaMA, fp32)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter
from prolora_serve.clients import loadgen
from prolora_serve.clients.client import AsyncProloraClient, ProloraAPIError, ProloraClient
from prolora_serve.server import cli
from prolora_serve.server.config import ServerConfig

ADMIN_KEY = "admin-secret"
CONFIG = ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=2, reduce_lora_B_x=2, lora_alpha=16,
                       target_modules=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def server(live_server, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    server = live_server(ServerConfig.from_options(model=str(tiny_llama_dir), dtype="fp32",
                                      adapter_dir=root / "adapters", adapter_memory=8 << 20,
                                      kv_cache_memory=8 << 20, max_model_len=128,
                                      admin_key=ADMIN_KEY))
    shapes = server.app.state.registry.linear_shapes
    server.single = root / "one.safetensors"
    server.folder = root / "pair"
    save_adapter(random_adapter(CONFIG, shapes, seed=1, b_std=0.3), server.single, single_file=True)
    save_adapter(random_adapter(CONFIG, shapes, seed=2, b_std=0.3), server.folder)
    yield server
    server.stop()


def test_sync_client_round_trip(server, monkeypatch) -> None:
    from prolora_serve.clients import client as client_module

    with ProloraClient(server.url, admin_key=ADMIN_KEY) as client:
        assert client.health()["status"] == "ok"
        info = client.upload_adapter("one", server.single)
        pair = client.upload_adapter("pair", server.folder)
        assert info.id == "one" and info.num_params == pair.num_params > 0
        assert [a.id for a in client.list_adapters()] == ["one", "pair"]
        monkeypatch.setattr(client_module, "ADAPTER_PAGE", 1)  # one adapter a page: it follows
        assert [a.id for a in client.list_adapters()] == ["one", "pair"]
        monkeypatch.undo()
        base = client.completion("the cat sat", max_tokens=6, temperature=0, ignore_eos=True)
        tuned = client.completion("the cat sat", adapter="one", max_tokens=6, temperature=0,
                                  ignore_eos=True)
        assert base.usage["completion_tokens"] == 6 and base.text != tuned.text
        chunks = list(client.stream_completion("the cat sat", adapter="one", max_tokens=6,
                                               temperature=0, ignore_eos=True))
        assert "".join(c.text for c in chunks) == tuned.text
        assert chunks[-1].usage["completion_tokens"] == 6
        assert client.get_adapter("one").resident is True
        chat = client.chat([{"role": "user", "content": "say hello"}], adapter="pair", max_tokens=3)
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert {m["id"] for m in client.models()} >= {"one", "pair"}
        assert "prolora_http_requests_total" in client.metrics()
        assert client.capacity()  # the dashboard's capacity endpoint answers
        assert client.delete_adapter("pair")["deleted"] is True
        with pytest.raises(ProloraAPIError) as err:
            client.get_adapter("pair")
        assert err.value.status == 404 and err.value.code == "adapter_not_found"
    with ProloraClient(server.url) as anonymous, pytest.raises(ProloraAPIError) as err:
        anonymous.upload_adapter("nope", server.single)  # no admin key
    assert err.value.status == 401


def test_async_client_streams_concurrently(server) -> None:
    async def run() -> tuple[list[str], str]:
        async with AsyncProloraClient(server.url, admin_key=ADMIN_KEY) as client:
            if "async-one" not in [a.id for a in await client.list_adapters()]:
                await client.upload_adapter("async-one", server.single)

            async def text(adapter: str | None) -> str:
                parts = [c.text async for c in client.stream_completion(
                    "the dog", adapter=adapter, max_tokens=5, temperature=0, ignore_eos=True)]
                return "".join(parts)

            streamed = await asyncio.gather(text(None), text("async-one"), text(None))
            whole = await client.completion("the dog", adapter="async-one", max_tokens=5,
                                            temperature=0, ignore_eos=True)
            return list(streamed), whole.text

    streamed, whole = asyncio.run(run())
    assert streamed[0] == streamed[2] and streamed[1] == whole and streamed[0] != whole


def test_cli_remote_adapter_commands(server, capsys) -> None:
    remote = ["--url", server.url, "--admin-key", ADMIN_KEY]
    assert cli.main(["adapters", "upload", "cli-one", str(server.single), *remote]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "cli-one"
    assert cli.main(["adapters", "list", *remote]) == 0
    assert "cli-one" in [a["id"] for a in json.loads(capsys.readouterr().out)]
    assert cli.main(["adapters", "show", "cli-one", *remote]) == 0
    assert json.loads(capsys.readouterr().out)["num_params"] > 0
    assert cli.main(["adapters", "delete", "cli-one", *remote]) == 0
    capsys.readouterr()
    assert cli.main(["adapters", "show", "cli-one", *remote]) == 1
    assert "404" in capsys.readouterr().err
    assert cli.main(["adapters", "list", "--url", "http://127.0.0.1:9"]) == 1  # nothing listens


def test_cli_reads_settings_from_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PROLORA_SERVE_ADAPTER_MEMORY", "1GB")
    monkeypatch.setenv("PROLORA_SERVE_PORT", "9123")
    monkeypatch.setenv("PROLORA_SERVE_REGISTER", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = cli.build_parser().parse_args(["serve", "--port", "9000", "--kv-cache-memory", "64MiB"])
    config = cli.server_config(args)
    assert config.engine.adapter_memory == 10**9 and config.port == 9000  # the flag wins over the env
    assert config.engine.kv_cache_memory == 64 << 20 and config.engine.dtype == "nf4" and config.engine.model is None
    assert config.register == [tmp_path / "a", tmp_path / "b"]
    assert config.adapter_dir == tmp_path / "xdg" / "prolora-serve" / "adapters"


def test_cli_help_and_bad_values() -> None:
    for argv in (["--help"], ["serve", "--help"], ["adapters", "--help"], ["adapters", "upload", "--help"]):
        done = subprocess.run([sys.executable, "-m", "prolora_serve.server.cli", *argv],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "prolora_serve.server.cli", "serve",
                          "--adapter-memory", "lots"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid size" in bad.stderr


def test_loadgen_reports_throughput_and_percentiles(server, capsys) -> None:
    with ProloraClient(server.url, admin_key=ADMIN_KEY) as client:
        if "load-one" not in [a.id for a in client.list_adapters()]:
            client.upload_adapter("load-one", server.single)
    code = loadgen.main(["--url", server.url, "--concurrency", "3", "--requests", "6",
                         "--adapters", "base,load-one", "--max-tokens", "4", "--ignore-eos",
                         "--prompt", "the cat"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 0 and summary["succeeded"] == 6 and summary["errors"] == 0
    assert summary["output_tokens"] == 24 and summary["per_adapter"] == {"base": 3, "load-one": 3}
    latency = summary["latency_s"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert "throughput" in captured.err and "tok/s" in captured.err
    failing = loadgen.main(["--url", server.url, "--requests", "2", "--adapters", "missing"])
    assert failing == 1 and json.loads(capsys.readouterr().out)["errors"] == 2


def test_loadgen_can_name_adapters_in_the_model_field_as_vllm_reads_them(server, capsys) -> None:
    with ProloraClient(server.url, admin_key=ADMIN_KEY) as client:
        if "load-one" not in [a.id for a in client.list_adapters()]:
            client.upload_adapter("load-one", server.single)
    config = loadgen.LoadConfig(adapters=("base", "load-one"), select_by="model", base_model="b")
    assert config.names(0) == {"model": "b"} and config.names(1) == {"model": "load-one"}
    assert loadgen.LoadConfig(adapters=("base", "x")).names(1) == {"adapter": "x"}
    assert loadgen.LoadConfig(adapters=("base",)).names(0) == {}
    common = ["--url", server.url, "--requests", "4", "--adapters", "base,load-one",
              "--max-tokens", "3", "--ignore-eos", "--select-by", "model"]
    assert loadgen.main(common) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["output_tokens"] == 12 and summary["per_adapter"] == {"base": 2, "load-one": 2}
    # base rows now name a model the server does not serve: those two fail, the adapter rows pass
    assert loadgen.main([*common, "--base-model", "no-such-model"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["errors"] == 2 and summary["output_tokens"] == 6
    with pytest.raises(ValueError, match="select_by"):
        loadgen.LoadConfig(select_by="header")


def test_percentile_matches_numpy() -> None:
    values = list(np.random.default_rng(0).random(37))
    for q in (0, 10, 50, 90, 99, 100):
        assert loadgen.percentile(values, q) == pytest.approx(np.percentile(values, q))
