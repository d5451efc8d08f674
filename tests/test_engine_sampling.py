"""Sampling: parameter validation, masks and draws against float64 references, determinism,
logprobs, incremental detokenization and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from engine_testing import load_default_tokenizer
from prolora_serve.server.engine.detokenizer import IncrementalDetokenizer, StopStringText
from prolora_serve.server.engine.sampling import (
    SamplingParams,
    apply_top_k_top_p,
    make_generator,
    sample,
    sampling_probs,
)


# --- SamplingParams -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, fragment", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"seed": "7"}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_invalid_params_are_rejected_with_the_field_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_single_stop_string_becomes_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


# --- float64 references ---------------------------------------------------------------------
def reference_mask(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Boolean keep-mask of one row, computed plainly in float64 with a Python loop."""
    values = row.double()
    order = sorted(range(len(values)), key=lambda i: -float(values[i]))
    if top_k > 0:
        order = order[:top_k]
    kept_logits = values[order]
    probs = torch.softmax(kept_logits, dim=0)
    keep = torch.zeros(len(values), dtype=torch.bool)
    mass = 0.0
    for index, p in zip(order, probs.tolist()):
        if mass >= top_p and top_p < 1:
            break
        keep[index] = True
        mass += p
    return keep


@pytest.mark.parametrize("vocab", [1, 2, 7, 100, 1031])
def test_top_k_top_p_masks_match_float64_reference(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    rows = 9
    logits = torch.randn(rows, vocab, generator=gen) * 3
    top_k = torch.tensor([0, 1, 3, 5, 0, 0, 2, vocab + 4, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 0.5, 0.01, 0.3, 0.95, 0.999])
    masked = apply_top_k_top_p(logits, top_k, top_p)
    for i in range(rows):
        keep = reference_mask(logits[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(torch.isfinite(masked[i]), keep), f"row {i}"
        assert torch.equal(masked[i][keep], logits[i][keep])


def test_sampling_probs_match_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen) * 2
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=20),
              SamplingParams(temperature=0.5, top_p=0.8), SamplingParams(top_k=50, top_p=0.6)]
    probs = sampling_probs(logits, params)
    for i, p in enumerate(params):
        keep = reference_mask(logits[i] / p.temperature, p.top_k, p.top_p)
        scaled = logits[i].double() / p.temperature
        expected = torch.zeros(300, dtype=torch.float64)
        expected[keep] = torch.softmax(scaled[keep], dim=0)
        torch.testing.assert_close(probs[i].double(), expected, atol=1e-6, rtol=1e-5)


def test_greedy_rows_take_the_argmax() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 500, generator=gen)
    params = [SamplingParams(temperature=0)] * 6
    result = sample(logits, params, [make_generator(None) for _ in params])
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs is None


def test_draw_frequencies_follow_the_processed_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    expected = sampling_probs(logits, [params])[0]
    gen = make_generator(123)
    draws = 4000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[sample(logits, [params], [gen]).token_ids[0]] += 1
    assert counts[expected == 0].sum() == 0
    # 5 standard deviations of a binomial count: fails only on a real bias.
    tolerance = 5 * torch.sqrt(draws * expected * (1 - expected)) + 1
    assert torch.all((counts - draws * expected).abs() <= tolerance), (counts, draws * expected)


def test_seeded_rows_do_not_depend_on_batch_composition() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 400, generator=gen)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)

    def run(batch_rows: int, position: int) -> list[int]:
        tokens = []
        generators = [make_generator(params.seed if i == position else None) for i in range(batch_rows)]
        all_params = [params if i == position else SamplingParams(temperature=1.2)
                      for i in range(batch_rows)]
        for _ in range(20):
            logits = torch.randn(batch_rows, 400)
            logits[position] = base[0]
            tokens.append(sample(logits, all_params, generators).token_ids[position])
        return tokens

    alone = run(1, 0)
    assert run(5, 3) == alone
    assert run(3, 1) == alone
    assert len(set(alone)) > 1  # really random, not collapsed to the argmax


