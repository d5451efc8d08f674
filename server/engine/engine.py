"""The synchronous engine: ``add_request`` / ``abort`` from any thread, ``step()`` from one.

``step()`` is three calls: the scheduler picks the chunks (CPU accounting), the model runner
runs them (device), and postprocessing samples, detokenizes, checks stop conditions and turns
every sequence that progressed into a ``RequestOutput`` delta.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence as Seq

import torch

from ...adapters.weights import ADAPTER_TORCH_DTYPES
from ..config import EngineConfig
from .detokenizer import IncrementalDetokenizer, StopStringText, TokenTextCache
from ...adapters.registry import AdapterNotFoundError
from .errors import InvalidPromptError, InvalidTokenIdError, PromptTooLongError, QueueFullError
from .kv_cache import BlockAllocator, KVCache
from .grammar import GrammarError, Grammars
from .logits_processors import process_logits
from .model import head_dim_of
from .model_runner import ModelRunner, StepLogits
from .residency import AdapterCache, AdapterCacheStats, AdapterSource
from .sampling import SampleResult, SamplingParams, make_generator, sample, top_alternatives
from .scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from .sequence import Sequence, TokenLogprob

if TYPE_CHECKING:
    from .loader import LoadedModel

logger = logging.getLogger(__name__)


def resolve_adapter_dtype(adapter_dtype: str, base_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter weights are resident in. ``auto``: float16 next to a quantized base that
    computes in float32 (the CPU): adapters are trained in 16-bit next to 4-bit weights (QLoRA),
    and half the bytes means twice the adapters per budget and half the memory traffic of a
    mixed-adapter step. Otherwise the model's compute dtype."""
    if adapter_dtype != "auto":
        return ADAPTER_TORCH_DTYPES[adapter_dtype]
    if base_dtype in ("nf4", "int8") and compute_dtype == torch.float32:
        return torch.float16
    return compute_dtype


