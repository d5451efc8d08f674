"""The compact LLaMA forward against transformers' LlamaForCausalLM on the same fp32 weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prolora_serve.adapters.config import ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight
from prolora_serve.adapters.weights import CompactAdapter, CompactLinearWeights
from prolora_serve.kernels import (NO_ADAPTER, AdapterContext, AdapterWeightPool,
                                   build_adapter_batch, get_backend)
from prolora_serve.kernels.attention import paged_attention
from prolora_serve.kernels.reference import reference_attention
from prolora_serve.kernels.metadata import SeqSlice, StepMetadata, build_attention_metadata
from prolora_serve.server.engine.kv_cache import KVCache
from prolora_serve.server.engine.model import LlamaModel

ATOL = 2e-4
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                    max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15,
                    tie_word_embeddings=False, rope_theta=10000.0)
    settings.update(overrides)
    return LlamaConfig(**settings)


def hf_and_ours(config: LlamaConfig, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaModel]:
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    ours = LlamaModel(config)
    ours.load_state_dict(hf.state_dict())
    return hf.eval(), ours.eval()


@dataclass
class Seq:
    """A test sequence: all its tokens and how many are in the KV cache so far."""

    tokens: list[int]
    block_table: list[int]
    num_cached: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)  # one (vocab,) row per computed token


@torch.inference_mode()
def run_step(model: LlamaModel, kv: KVCache, work: list[tuple[Seq, int]],
             ctx: AdapterContext | None = None, slots: list[int] | None = None) -> None:
    """One flattened step: each (seq, n) computes the next n tokens of seq; stores their logits."""
    slices = [SeqSlice(s.block_table, s.num_cached, n) for s, n in work]
    meta = build_attention_metadata(slices, kv.block_size)
    ids = torch.tensor([t for s, n in work for t in s.tokens[s.num_cached:s.num_cached + n]])
    positions = torch.cat([torch.arange(s.num_cached, s.num_cached + n) for s, n in work])
    step = StepMetadata(meta)
    if ctx is not None:
        rows = [slot for (_, n), slot in zip(work, slots) for _ in range(n)]
        step = StepMetadata(meta, ctx.for_step(build_adapter_batch(rows)))
    logits = model.compute_logits(model(ids, positions, step, kv))
    row = 0
    for seq, n in work:
        seq.logits.extend(logits[row:row + n])
        seq.num_cached += n
        row += n


@torch.inference_mode()
def hf_logits(hf: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0]


def assert_matches_hf(hf: LlamaForCausalLM, seq: Seq) -> None:
    expected = hf_logits(hf, seq.tokens[:len(seq.logits)])
    torch.testing.assert_close(torch.stack(seq.logits), expected, atol=ATOL, rtol=1e-4)


def random_tokens(count: int, vocab: int = 128, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


CONFIGS = {
    "default_rope_untied": tiny_config(),
    "llama3_rope_tied": tiny_config(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "linear_rope_mha_headdim": tiny_config(num_key_value_heads=4, head_dim=24, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_prefill_of_two_sequences_in_one_step_matches_hf(name: str) -> None:
    hf, ours = hf_and_ours(CONFIGS[name])
    kv = ours.make_kv_cache(num_blocks=12, block_size=4)
    first = Seq(random_tokens(13, seed=1), [5, 0, 9, 2])
    second = Seq(random_tokens(7, seed=2), [11, 3])
    run_step(ours, kv, [(first, 13), (second, 7)])
    assert_matches_hf(hf, first)
    assert_matches_hf(hf, second)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_in_two_chunks_matches_hf(name: str) -> None:
    hf, ours = hf_and_ours(CONFIGS[name])
    kv = ours.make_kv_cache(num_blocks=8, block_size=4)
    seq = Seq(random_tokens(19, seed=3), [6, 1, 7, 0, 4])
    run_step(ours, kv, [(seq, 6)])  # the first chunk ends inside a block
    run_step(ours, kv, [(seq, 13)])
    assert_matches_hf(hf, seq)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_decode_of_sequences_with_different_lengths_matches_hf(name: str) -> None:
    hf, ours = hf_and_ours(CONFIGS[name])
    kv = ours.make_kv_cache(num_blocks=24, block_size=4)
    decode_steps = 6
    lengths = (3, 9, 14)
    tables = ([17, 2, 11], [0, 21, 5, 8], [9, 3, 20, 14, 1, 6])
    seqs = [Seq(random_tokens(n + decode_steps, seed=10 + n), t) for n, t in zip(lengths, tables)]
    run_step(ours, kv, [(s, n) for s, n in zip(seqs, lengths)])
    for _ in range(decode_steps):
        run_step(ours, kv, [(s, 1) for s in seqs])
    for seq in seqs:
        assert_matches_hf(hf, seq)


def test_mixed_step_with_prefill_chunks_and_decode_rows_matches_hf() -> None:
    hf, ours = hf_and_ours(CONFIGS["default_rope_untied"])
    kv = ours.make_kv_cache(num_blocks=24, block_size=4)
    old = Seq(random_tokens(12, seed=4), [3, 8, 13])
    chunked = Seq(random_tokens(16, seed=5), [22, 10, 7, 1])
    fresh = Seq(random_tokens(6, seed=6), [15, 4])
    run_step(ours, kv, [(old, 9), (chunked, 6)])
    # Decode, a second prefill chunk, and a brand-new prompt (nothing cached) in one step.
    run_step(ours, kv, [(chunked, 8), (old, 1), (fresh, 5)])
    run_step(ours, kv, [(fresh, 1), (chunked, 1), (old, 1)])
    for seq in (old, chunked, fresh):
        assert_matches_hf(hf, seq)


def test_paged_attention_matches_float64_reference_with_awkward_shapes() -> None:
    gen = torch.Generator().manual_seed(7)
    q_heads, kv_heads, head_dim, block_size = 6, 2, 10, 3
    kv = KVCache(1, 20, block_size, kv_heads, head_dim)
    kv.keys[0].normal_(generator=gen)  # stale cache content everywhere, read only if unmasked
    kv.values[0].normal_(generator=gen)
    slices = [SeqSlice([4, 19, 0], 6, 1), SeqSlice([7, 2, 11, 5], 5, 5), SeqSlice([13], 1, 1),
              SeqSlice([1, 3], 0, 4), SeqSlice([9, 17, 6, 8], 10, 1)]
    meta = build_attention_metadata(slices, block_size)
    tokens = meta.num_tokens
    q = torch.randn(tokens, q_heads, head_dim, generator=gen)
    k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
    out = paged_attention(q, k, v, kv.keys[0], kv.values[0], meta, scale=0.3)
    expected = reference_attention(q, kv.keys[0], kv.values[0], meta, scale=0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_linear_shapes_cover_every_projection_with_hf_paths() -> None:
    config = CONFIGS["linear_rope_mha_headdim"]
    ours = LlamaModel(config)
    shapes = ours.linear_shapes()
    assert len(shapes) == 7 * config.num_hidden_layers
    for path, (fan_in, fan_out) in shapes.items():
        linear = ours.get_submodule(path)
        assert (linear.in_features, linear.out_features) == (fan_in, fan_out), path
    assert shapes["model.layers.2.self_attn.o_proj"] == (4 * 24, 64)


def test_unsupported_rope_type_is_refused() -> None:
    config = tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                          "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        LlamaModel(config)


# ----- adapters: unmerged per-row deltas against HF models with the delta merged -----

PROLORA = ProLoRAConfig(r=8, unshared_r=2, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=16,
                        target_modules=("q_proj", "v_proj", "o_proj", "down_proj", "up_proj"))
LORA = ProLoRAConfig.from_json_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                     "target_modules": ["k_proj", "gate_proj", "q_proj"]})


def random_adapter(config: ProLoRAConfig, model: LlamaModel, seed: int) -> CompactAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {path: CompactLinearWeights.random(config.layer_spec(path, h, o), gen, std=0.3)
               for path, (h, o) in model.linear_shapes().items() if config.targets(path)}
    return CompactAdapter(config, modules)


def merged_hf(hf: LlamaForCausalLM, adapter: CompactAdapter) -> LlamaForCausalLM:
    merged = LlamaForCausalLM(hf.config).eval()
    merged.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for path, weights in adapter.modules.items():
            merged.get_submodule(path).weight += delta_weight(weights.to(dtype=torch.float64)).float()
    return merged


def test_adapter_rows_in_one_batch_match_hf_with_each_delta_merged() -> None:
    hf, ours = hf_and_ours(CONFIGS["llama3_rope_tied"])
    pool = AdapterWeightPool("cpu", torch.float32)
    adapters = {3: random_adapter(PROLORA, ours, seed=1), 0: random_adapter(LORA, ours, seed=2)}
    for slot, adapter in adapters.items():
        pool.load(slot, adapter)
    ctx = AdapterContext(pool, get_backend("torch"))
    kv = ours.make_kv_cache(num_blocks=20, block_size=4)
    seqs = [Seq(random_tokens(n + 3, seed=n), t)
            for n, t in ((9, [4, 12, 0]), (6, [7, 1, 16]), (11, [19, 2, 9, 15]))]
    slots = [3, NO_ADAPTER, 0]
    run_step(ours, kv, [(s, len(s.tokens) - 3) for s in seqs], ctx, slots)
    for _ in range(3):
        run_step(ours, kv, [(s, 1) for s in seqs], ctx, slots)
    assert_matches_hf(merged_hf(hf, adapters[3]), seqs[0])
    assert_matches_hf(hf, seqs[1])
    assert_matches_hf(merged_hf(hf, adapters[0]), seqs[2])
    # The deltas are large enough that a row given the wrong adapter would fail.
    with pytest.raises(AssertionError):
        assert_matches_hf(hf, seqs[0])


class RecordingApplier:
    """Sees every projection of a step: its path and the shapes of its input and output."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.groups: list[tuple[str, ...]] = []  # the module names of each applier call

    def apply(self, module_path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.apply_many((module_path,), x, (y,))

    def apply_many(self, module_paths, x: torch.Tensor, ys) -> None:
        for path, y in zip(module_paths, ys, strict=True):
            self.calls.append((path, x.shape[-1], y.shape[-1]))
        self.groups.append(tuple(p.rsplit(".", 1)[1] for p in module_paths))


def test_the_step_value_reaches_every_projection_with_its_checkpoint_path() -> None:
    ours = LlamaModel(CONFIGS["default_rope_untied"])
    kv = ours.make_kv_cache(num_blocks=4, block_size=4)
    meta = build_attention_metadata([SeqSlice([0, 1], 0, 5)], kv.block_size)
    recorder = RecordingApplier()
    with torch.inference_mode():
        ours(torch.arange(5), torch.arange(5), StepMetadata(meta, recorder), kv)
    shapes = ours.linear_shapes()
    assert len(recorder.calls) == len(shapes) == 21  # 3 layers x 7 projections, each once
    assert {path: (h, o) for path, h, o in recorder.calls} == shapes
    # projections sharing an input are one call: q, k, v; o; gate, up; down
    assert recorder.groups == [("q_proj", "k_proj", "v_proj"), ("o_proj",),
                               ("gate_proj", "up_proj"), ("down_proj",)] * 3


# ----- the embedded default model (SmolLM2-135M-Instruct) against transformers -----

@pytest.mark.slow
def test_default_model_prefill_and_batched_decode_match_hf(default_model_dir) -> None:
    from prolora_serve.server.engine.loader import load_base_model

    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours = load_base_model(None, dtype="fp32", cache_dir=default_model_dir.parent).model
    kv = ours.make_kv_cache(num_blocks=12, block_size=16)
    vocab = hf.config.vocab_size
    seqs = [Seq(random_tokens(23, vocab, seed=1), [9, 2]), Seq(random_tokens(40, vocab, seed=2),
                                                                [4, 11, 0, 7])]
    run_step(ours, kv, [(seqs[0], 20), (seqs[1], 37)])
    for _ in range(3):
        run_step(ours, kv, [(s, 1) for s in seqs])
    for seq in seqs:
        expected = hf_logits(hf, seq.tokens)
        torch.testing.assert_close(torch.stack(seq.logits), expected, atol=2e-3, rtol=1e-3)
