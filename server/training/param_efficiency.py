"""Parameter efficiency, reproduced small: LoRA r=2 against PRoLoRA r=8, u=1, m=n=7.

    python -m prolora_serve.server.training.param_efficiency [--task french] [--seeds 0,1,2]
        [--arms lora,prolora,prolora-lr] [--shared-lr-factor 3]

Both adapt all seven projections of the default model with (almost) the same number of
trainable parameters (the paper's Table 2 budget, scaled to SmolLM2-135M). Same data, steps,
learning rate and seeds; the metrics are the held-out loss of the task's reference replies and
the task score of greedy replies to the held-out prompts. The optional ``prolora-lr`` arm gives
the shared tensors a larger learning rate. Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from .base import TrainingBase, load_training_base
from .demo_tasks import DEMO_TASKS, DemoTask, add_demo_script_args, apply_threads
from .generate import chat_replies
from .inject import detach_adapters
from .trainer import TrainConfig, train_adapter

PROLORA_SHAPE = dict(method="prolora", r=8, unshared_r=1, reduce_a=7, reduce_b=7)
DEFAULT_ARMS = ("lora", "prolora")


def arm_settings(key: str, lr: float, shared_lr_factor: float) -> tuple[str, dict]:
    """An arm's table label and its TrainConfig overrides; everything else is shared.

    ``prolora-lr`` gives A0/B0 a larger learning rate: their gradient sums over the m (n)
    positions each chunk is broadcast to, where updates partly cancel (paper s4.4, future work).
    """
    if key == "lora":
        return "LoRA r=2", dict(method="lora", r=2)
    if key == "prolora":
        return "PRoLoRA r=8 u=1 m=n=7", PROLORA_SHAPE
    if key == "prolora-lr":
        return (f"PRoLoRA, shared lr x{shared_lr_factor:g}",
                dict(PROLORA_SHAPE, lr_shared=lr * shared_lr_factor))
    raise ValueError(f"unknown arm {key!r}: use lora, prolora or prolora-lr")


@dataclass
class Run:
    arm: str
    seed: int
    trainable_params: int
    final_train_loss: float
    heldout_loss: float
    task_score: float
    seconds: float


def run_arm(base: TrainingBase, config: TrainConfig, arm: str, task: DemoTask, prompts: int,
            max_tokens: int, demo_dir: Path) -> Run:
    """Train one adapter on the loaded base, measure it, then restore the bare base."""
    started = time.perf_counter()
    try:
        result = train_adapter(config, base=base)
        replies = chat_replies(base.model, base.tokenizer,
                               task.heldout_conversations(demo_dir)[:prompts], max_tokens)
    finally:
        detach_adapters(base.model)
    return Run(arm, config.seed, result.num_trainable_params, result.final_loss,
               float(result.eval_loss), task.score(replies), time.perf_counter() - started)


def summarize(runs: list[Run]) -> list[dict]:
    rows = []
    for arm in dict.fromkeys(r.arm for r in runs):
        mine = [r for r in runs if r.arm == arm]
        losses, scores = [r.heldout_loss for r in mine], [r.task_score for r in mine]
        rows.append({"arm": arm, "trainable_params": mine[0].trainable_params, "seeds": len(mine),
                     "heldout_loss_mean": statistics.fmean(losses),
                     "heldout_loss_std": statistics.pstdev(losses),
                     "task_score_mean": statistics.fmean(scores),
                     "final_train_loss_mean": statistics.fmean(r.final_train_loss for r in mine)})
    return rows


def format_table(rows: list[dict], runs: list[Run]) -> str:
    lines = [f"{'arm':<28} {'params':>8} {'held-out loss':>16} {'task score':>10} {'train loss':>10}  per seed"]
    for row in rows:
        per_seed = " ".join(f"{r.heldout_loss:.4f}" for r in runs if r.arm == row["arm"])
        lines.append(f"{row['arm']:<28} {row['trainable_params']:>8} "
                     f"{row['heldout_loss_mean']:>9.4f} ±{row['heldout_loss_std']:.4f} "
                     f"{row['task_score_mean']:>10.2f} {row['final_train_loss_mean']:>10.4f}  {per_seed}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", choices=tuple(DEMO_TASKS), default="french")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="lora, prolora, prolora-lr")
    parser.add_argument("--shared-lr-factor", type=float, default=3.0,
                        help="A0/B0 learning rate = lr x this, in the prolora-lr arm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts scored per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    add_demo_script_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    apply_threads(args)
    task = DEMO_TASKS[args.task]
    shared = TrainConfig(data=task.train_path(args.demo_dir), eval_data=task.heldout_path(args.demo_dir),
                         base=args.base, alpha=16.0, dropout=0.05, lr=args.lr, steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, warmup_ratio=0.05,
                         max_grad_norm=1.0, progress=False)
    base = load_training_base(args.base)
    arms = [arm_settings(key, args.lr, args.shared_lr_factor) for key in args.arms.split(",")]
    runs = []
    for seed in args.seeds.split(","):
        for arm, overrides in arms:
            runs.append(run_arm(base, replace(shared, seed=int(seed), **overrides), arm, task,
                                args.prompts, args.max_tokens, args.demo_dir))
            print(f"{arm} seed {seed}: held-out loss {runs[-1].heldout_loss:.4f} "
                  f"({runs[-1].seconds:.0f} s)", file=sys.stderr, flush=True)
    rows = summarize(runs)
    print(json.dumps({"task": args.task, "steps": args.steps, "batch_size": args.batch_size,
                      "lr": args.lr, "summary": rows, "runs": [asdict(r) for r in runs]}))
    print(format_table(rows, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
