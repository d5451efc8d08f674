"""``prolora-serve train``: fine-tune a PRoLoRA (or LoRA) adapter from a JSONL file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from ...adapters.weights import ADAPTER_TORCH_DTYPES
from .trainer import LLAMA_LINEARS, METHODS, TrainConfig, train_adapter
from .base import BASE_DTYPES


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="JSONL: {'messages': [...]} or {'prompt', 'completion'}")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="*.safetensors for the single-file form, otherwise a directory")
    parser.add_argument("--base", default=None, help="HF model directory (default: embedded model)")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES, default="fp32",
                        help="how the frozen base is held (nf4 = QLoRA-style 4-bit)")
    parser.add_argument("--method", choices=METHODS, default="prolora", help="lora forces u=r, m=n=1")
    parser.add_argument("-r", "--rank", dest="r", type=int, default=8)
    parser.add_argument("-u", "--unshared-rank", dest="unshared_r", type=int, default=1)
    parser.add_argument("-m", "--reduce-a", dest="reduce_a", type=int, default=7, help="A sharing ratio")
    parser.add_argument("-n", "--reduce-b", dest="reduce_b", type=int, default=7, help="B sharing ratio")
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--target-modules", default=",".join(LLAMA_LINEARS),
                        help="comma-separated module names")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lr-shared", type=float, default=None, help="learning rate of A0/B0")
    parser.add_argument("--lr-unshared", type=float, default=None, help="learning rate of Au/Bu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-grad-norm", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out JSONL for a final loss")
    parser.add_argument("--save-dtype", choices=tuple(ADAPTER_TORCH_DTYPES), default="fp32")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is fastest on a busy shared CPU)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = ("data", "output", "base", "base_dtype", "method", "r", "unshared_r", "reduce_a",
              "reduce_b", "alpha", "dropout", "lr", "lr_shared", "lr_unshared", "steps",
              "batch_size", "grad_accum", "max_length", "warmup_ratio", "max_grad_norm", "seed",
              "eval_data", "save_dtype")
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return TrainConfig(**{f: getattr(args, f) for f in fields}, target_modules=targets,
                       progress=not args.no_progress)


def run_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        result = train_adapter(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {"output": str(result.output), "trainable_params": result.num_trainable_params,
               "examples": result.num_examples, "dropped_examples": result.num_dropped,
               "final_loss": round(result.final_loss, 4), "eval_loss": result.eval_loss,
               "seconds": round(result.seconds, 1)}
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="fine-tune a PRoLoRA adapter on a JSONL dataset",
                                   description=__doc__)
    add_train_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prolora-serve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
