"""The ``prolora-serve serve`` console script as a user runs it: env settings, --register,
a working server, a clean shutdown on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import save_adapter

CONFIG = ProLoRAConfig(r=4, unshared_r=1, reduce_lora_A_x=2, reduce_lora_B_x=2, lora_alpha=8,
                       target_modules=("q_proj", "v_proj"))


def tiny_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoConfig

    from prolora_serve.server.engine.model import LlamaModel

    return LlamaModel(AutoConfig.from_pretrained(model_dir)).linear_shapes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError("the server did not become healthy")


def test_serve_command_end_to_end(tiny_llama_dir, tmp_path) -> None:
    demo = tmp_path / "demo"
    save_adapter(random_adapter(CONFIG, tiny_linear_shapes(tiny_llama_dir), b_std=0.3), demo / "demo-a")
    port = free_port()
    env = {**os.environ, "PROLORA_SERVE_MODEL": str(tiny_llama_dir), "PROLORA_SERVE_DTYPE": "fp32",
           "PROLORA_SERVE_PORT": str(port), "PROLORA_SERVE_ADAPTER_DIR": str(tmp_path / "store"),
           "PROLORA_SERVE_KV_CACHE_MEMORY": "8MiB", "PROLORA_SERVE_ADAPTER_MEMORY": "8MiB",
           "PROLORA_SERVE_LOG_LEVEL": "warning"}
    script = Path(sys.executable).with_name("prolora-serve")
    process = subprocess.Popen([str(script), "serve", "--register", str(demo)], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        assert [a["id"] for a in httpx.get(f"{url}/adapters").json()["data"]] == ["demo-a"]
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "demo-a", "prompt": "the cat", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0
    assert (tmp_path / "store" / "demo-a.safetensors").is_file()


def test_bench_device_dry_run_lists_its_steps_without_a_gpu(capsys) -> None:
    """The device check's --dry-run needs no GPU: it lists every step and exits 0."""
    from prolora_serve.server import cli
    from prolora_serve.server.engine import bench_device

    assert cli.main(["bench", "device", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for step in bench_device.STEPS:
        assert step.name in out and step.summary in out
    for test_file in bench_device.GPU_TEST_FILES:
        assert (bench_device.REPO / test_file).is_file()
    assert "32 distinct PRoLoRA r=32 u=4 m=n=7" in out and "llama2-7b bf16" in out
    assert cli.main(["bench", "device", "--dry-run", "--skip", "throughput"]) == 0
    assert "throughput" not in capsys.readouterr().out.split("this machine:")[0]


def test_bench_is_one_command_group_forwarding_each_benchmarks_options(capsys) -> None:
    import pytest

    from prolora_serve.server import cli

    own_option = {"kernels": "--pool-dtype", "engine": "--rss-counts", "model": "--batches",
                  "grammar": "--rows", "prefix": "--system-tokens", "cold-load": "--under-load", "demo-quality": "--threads", "param-efficiency": "--threads",
                  "registry": "--counts", "device": "--dry-run", "layers7b": "--layers",
                  "ray": "--concurrency", "http": "--vllm-python"}
    assert set(cli.BENCHMARKS) == set(own_option)
    for name, option in own_option.items():
        with pytest.raises(SystemExit) as done:
            cli.main(["bench", name, "--help"])
        assert done.value.code == 0 and option in capsys.readouterr().out, name
    with pytest.raises(SystemExit):
        cli.main(["serve", "--no-such-flag"])  # only benchmarks take options they parse themselves
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
