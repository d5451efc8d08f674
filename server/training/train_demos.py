"""Train the shipped demo adapters: ``demo/adapters/<task>.safetensors``.

    python -m prolora_serve.server.training.train_demos [--tasks french,json,pirate] [--threads 1]

The recipe of the shipped files: PRoLoRA r=8, u=1, m=n=7 on all seven projections of the
default model (fp32 base), 50 steps of batch 8, lr 3e-3, saved in fp16 (about 1.2 MB each).
About 5 minutes per adapter on one shared CPU core.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .base import load_training_base
from .demo_tasks import DEMO_TASKS, add_demo_script_args, apply_threads
from .inject import detach_adapters
from .trainer import TrainConfig, train_adapter

RECIPE = dict(method="prolora", r=8, unshared_r=1, reduce_a=7, reduce_b=7, alpha=16.0, dropout=0.0,
              lr=3e-3, steps=50, batch_size=8, max_length=128, warmup_ratio=0.05, max_grad_norm=1.0,
              seed=0, save_dtype="fp16")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", default=",".join(DEMO_TASKS))
    add_demo_script_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args)
    base = load_training_base(args.base)
    for name in args.tasks.split(","):
        task = DEMO_TASKS[name]
        config = TrainConfig(data=task.train_path(args.demo_dir), eval_data=task.heldout_path(args.demo_dir),
                             output=task.adapter_path(args.demo_dir), base=args.base, **RECIPE)
        try:
            result = train_adapter(config, base=base)
        finally:
            detach_adapters(base.model)
        print(json.dumps({"task": name, "output": str(result.output), "params": result.num_trainable_params,
                          "final_loss": round(result.final_loss, 4), "heldout_loss": round(result.eval_loss, 4),
                          "seconds": round(result.seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
