"""The ``prolora-serve`` command: ``serve``, ``adapters ...`` (remote and offline), ``train``.

Every option of ``serve`` and of the remote adapter commands can also be set with an env var
``PROLORA_SERVE_<OPTION>`` (e.g. ``PROLORA_SERVE_ADAPTER_MEMORY=1GiB``); a flag wins over
the env var. Heavy imports (torch, the engine) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ADAPTER_DTYPES, DTYPES, KV_CACHE_DTYPES, ServerConfig, default_data_dir, env_default, env_name, format_size, parse_size

DEFAULT_URL = "http://127.0.0.1:8000"
GRACEFUL_SHUTDOWN_S = 10


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _option(parser: argparse.ArgumentParser, flag: str, fallback: Any, help: str, **kwargs: Any) -> None:
    """A flag whose default is ``$PROLORA_SERVE_<FLAG>`` (converted by the flag's type) or
    ``fallback``."""
    shown = "the embedded default" if fallback is None and flag == "--model" else fallback
    parser.add_argument(flag, default=env_default(flag, fallback),
                        help=f"{help} (env {env_name(flag)}; default: {shown})", **kwargs)


def _register_dirs() -> list[str]:
    value = os.environ.get(env_name("register"), "")
    return [p for p in value.split(os.pathsep) if p]


def add_serve_command(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the HTTP server",
                                  description="Serve the base model and its adapters over HTTP.")
    _option(serve, "--model", None, "HF model directory or .gguf file")
    _option(serve, "--dtype", "nf4", "base weight format", choices=DTYPES)
    _option(serve, "--host", "127.0.0.1", "address to bind")
    _option(serve, "--port", 8000, "port to bind", type=int)
    _option(serve, "--adapter-dir", str(default_data_dir() / "adapters"), "adapter registry directory")
    _option(serve, "--adapter-memory", "256MiB", "device memory for resident adapters", type=_size)
    _option(serve, "--adapter-dtype", "auto",
            "resident adapter weights (auto: fp16 next to an nf4/int8 base on the CPU, else the "
            "model's compute dtype)", choices=ADAPTER_DTYPES)
    _option(serve, "--kv-cache-memory", "256MiB", "device memory for the KV cache", type=_size)
    _option(serve, "--kv-cache-dtype", "auto",
            "KV cache element type (auto: the model's compute dtype; fp16/bf16 hold twice the "
            "tokens per --kv-cache-memory and halve decode attention's memory traffic)",
            choices=KV_CACHE_DTYPES)
    _option(serve, "--max-batch", 32, "most sequences in one running batch", type=int)
    _option(serve, "--max-batched-tokens", 512, "most tokens in one engine step", type=int)
    _option(serve, "--max-model-len", 2048, "most tokens per sequence (prompt + output)", type=int)
    _option(serve, "--max-queue", 1024, "most waiting requests before 429", type=int)
    _option(serve, "--max-upload-size", "1GiB", "largest adapter upload", type=_size)
    _option(serve, "--api-key", None, "key required on /v1/* and adapter reads")
    _option(serve, "--admin-key", None, "key required for adapter uploads and deletes")
    _option(serve, "--device", "cpu", "torch device for the model")
    _option(serve, "--cache-dir", None, "where the converted default model is cached")
    _option(serve, "--threads", None, "torch intra-op threads (fewer can be faster on a shared CPU)",
            type=int)
    _option(serve, "--log-level", "info", "log level",
            choices=("critical", "error", "warning", "info", "debug"))
    serve.add_argument("--register", nargs="+", default=_register_dirs(), metavar="DIR",
                       help="register every adapter found in DIR at start-up, skipping ids already "
                            f"present (env {env_name('register')}, {os.pathsep!r}-separated)")
    serve.set_defaults(func=serve_command)


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model, dtype=args.dtype, device=args.device, host=args.host, port=args.port,
        adapter_dir=Path(args.adapter_dir), adapter_memory=args.adapter_memory,
        kv_cache_memory=args.kv_cache_memory, max_batch=args.max_batch,
        max_batched_tokens=args.max_batched_tokens, max_model_len=args.max_model_len,
        max_queue=args.max_queue, max_upload_size=args.max_upload_size, api_key=args.api_key,
        admin_key=args.admin_key, register=[Path(p) for p in args.register],
        cache_dir=Path(args.cache_dir) if args.cache_dir else None, log_level=args.log_level,
        threads=args.threads, adapter_dtype=args.adapter_dtype,
        kv_cache_dtype=args.kv_cache_dtype)


def serve_command(args: argparse.Namespace) -> int:
    try:
        config = server_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from .api.app import create_app

    if config.threads:
        torch.set_num_threads(config.threads)

    logging.getLogger(__name__).info(
        "model %s (%s), adapters in %s, adapter memory %s, KV cache %s",
        config.model or "embedded default", config.dtype, config.adapter_dir,
        format_size(config.adapter_memory), format_size(config.kv_cache_memory))
    # Open streams get a few seconds on Ctrl-C; then the engine fails what is left (503 events).
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return 0


# ---- remote adapter commands ------------------------------------------------------------------
def _remote_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    _option(parent, "--url", DEFAULT_URL, "server URL")
    _option(parent, "--api-key", None, "API key")
    _option(parent, "--admin-key", None, "admin key (uploads and deletes)")
    return parent


def _client(args: argparse.Namespace) -> Any:
    from prolora_serve.clients.client import ProloraClient

    return ProloraClient(args.url, api_key=args.api_key or None, admin_key=args.admin_key or None)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prolora-serve",
        description="Multi-adapter LLM inference server for compact PRoLoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_command(commands)
    add_adapter_commands(commands)
    _register_optional("prolora_serve.server.training.cli", "register", commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
