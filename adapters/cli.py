"""Offline adapter commands: ``inspect``, ``export-dense``, ``compress``.

``register_offline_commands`` adds them to the ``prolora-serve adapters`` sub-parsers; each
sets ``func(args) -> exit code``. Also runnable alone:
``python -m prolora_serve.adapters.cli inspect ADAPTER``. SRC/DST are adapter directories or
single files; a DST ending in ``.safetensors`` is written as a single file. ``--base-model
DIR`` (a Hugging Face model directory; only its config.json is read) supplies every module's
(in, out) and validates the adapter against that model; files written by this project
record their dims, so it is needed only for older or third-party files with unshared_r = 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .accounting import AccountingError, ModelShape
from .config import AdapterConfigError
from .errors import AdapterFormatError
from .format import load_adapter, save_adapter
from .peft_io import compress_dense_adapter, export_dense
from .state_dict import LinearShapes
from .summary import summarize_adapter

Command = Callable[[argparse.Namespace], int]


def register_offline_commands(subparsers: Any) -> None:
    """Add the offline commands to an ``argparse`` sub-parsers object."""
    inspect = subparsers.add_parser("inspect", help="print an adapter's config, specs, "
                                    "parameter count and bytes as JSON")
    inspect.add_argument("src", help="adapter directory or .safetensors file")
    _add_base_model(inspect)
    inspect.set_defaults(func=inspect_command)
    export = subparsers.add_parser("export-dense", help="write a PEFT LoRA (dense A/B) copy")
    _add_src_dst(export)
    export.set_defaults(func=export_dense_command)
    compress = subparsers.add_parser("compress", help="compact a dense LoRA checkpoint trained "
                                     "with PRoLoRA structure (checks the structure)")
    _add_src_dst(compress)
    compress.add_argument("--unshared-r", type=int, required=True, help="u")
    compress.add_argument("--reduce-a", type=int, required=True, help="m (A sharing ratio)")
    compress.add_argument("--reduce-b", type=int, required=True, help="n (B sharing ratio)")
    compress.add_argument("--tolerance", type=float, default=1e-4,
                          help="max relative deviation from the structure (default 1e-4)")
    compress.set_defaults(func=compress_command)


def _add_src_dst(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="adapter directory or .safetensors file")
    parser.add_argument("dst", help="output directory, or a file ending in .safetensors")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    _add_base_model(parser)


def _add_base_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", metavar="DIR",
                        help="model directory with config.json: its layer shapes supply and "
                             "check each module's (in, out), needed for files that do not "
                             "record them when unshared_r = 0")


def _base_shapes(args: argparse.Namespace) -> LinearShapes | None:
    if args.base_model is None:
        return None
    return ModelShape.from_model_dir(args.base_model).linear_shapes()


def _reports_errors(command: Command) -> Command:
    """Bad input -> one ``error:`` line on stderr and exit code 1, not a traceback."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (AdapterFormatError, AdapterConfigError, AccountingError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return run


@_reports_errors
def inspect_command(args: argparse.Namespace) -> int:
    _print_json(summarize_adapter(load_adapter(args.src, _base_shapes(args))))
    return 0


@_reports_errors
def export_dense_command(args: argparse.Namespace) -> int:
    adapter = load_adapter(args.src, _base_shapes(args))
    dst = _destination(args.dst, args.force)
    export_dense(adapter, dst, single_file=_is_single_file(dst))
    dense_params = sum(w.spec.lora_equivalent_params for w in adapter.modules.values())
    _print_json({"dst": str(dst), "peft_type": "LORA", "r": adapter.config.r,
                 "dense_params": dense_params, "compact_params": adapter.num_params})
    return 0


@_reports_errors
def compress_command(args: argparse.Namespace) -> int:
    adapter, deviation = compress_dense_adapter(args.src, args.unshared_r, args.reduce_a,
                                                args.reduce_b, tolerance=args.tolerance,
                                                linear_shapes=_base_shapes(args))
    dst = _destination(args.dst, args.force)
    save_adapter(adapter, dst, single_file=_is_single_file(dst))
    dense_params = sum(w.spec.lora_equivalent_params for w in adapter.modules.values())
    _print_json({"dst": str(dst), "max_relative_deviation": deviation,
                 "compact_params": adapter.num_params, "dense_params": dense_params})
    return 0


def _destination(dst: str, force: bool) -> Path:
    path = Path(dst)
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not force:
        raise AdapterFormatError(f"{path}: already exists; pass --force to overwrite")
    return path


def _is_single_file(dst: Path) -> bool:
    return dst.suffix.lower() == ".safetensors"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prolora-serve adapters",
                                     description="Offline PRoLoRA adapter tools")
    register_offline_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