def resolve_kv_cache_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``auto`` is the model's compute dtype (exact); fp16/bf16
    round keys and values once when they are written."""
    return compute_dtype if kv_cache_dtype == "auto" else ADAPTER_TORCH_DTYPES[kv_cache_dtype]


@dataclass
class RequestOutput:
    request_id: str
    text: str  # delta
    token_ids: list[int]  # delta
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    logprobs: list[TokenLogprob]  # delta
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None  # first output only, when asked
    num_prompt_tokens: int
    num_generated_tokens: int
    error: BaseException | None = None  # set when the request failed (finish_reason "abort")


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    last_batch_size: int  # sequences in the last step
    last_batch_tokens: int  # token rows in the last step
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int  # holding prefix-cached content (in use, or kept until evicted)
    prefix_cache_hits: int  # prompt blocks reused from the cache since start
    prefix_cache_queries: int  # prompt blocks looked up since start
    kv_cache_bytes: int
    base_model_bytes: int
    adapter_cache: AdapterCacheStats | None
    num_requests: int  # accepted since start
    num_finished: int
    num_aborted: int
    num_preemptions: int
    num_steps: int
    prompt_tokens: int  # computed (prefill) prompt tokens since start
    generated_tokens: int
    schedule_seconds: float  # cumulative wall time in the scheduler (CPU accounting)
    forward_seconds: float  # in the model runner (forward + logits)
    postprocess_seconds: float  # sampling, detokenization, stop checks, outputs


@dataclass
class _Counters:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_batch_size: int = 0
    last_batch_tokens: int = 0
    schedule_s: float = 0.0
    forward_s: float = 0.0
    postprocess_s: float = 0.0


@dataclass
class _Inbox:
    """Requests and aborts handed over from other threads, taken by the step thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    new: list[Sequence] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    live_ids: set[str] = field(default_factory=set)  # inbox + scheduler, for duplicate checks


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: "LoadedModel",
                 adapter_source: AdapterSource | None = None) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.model_name = loaded.name
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, loaded.model.dtype)
        num_blocks = self._num_blocks(config, loaded.model, kv_dtype)
        adapter_dtype = resolve_adapter_dtype(config.adapter_dtype, config.dtype, loaded.model.dtype)
        self.runner = ModelRunner(loaded.model, num_blocks, config.block_size, config.adapter_backend,
                                  adapter_dtype, kv_dtype, enforce_eager=config.enforce_eager,
                                  max_batch=config.max_batch, max_model_len=config.max_model_len)
        self.adapter_source = adapter_source
        self.adapter_cache = (AdapterCache(self.runner.pool, config.adapter_memory, adapter_source,
                                           host_budget_bytes=config.adapter_host_memory)
                              if adapter_source is not None else None)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch, config.max_batched_tokens, config.block_size),
            BlockAllocator(num_blocks, caching=config.prefix_caching), self.adapter_cache)
        positions = getattr(self.hf_config, "max_position_embeddings", None) or config.max_model_len
        self.max_len = min(config.max_model_len, positions, num_blocks * config.block_size)
        self.token_text = TokenTextCache(self.tokenizer)
        self._inbox = _Inbox()
        self._counters = _Counters()
        self.last_step_ran = False  # False: the work left is waiting (e.g. on adapter reads)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_source: AdapterSource | None = None) -> "LLMEngine":
        from .loader import load_base_model

        loaded = load_base_model(config.model, config.dtype, config.device, config.cache_dir)
        return cls(config, loaded, adapter_source)

    @staticmethod
    def _num_blocks(config: EngineConfig, model: Any, kv_dtype: torch.dtype) -> int:
        hf = model.config
        kv_heads = hf.num_key_value_heads or hf.num_attention_heads
        per_block = KVCache.bytes_per_block(hf.num_hidden_layers, config.block_size, kv_heads,
                                            head_dim_of(hf), kv_dtype)
        num_blocks = config.kv_cache_memory // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} is less than one KV block "
                             f"({per_block} bytes)")
        return num_blocks

    # --- requests (any thread) -------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt; ids given by the caller must index the embedding (its rows,
        ``vocab_size``, can be fewer than the tokenizer's ids when tokens were added)."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        vocab = self.hf_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab)]
        if bad:
            raise InvalidPromptError(f"prompt token ids must be integers in [0, {vocab}); "
                                     f"got {bad[0]!r}")
        return ids

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                    adapter_id: str | None = None) -> None:
        """Validate and queue a request; raises before queueing anything on bad input. The one
        owner of every request check: prompt, adapter, request id, queue bound."""
        prompt_ids = self.encode_prompt(prompt)
        self._check_prompt(prompt_ids)
        self._check_token_params(params)
        self._check_adapter(adapter_id)
        seq = Sequence(request_id, prompt_ids, params, adapter_id, make_generator(params.seed),
                       IncrementalDetokenizer(self.tokenizer, prompt_ids), StopStringText(params.stop))
        if params.grammar is not None:  # compiled once (cached), checked here: a 400 if bad
            seq.grammar = self.grammars.matcher(params.grammar)
        with self._inbox.lock:
            if request_id in self._inbox.live_ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self.scheduler.waiting) + len(self._inbox.new) >= self.config.max_queue:
                raise QueueFullError(f"the queue is full ({self.config.max_queue} waiting requests)")
            self._inbox.live_ids.add(request_id)
            self._inbox.new.append(seq)
            self._counters.requests += 1

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidPromptError("the prompt is empty (it encodes to zero tokens)")
        if len(prompt_ids) >= self.max_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; at most {self.max_len - 1} fit "
                f"(max_model_len {self.config.max_model_len}, KV cache "
                f"{self.scheduler.allocator.num_blocks * self.config.block_size} tokens)")

    def _check_token_params(self, params: SamplingParams) -> None:
        vocab = self.hf_config.vocab_size
        outside = [t for t in params.logit_bias if t >= vocab]
        if outside:
            raise InvalidTokenIdError(f"logit_bias names token id {outside[0]}, outside the "
                                      f"vocabulary [0, {vocab})", param="logit_bias")

    def _check_adapter(self, adapter_id: str | None) -> None:
        if adapter_id is None:
            return
        if self.adapter_source is None or not self.adapter_source.has_adapter(adapter_id):
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist")

    def prepare_adapter(self, adapter_id: str) -> Future[int]:
        """Start reading an adapter in the background; the future raises AdapterNotFoundError
        (from the source's read), AdapterTooLargeError or a format error, else gives its
        resident bytes."""
        if self.adapter_cache is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} does not exist (this engine "
                                       "serves no adapters)")
        return self.adapter_cache.prepare(adapter_id)

    def abort(self, request_id: str) -> None:
        """Takes effect at the next step: its blocks and adapter reference are freed then."""
        with self._inbox.lock:
            self._inbox.aborts.append(request_id)

    def forget_adapter(self, adapter_id: str) -> None:
        if self.adapter_cache is not None:
            self.adapter_cache.forget(adapter_id)

    def has_work(self) -> bool:
        with self._inbox.lock:
            pending = bool(self._inbox.new or self._inbox.aborts)
        collect = self.adapter_cache is not None and self.adapter_cache.needs_collect
        return pending or self.scheduler.has_work or collect

    # --- the step (one thread) ---------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs = self._take_inbox()
        scheduled = self.scheduler.schedule()
        outputs += [self._output(seq) for seq in scheduled.finished]
        self._counters.schedule_s += time.perf_counter() - started
        self.last_step_ran = bool(scheduled.chunks)
        if scheduled.chunks:
            outputs += self._run(scheduled)
        return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        with self._inbox.lock:
            new, aborts = self._inbox.new, self._inbox.aborts
            self._inbox.new, self._inbox.aborts = [], []
        for seq in new:
            self.scheduler.add(seq)
        aborted = [self.scheduler.abort(request_id) for request_id in aborts]
        return [self._output(seq) for seq in aborted if seq is not None]

    def _run(self, scheduled: SchedulerOutput) -> list[RequestOutput]:
        chunks = scheduled.chunks
        self._counters.steps += 1
        self._counters.last_batch_size = len(chunks)
        self._counters.last_batch_tokens = scheduled.num_tokens
        try:
            started = time.perf_counter()
            logits = self.runner.run(chunks)
            self.scheduler.cache_computed_blocks(chunks)  # before postprocess frees finished ones
            forwarded = time.perf_counter()
            outputs = self._postprocess(chunks, logits)
            self._counters.forward_s += forwarded - started
            self._counters.postprocess_s += time.perf_counter() - forwarded
            return outputs
        except Exception as err:  # noqa: BLE001 - fail this step's requests, keep serving
            logger.exception("engine step failed; failing its %d requests", len(chunks))
            return self.fail_requests([c.seq for c in chunks if not c.seq.is_finished], err)

    def fail_requests(self, seqs: list[Sequence], error: BaseException) -> list[RequestOutput]:
        for seq in seqs:
            self.scheduler.finish(seq, "abort", error)
        return [self._output(seq) for seq in seqs]

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Fail every live request (the step loop hit an unexpected error or is stopping)."""
        self._take_inbox()
        live = list(self.scheduler.running) + list(self.scheduler.waiting)
        return self.fail_requests(live, error)

    def _postprocess(self, chunks: list[ScheduledChunk], logits: StepLogits) -> list[RequestOutput]:
        for index, chunk in enumerate(chunks):
            self._counters.prompt_tokens += max(
                0, min(chunk.end, chunk.seq.num_prompt_tokens) - chunk.start)
            if index in logits.prompt:
                self._record_prompt_logprobs(chunk, logits.prompt[index])
        sampling = [c.seq for c in chunks if c.samples]
        if sampling:
            processed = self._constrain(process_logits(logits.sample, sampling, self.eos_token_ids),
                                        logits.sample, sampling)
            result = sample(processed, [s.params for s in sampling], [s.generator for s in sampling],
                            raw_logits=logits.sample)
            for row, seq in enumerate(sampling):
                if not seq.is_finished:
                    self._append(seq, row, result)
        return [self._output(seq) for seq in sampling]

    def _constrain(self, logits: torch.Tensor, raw: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Mask what each row's grammar forbids; a row its grammar leaves no token fails."""
        matchers = [seq.grammar for seq in seqs]
        if all(m is None for m in matchers):
            return logits
        logits = logits.clone() if logits is raw else logits
        for row in self.grammars.mask_logits(logits, matchers):
            logits[row, 0] = 0.0  # any finite row keeps the sampler well defined; it is dropped
            self.scheduler.finish(seqs[row], "abort", GrammarError(
                "no token of this model's vocabulary can continue the grammar", seqs[row].params.grammar.param))
        return logits

    @property
    def grammars(self) -> Grammars:
        """The grammar compiler for this tokenizer, built on first use (xgrammar loads then)."""
        if self._grammars is None:
            with self._grammars_lock:
                if self._grammars is None:
                    self._grammars = Grammars(self.tokenizer, self.hf_config.vocab_size,
                                              self.eos_token_ids)
        return self._grammars

    def _append(self, seq: Sequence, row: int, result: SampleResult) -> None:
        token = result.token_ids[row]
        seq.append_token(token)
        self._counters.generated_tokens += 1
        if seq.params.logprobs is not None:
            seq.pending_logprobs.append(self._token_logprob(
                token, result.logprobs[row], result.top_ids[row], result.top_logprobs[row]))
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            raise GrammarError(f"token {token} was sampled outside the grammar", seq.params.grammar.param)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"  # the stop token is in token_ids but not in the text
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop"  # the grammar reached its end
        if seq.text.append(seq.detokenizer.add(token)):
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_len:
            return "length"
        return None

    def _token_logprob(self, token: int, logprob: float, top_ids: list[int],
                       top_values: list[float]) -> TokenLogprob:
        return TokenLogprob(token, self.token_text(token), logprob,
                            {self.token_text(t): v for t, v in zip(top_ids, top_values)})

    def _record_prompt_logprobs(self, chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        """Row i (position start + i) predicts prompt token start + i + 1."""
        seq = chunk.seq
        targets = seq.prompt_token_ids[chunk.start + 1:chunk.start + 1 + logits.shape[0]]
        logprobs = logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets).unsqueeze(1)).squeeze(1).tolist()
        top_ids, top_values = top_alternatives(logprobs, [seq.params.prompt_logprobs] * len(targets))
        for i, target in enumerate(targets):
            if len(seq.prompt_logprobs) == chunk.start + i + 1:  # not recorded before a preemption
                seq.prompt_logprobs.append(self._token_logprob(target, chosen[i], top_ids[i], top_values[i]))

    # --- outputs -------------------------------------------------------------------------------
    def _output(self, seq: Sequence) -> RequestOutput:
        finished = seq.is_finished
        if finished:
            self._inbox_forget(seq)
        token_ids, seq.pending_token_ids = seq.pending_token_ids, []
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return RequestOutput(seq.request_id, seq.text.take_delta(finished), token_ids, finished,
                             seq.finish_reason, logprobs, seq.prompt_token_ids, prompt_logprobs,
                             seq.num_prompt_tokens, seq.num_output_tokens, seq.error)

    def _inbox_forget(self, seq: Sequence) -> None:
        with self._inbox.lock:
            self._inbox.live_ids.discard(seq.request_id)
        self._counters.finished += 1
        self._counters.aborted += seq.finish_reason == "abort"

    # --- introspection -----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        allocator, counters = self.scheduler.allocator, self._counters
        return EngineStats(
            num_waiting=len(self.scheduler.waiting) + len(self._inbox.new),
            num_running=len(self.scheduler.running),
            last_batch_size=counters.last_batch_size,
            last_batch_tokens=counters.last_batch_tokens,
            kv_blocks_total=allocator.num_blocks,
            kv_blocks_used=allocator.num_used,
            kv_blocks_cached=allocator.num_cached,
            prefix_cache_hits=allocator.hits,
            prefix_cache_queries=allocator.queries,
            kv_cache_bytes=self.runner.kv_cache.nbytes,
            base_model_bytes=self.loaded.nbytes,
            adapter_cache=self.adapter_cache.stats() if self.adapter_cache is not None else None,
            num_requests=counters.requests,
            num_finished=counters.finished,
            num_aborted=counters.aborted,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=counters.steps,
            prompt_tokens=counters.prompt_tokens,
            generated_tokens=counters.generated_tokens,
            schedule_seconds=counters.schedule_s,
            forward_seconds=counters.forward_s,
            postprocess_seconds=counters.postprocess_s,
        )
