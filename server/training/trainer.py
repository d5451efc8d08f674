"""``train_adapter``: fine-tune a PRoLoRA (or plain LoRA) adapter on a frozen causal LM.

Set-up after the paper (Appendix A.2): AdamW without weight decay, linear schedule with a short
warm-up, gradient-norm clipping, adapter dropout, optional NF4 base. Optionally the shared
(A0/B0) and unshared (Au/Bu) tensors get separate learning rates (the paper's future work).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from prolora_serve.adapters.config import PEFT_TYPE_LORA, PEFT_TYPE_PROLORA, ProLoRAConfig
from prolora_serve.adapters.weights import ADAPTER_TORCH_DTYPES, CompactAdapter

from .base import BASE_DTYPES, TrainingBase, load_training_base, pad_token_id
from .data import IGNORE_INDEX, TokenizedExample, batch_stream, fixed_batches, read_jsonl, tokenize_dataset
from .inject import extract_adapter, inject_prolora, prolora_layers

METHODS = ("prolora", "lora")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    data: Path  # JSONL: {"messages": [...]} or {"prompt": ..., "completion": ...} per line
    output: Path | None = None  # *.safetensors = single file, otherwise a directory
    base: str | None = None  # HF model directory; None = the embedded default model
    base_dtype: str = "fp32"  # fp32 | bf16 | nf4
    method: str = "prolora"  # "lora" forces u = r, m = n = 1
    r: int = 8
    unshared_r: int = 1  # u
    reduce_a: int = 7  # m
    reduce_b: int = 7  # n
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = LLAMA_LINEARS
    lr: float = 2e-4
    lr_shared: float | None = None  # A0/B0; defaults to lr
    lr_unshared: float | None = None  # Au/Bu; defaults to lr
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    seed: int = 0
    eval_data: Path | None = None  # held-out JSONL; its loss is reported after training
    save_dtype: str = "fp32"
    progress: bool = True

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.output = None if self.output is None else Path(self.output)
        self.eval_data = None if self.eval_data is None else Path(self.eval_data)
        self.target_modules = tuple(self.target_modules)
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _check(self.base_dtype in BASE_DTYPES, f"base_dtype must be one of {BASE_DTYPES}")
        _check(self.save_dtype in ADAPTER_TORCH_DTYPES, f"save_dtype must be one of {tuple(ADAPTER_TORCH_DTYPES)}")
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lr_shared", "lr_unshared"):
            value = getattr(self, name)
            _check(value is None or (math.isfinite(value) and value > 0), f"{name} must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")
        _check(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        self.adapter_config()  # validates r, u, m, n, alpha and target_modules

    def adapter_config(self, base_name: str | None = None) -> ProLoRAConfig:
        lora = self.method == "lora"
        return ProLoRAConfig(
            r=self.r, unshared_r=self.r if lora else self.unshared_r,
            reduce_lora_A_x=1 if lora else self.reduce_a, reduce_lora_B_x=1 if lora else self.reduce_b,
            lora_alpha=self.alpha, target_modules=self.target_modules,
            peft_type=PEFT_TYPE_LORA if lora else PEFT_TYPE_PROLORA, base_model_name_or_path=base_name)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class TrainResult:
    adapter: CompactAdapter
    output: Path | None
    losses: list[float]  # training loss per optimizer step (token mean)
    eval_loss: float | None
    num_trainable_params: int
    num_examples: int
    num_dropped: int  # examples with no loss token left after truncation
    num_tokens: int  # tokens processed (padding excluded)
    seconds: float

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over labelled positions, and their count.

    Logits are computed only where a label exists: the vocabulary projection of prompt
    positions would be wasted work.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[TokenizedExample], pad_id: int,
                  batch_size: int = 8) -> float:
    """Token-mean loss of the model (in eval mode) over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in fixed_batches(examples, batch_size, pad_id):
        loss, tokens = masked_lm_loss(model, batch)
        total, count = total + loss.item(), count + tokens
    model.train(was_training)
    return total / count


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    shared = [p for n, p in model.named_parameters() if n.endswith(("prolora_A0", "prolora_B0"))]
    unshared = [p for n, p in model.named_parameters() if n.endswith(("prolora_Au", "prolora_Bu"))]
    groups = [{"params": [p for p in shared if p.numel()], "lr": config.lr_shared or config.lr},
              {"params": [p for p in unshared if p.numel()], "lr": config.lr_unshared or config.lr}]
    return [g for g in groups if g["params"]]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    warmup = max(1, round(steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Optimization:
    """One optimizer step = ``grad_accum`` micro-batches, loss averaged over their tokens."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model, self.config = model, config
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameter_groups(model, config), weight_decay=0.0)
        self.scheduler = linear_warmup_decay(self.optimizer, config.steps, config.warmup_ratio)
        self.tokens_seen = 0

    def step(self, batches: Iterator[dict[str, torch.Tensor]]) -> float:
        micro = [next(batches) for _ in range(self.config.grad_accum)]
        total_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:
            loss, _ = masked_lm_loss(self.model, batch)
            (loss / total_tokens).backward()
            step_loss += loss.item() / total_tokens
            self.tokens_seen += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss


def prepare_model(base: TrainingBase, config: TrainConfig) -> ProLoRAConfig:
    """Inject freshly initialized adapter layers (seeded) and return the adapter config."""
    if prolora_layers(base.model):
        raise ValueError("the base model already holds adapter layers; detach_adapters() first")
    adapter_config = config.adapter_config(base.name)
    torch.manual_seed(config.seed)
    inject_prolora(base.model, adapter_config, config.dropout)
    return adapter_config


def train_adapter(config: TrainConfig, base: TrainingBase | None = None) -> TrainResult:
    """Train on ``config.data``; save to ``config.output`` when set. ``base`` may be passed to
    reuse a loaded model: it must be a fresh one (no adapter layers yet)."""
    started = time.perf_counter()
    base = base or load_training_base(config.base, config.base_dtype)
    pad_id = pad_token_id(base.tokenizer)
    examples, dropped = tokenize_dataset(read_jsonl(config.data), base.tokenizer, config.max_length)
    adapter_config = prepare_model(base, config)
    base.model.train()
    optimization = _Optimization(base.model, config)
    batches = batch_stream(examples, config.batch_size, config.seed, pad_id)
    losses = _run_steps(optimization, batches, config)
    base.model.eval()
    eval_loss = _held_out_loss(base, config, pad_id)
    adapter = extract_adapter(base.model, adapter_config)
    output = _save(adapter, config) if config.output else None
    return TrainResult(adapter, output, losses, eval_loss, sum(p.numel() for p in optimization.trainable),
                       len(examples), dropped, optimization.tokens_seen, time.perf_counter() - started)


def _run_steps(optimization: _Optimization, batches: Iterator, config: TrainConfig) -> list[float]:
    losses = []
    bar = tqdm(range(config.steps), desc="train", disable=not config.progress, unit="step")
    for _ in bar:
        losses.append(optimization.step(batches))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _held_out_loss(base: TrainingBase, config: TrainConfig, pad_id: int) -> float | None:
    if config.eval_data is None:
        return None
    examples, _ = tokenize_dataset(read_jsonl(config.eval_data), base.tokenizer, config.max_length)
    return evaluate_loss(base.model, examples, pad_id)


def _save(adapter: CompactAdapter, config: TrainConfig) -> Path:
    from prolora_serve.adapters.format import save_adapter
    assert config.output is not None
    single_file = config.output.suffix == ".safetensors"
    if single_file:
        config.output.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(adapter.to(dtype=ADAPTER_TORCH_DTYPES[config.save_dtype]), config.output, single_file=single_file)
    return config.output
