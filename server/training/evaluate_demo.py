"""Score the demo adapters on held-out prompts, base model against adapter.

    python -m prolora_serve.server.training.evaluate_demo [--prompts 30] [--max-tokens 48]

For each task the base model and the base + adapter answer the same held-out prompts (greedy);
the score is the fraction of replies showing the task's behaviour (French text, strict JSON,
pirate words). Prints one JSON object, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from prolora_serve.adapters.format import load_adapter

from .base import TrainingBase, load_training_base
from .demo_tasks import DEMO_DIR, DEMO_TASKS, DemoTask, add_demo_script_args, apply_threads
from .generate import chat_replies
from .inject import attach_adapter, detach_adapters


@dataclass
class TaskScore:
    task: str
    prompts: int
    base_score: float
    adapter_score: float
    adapter_params: int
    adapter_file_bytes: int
    example_base: str
    example_adapter: str


def score_task(base: TrainingBase, task: DemoTask, prompts: int, max_tokens: int,
               demo_dir: Path = DEMO_DIR) -> TaskScore:
    """Base and adapter replies to the first ``prompts`` held-out conversations, scored."""
    conversations = task.heldout_conversations(demo_dir)[:prompts]
    base_replies = chat_replies(base.model, base.tokenizer, conversations, max_tokens)
    adapter = load_adapter(task.adapter_path(demo_dir))
    attach_adapter(base.model, adapter)
    try:
        adapter_replies = chat_replies(base.model, base.tokenizer, conversations, max_tokens)
    finally:
        detach_adapters(base.model)
    return TaskScore(task.name, len(conversations), task.score(base_replies),
                     task.score(adapter_replies), adapter.num_params,
                     task.adapter_path(demo_dir).stat().st_size, base_replies[0], adapter_replies[0])


def format_table(scores: list[TaskScore]) -> str:
    lines = [f"{'task':<8} {'prompts':>7} {'base':>6} {'adapter':>8} {'params':>8} {'file KiB':>9}"]
    for s in scores:
        lines.append(f"{s.task:<8} {s.prompts:>7} {s.base_score:>6.2f} {s.adapter_score:>8.2f} "
                     f"{s.adapter_params:>8} {s.adapter_file_bytes / 1024:>9.0f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated task names")
    parser.add_argument("--prompts", type=int, default=30, help="held-out prompts per task")
    parser.add_argument("--max-tokens", type=int, default=48)
    add_demo_script_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    started = time.perf_counter()
    base = load_training_base(args.base)
    scores = [score_task(base, DEMO_TASKS[name], args.prompts, args.max_tokens, args.demo_dir)
              for name in args.tasks.split(",")]
    print(json.dumps({"tasks": [asdict(s) for s in scores],
                      "seconds": round(time.perf_counter() - started, 1)}, ensure_ascii=False))
    print(format_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
