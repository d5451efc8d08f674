"""ServerConfig, size parsing, and the container files agreeing with the CLI."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
import yaml

from prolora_serve.server import cli
from prolora_serve.server.config import ServerConfig, env_name, parse_size

DOCKER = Path(__file__).resolve().parent.parent / "docker"


@pytest.mark.parametrize("text, expected", [
    ("256MiB", 256 << 20), ("1GB", 10**9), ("1GiB", 1 << 30), ("512M", 512 << 20),
    ("1048576", 1 << 20), (" 2 kib ", 2048), ("1.5GiB", 3 << 29), ("7b", 7), (42, 42),
])
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1MiB", "1 PB", "MiB", "1e9"])
def test_parse_size_refuses_garbage(text) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "fp8"}, "dtype"), ({"port": 70000}, "port"), ({"max_batch": 0}, "max_batch"),
    ({"adapter_memory": -5}, "adapter_memory"), ({"max_upload_size": 0}, "max_upload_size"),
    ({"register": ["/no/such/dir"]}, "no such directory"), ({"threads": 0}, "threads"),
])
def test_server_config_validates(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_options(**overrides)


def test_empty_keys_mean_no_key_and_engine_config_carries_the_settings(tmp_path) -> None:
    config = ServerConfig.from_options(api_key="", admin_key="", adapter_memory=3 << 20, kv_cache_memory=5 << 20,
                          max_batch=4, max_model_len=64, adapter_dir=tmp_path)
    assert config.api_key is None and config.admin_key is None
    engine = config.engine
    assert (engine.adapter_memory, engine.kv_cache_memory, engine.max_batch,
            engine.max_model_len, engine.dtype, engine.model) == (3 << 20, 5 << 20, 4, 64, "nf4", None)


def _serve_env_names() -> set[str]:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse internals
    return {env_name(opt) for action in serve._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def test_container_files_only_set_real_settings() -> None:
    known = _serve_env_names() | {"PROLORA_SERVE_CACHE"}  # the loader's model cache
    for name in ("Dockerfile.cpu", "Dockerfile.cuda", "compose.yaml"):
        used = set(re.findall(r"PROLORA_SERVE_[A-Z_]+", (DOCKER / name).read_text()))
        assert used and used <= known, (name, used - known)


def test_dockerfiles_copy_what_the_package_needs() -> None:
    root = DOCKER.parent
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        assert "make env" in text and 'CMD ["serve"]' in text
        for folder in ("adapters", "kernels", "server", "clients"):
            assert f"COPY {folder} ./{folder}" in text and (root / folder).is_dir()
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    dockerfiles = {s["build"]["dockerfile"] for s in compose["services"].values()}
    assert dockerfiles == {"docker/Dockerfile.cpu", "docker/Dockerfile.cuda"}


@pytest.mark.parametrize("option, base, compute, expected", [
    ("auto", "nf4", torch.float32, torch.float16),  # quantized base on the CPU: 16-bit adapters
    ("auto", "int8", torch.float32, torch.float16),
    ("auto", "fp32", torch.float32, torch.float32),
    ("auto", "bf16", torch.bfloat16, torch.bfloat16),
    ("auto", "nf4", torch.bfloat16, torch.bfloat16),  # a GPU computes nf4 in bf16
    ("fp32", "nf4", torch.float32, torch.float32),
    ("bf16", "fp32", torch.float32, torch.bfloat16),
])
def test_adapter_dtype_resolution(option: str, base: str, compute: torch.dtype,
                                  expected: torch.dtype) -> None:
    from prolora_serve.server.engine.engine import resolve_adapter_dtype

    assert resolve_adapter_dtype(option, base, compute) == expected


def test_adapter_dtype_is_validated_and_reaches_the_engine() -> None:
    with pytest.raises(ValueError, match="adapter_dtype"):
        ServerConfig.from_options(adapter_dtype="fp8")
    assert ServerConfig.from_options(adapter_dtype="bf16").engine.adapter_dtype == "bf16"


def test_adapter_dtype_choices_match_the_engine_dtypes() -> None:
    from prolora_serve.adapters.weights import ADAPTER_TORCH_DTYPES
    from prolora_serve.server.config import ADAPTER_DTYPES

    assert ADAPTER_DTYPES == ("auto", *ADAPTER_TORCH_DTYPES)  # config.py stays torch-free


def test_kv_cache_dtype_is_validated_resolved_and_sizes_the_cache() -> None:
    from prolora_serve.server.engine.engine import (EngineConfig, LLMEngine,
                                                    resolve_kv_cache_dtype)
    from prolora_serve.server.engine.model import LlamaModel

    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServerConfig.from_options(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
    assert ServerConfig.from_options(kv_cache_dtype="fp16").engine.kv_cache_dtype == "fp16"
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("bf16", torch.float32) == torch.bfloat16
    model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    config = EngineConfig(kv_cache_memory=1 << 20, block_size=16)
    # 2 layers x (K, V) x 16 slots x 2 heads x 8 dims = 1024 elements: 4096 bytes a block in
    # fp32, 2048 in fp16, so the same budget holds twice the tokens
    assert LLMEngine._num_blocks(config, model, torch.float32) == 256  # noqa: SLF001
    assert LLMEngine._num_blocks(config, model, torch.float16) == 512  # noqa: SLF001


# --- every option, from its one declaration ----------------------------------------------------
from prolora_serve.server import config as settings  # noqa: E402

# Settings that accept any text at start-up (a model path, a host, a key) have no bad value.
FREE_TEXT = {"model", "host", "adapter_dir", "cache_dir", "api_key", "admin_key", "url",
             "ray_address"}


def _bad_texts(opt: settings.Option) -> list[str]:
    """Flag/variable texts the option must refuse, derived from how it parses and checks."""
    if opt.choices is not None:
        return ["not-a-choice"]
    if opt.parse is settings.parse_size:
        return ["lots", "0"] if opt.check is settings.positive else ["lots", "-1"]
    if opt.parse is int:
        return ["x", "0" if opt.check is settings.positive else "70000"]
    if opt.parse is float:
        return ["x", "0", "nan"] if opt.check is settings.positive_number else ["x"]
    if opt.parse is settings.parse_bool:
        return ["maybe"]
    if opt.check in (settings.existing_directories, settings.existing_directory):
        return ["/no/such/dir"]
    if opt.check is settings.device_name:
        return ["tpu"]
    return []


def _serve_parser():
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - argparse internals


@pytest.mark.parametrize("cls", [settings.ServerConfig, settings.RemoteConfig])
def test_every_declared_option_has_flag_variable_help_and_refuses_bad_values(cls) -> None:
    parser = _serve_parser() if cls is settings.ServerConfig else argparse_parent(cls)
    actions = {action.dest: action for action in parser._actions}  # noqa: SLF001
    declared = list(settings.declared_options(cls))
    assert len(declared) >= (20 if cls is settings.ServerConfig else 3)
    for f, opt in declared:
        action = actions[f.name]
        flag = settings.flag_name(f.name)
        negated = ["--no-" + flag[2:]] if opt.parse is settings.parse_bool else []
        assert action.option_strings == [flag, *negated]
        assert opt.help and settings.env_name(f.name) in action.help and "default:" in action.help
        bad = _bad_texts(opt)
        assert bool(bad) != (f.name in FREE_TEXT), f"{f.name}: add a bad value or mark it free text"
        for text in bad:
            with pytest.raises(ValueError, match=re.escape(settings.env_name(f.name))):
                settings.from_sources(cls, {}, {settings.env_name(f.name): text})


def argparse_parent(cls):
    import argparse

    parser = argparse.ArgumentParser()
    settings.add_options(parser, cls)
    return parser


def test_bad_flag_values_name_the_flag(capsys) -> None:
    for flag, text in (("--max-batch", "x"), ("--dtype", "fp8"), ("--port", "many")):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", flag, text])
        assert flag in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--max-batch", "0"])
    with pytest.raises(ValueError, match=r"max_batch \(--max-batch, PROLORA_SERVE_MAX_BATCH\)"):
        cli.server_config(args)


def test_code_values_get_the_same_checks_as_text() -> None:
    from prolora_serve.server.engine.engine import EngineConfig

    for value in (True, 0, -3, 2.5, "0"):
        with pytest.raises(ValueError, match="max_batch"):
            EngineConfig(max_batch=value)  # a bool is not a count (ServerConfig agreed; now both)
    assert EngineConfig(max_batch="8").max_batch == 8
    assert EngineConfig(adapter_backend="reference").adapter_backend == "reference"
    with pytest.raises(ValueError, match="adapter_backend"):
        EngineConfig(adapter_backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown settings: kv_cache_bytes"):
        ServerConfig.from_options(kv_cache_bytes=1 << 20)


def test_engine_settings_are_held_not_copied() -> None:
    config = ServerConfig.from_options(max_batch=3, port=1234)
    assert config.engine.max_batch == 3 and config.port == 1234
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    engine_fields = {f.name for f in dataclasses.fields(settings.EngineConfig)}
    assert not server_fields & engine_fields


def test_adapter_backend_choices_match_the_kernels() -> None:
    from prolora_serve.kernels.interface import BACKEND_NAMES

    assert settings.ADAPTER_BACKENDS == BACKEND_NAMES  # config.py stays torch-free


def test_env_fills_what_flags_leave_and_flags_win(monkeypatch) -> None:
    monkeypatch.setenv("PROLORA_SERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("PROLORA_SERVE_ADAPTER_BACKEND", "torch")
    monkeypatch.setenv("PROLORA_SERVE_API_KEY", "")
    args = cli.build_parser().parse_args(["serve", "--adapter-backend", "reference"])
    config = cli.server_config(args)
    assert config.engine.max_queue == 7 and config.engine.adapter_backend == "reference"
    assert config.api_key is None


def test_readme_documents_every_serve_option() -> None:
    readme = (DOCKER.parent / "README.md").read_text()
    missing = [settings.flag_name(f.name) for f, _ in settings.declared_options(ServerConfig)
               if f"`{settings.flag_name(f.name)}" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