def test_logprobs_equal_float64_log_softmax_and_alternatives_are_the_top_k() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 257, generator=gen) * 4
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.9, logprobs=0),
              SamplingParams(temperature=0)]
    result = sample(logits, params, [make_generator(i) for i in range(3)])
    reference = torch.log_softmax(logits.double(), dim=-1)
    for i, token in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[i], float(reference[i, token]), abs_tol=1e-5)
    expected_top = reference[0].topk(5)
    assert result.top_ids[0] == expected_top.indices.tolist()
    torch.testing.assert_close(torch.tensor(result.top_logprobs[0], dtype=torch.float64),
                               expected_top.values, atol=1e-5, rtol=0)
    assert result.top_ids[1] == [] and result.top_ids[2] == []


# --- detokenization -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


@pytest.mark.parametrize("text", [
    "Hello world, this is plain ASCII text.",
    "héllo wörld 日本語 🙂 ünïcödé — “quotes” and emoji 👩‍👩‍👧",
    "  leading spaces\nnew lines\n\n\ttabs and 1234567890",
])
def test_incremental_detokenization_reassembles_the_text(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop, pieces, expected", [
    (["###"], ["ab", "c#", "#", "#tail"], "abc"),
    (["END", "\n\n"], ["one\n", "\ntwo END"], "one"),
    (["xyz"], ["no stop here"], "no stop here"),
    (["ab"], ["a", "a", "b"], "a"),
])
def test_stop_strings_cut_the_text_and_never_stream_a_stop_prefix(stop, pieces, expected) -> None:
    text = StopStringText(stop)
    streamed = ""
    stopped = False
    for piece in pieces:
        stopped = text.append(piece)
        streamed += text.take_delta(finished=stopped)
        if stopped:
            break
    if not stopped:
        streamed += text.take_delta(finished=True)
    assert streamed == expected == text.text


def test_tiny_top_p_keeps_the_most_likely_token() -> None:
    # 3.5e-133 is a valid top_p that rounds to 0.0 in float32: sampling must still work.
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0]])
    params = [SamplingParams(temperature=1.0, top_p=3.5e-133)]
    probs = sampling_probs(logits, params)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


# ---- logits processors: bias, min_tokens, penalties against the float64 reference -------------
def _history(prompt: list[int], output: list[int], **params) -> "Sequence":
    from prolora_serve.server.engine.sequence import Sequence

    seq = Sequence("r", prompt, SamplingParams(max_tokens=8, **params), None, make_generator(0),
                   IncrementalDetokenizer(None, prompt), StopStringText([]))
    for token in output:
        seq.append_token(token)
    return seq


@pytest.mark.parametrize("seed", range(4))
def test_logits_processors_match_the_float64_reference(seed: int) -> None:
    from prolora_serve.server.engine.logits_processors import process_logits, reference_process_logits

    gen = torch.Generator().manual_seed(seed)
    vocab = 37
    logits = torch.randn(6, vocab, generator=gen) * 3  # positive and negative logits
    seqs = [
        _history([1, 2, 3], [4, 4, 5]),  # no processing: the row stays as it was
        _history([1, 2, 3], [4, 4, 5, 4], frequency_penalty=0.7, presence_penalty=-0.3),
        _history([9, 9], [], repetition_penalty=1.8, frequency_penalty=1.0),  # no output yet
        _history([7], [8, 7], repetition_penalty=0.6, logit_bias={3: 5.0, 36: -100.0}),
        _history([2, 5], [6], min_tokens=3, stop_token_ids=[11, 30]),  # 1 < 3: EOS/stops masked
        _history([2, 5], [6, 6, 6], min_tokens=3, stop_token_ids=[11]),  # reached: unmasked
    ]
    eos = {0, 12}
    got = process_logits(logits, seqs, eos)
    expected = reference_process_logits(logits, seqs, eos)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(got.double()[finite], expected[finite], atol=1e-5)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[5], logits[5])
    assert torch.isinf(got[4, [0, 11, 12, 30]]).all() and int(torch.isinf(got[4]).sum()) == 4


def test_a_step_without_processing_costs_no_copy() -> None:
    from prolora_serve.server.engine.logits_processors import process_logits

    logits = torch.randn(2, 10)
    assert process_logits(logits, [_history([1], [2]), _history([3], [])], {0}) is logits


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = sampling_probs(logits, [SamplingParams(temperature=1.0, min_p=0.5)])
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 500.0})
