"""Structured outputs: grammars compiled by xgrammar, applied per row as a token bitmask.

A request may carry a ``GrammarSpec`` (JSON schema, any JSON object, regex, a choice of
strings, or EBNF). ``Grammars`` owns the xgrammar compiler for the engine's tokenizer; xgrammar
caches each compiled grammar, bounded by ``CACHE_LIMIT_BYTES``, so a schema is compiled once.
Each sequence with a grammar holds its own ``GrammarMatcher``; every step, before sampling, the
rows with a matcher get the bitmask of the tokens that keep the output inside the grammar
(``mask_logits``), and each sampled token is fed back (``accept``). A matcher that reaches the
grammar's end finishes its row with ``finish_reason: "stop"``.

Semantics, for row i with matcher M_i (logits (N, V)):
    logits[i, t] = -inf  for every token t that M_i does not accept next
    rows without a matcher are left as they are.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Literal, Sequence as Seq

import torch

from .errors import GrammarError

if TYPE_CHECKING:
    import xgrammar

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "ebnf"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "ebnf")
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # "[22:11:17] /path/file.cc:4944: "
CACHE_LIMIT_BYTES = 64 << 20  # compiled grammars kept by xgrammar's compiler (LRU beyond it)


@dataclass(frozen=True)
class GrammarSpec:
    """One request's output constraint, as plain, hashable data.

    ``source``: the JSON schema (canonical JSON text), the regex, the EBNF, or for ``choice``
    a JSON list of the allowed strings; empty for ``json_object``. ``strict``: JSON schemas
    only, no properties beyond the schema's. ``param``: the request field it came from (for
    error messages)."""

    kind: GrammarKind
    source: str = ""
    strict: bool = True
    param: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, strict: bool = True,
                    param: str | None = None) -> "GrammarSpec":
        parsed = json.loads(schema) if isinstance(schema, str) else schema
        return cls("json_schema", json.dumps(parsed, sort_keys=True), strict, param)

    @classmethod
    def choice(cls, options: Seq[str], param: str | None = None) -> "GrammarSpec":
        return cls("choice", json.dumps(list(options)), param=param)


def _choice_ebnf(options: list[str]) -> str:
    """``root ::= "a" | "b"`` with each option a JSON-escaped EBNF string literal."""
    if not options or not all(isinstance(o, str) and o for o in options):
        raise GrammarError("a choice needs at least one non-empty string", "guided_choice")
    return "root ::= " + " | ".join(json.dumps(option) for option in options)


class Grammars:
    """The engine's grammar compiler (thread-safe) and the matchers made from it."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Collection[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(eos_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True,
                                             cache_limit_bytes=CACHE_LIMIT_BYTES)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec) -> "xgrammar.CompiledGrammar":
        """The compiled grammar (xgrammar's cache makes repeats free); GrammarError if bad."""
        try:
            with self._lock:
                return self._compile(spec)
        except GrammarError:
            raise
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/...
            message = _LOG_PREFIX.sub("", str(err)).strip()
            raise GrammarError(f"invalid {spec.kind.replace('_', ' ')}: {message}", spec.param) from None

    def _compile(self, spec: GrammarSpec) -> "xgrammar.CompiledGrammar":
        compiler = self._compiler
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.source, any_whitespace=False,
                                                strict_mode=spec.strict)
        if spec.kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(json.loads(spec.source)))
        return compiler.compile_grammar(spec.source)

    def matcher(self, spec: GrammarSpec) -> "xgrammar.GrammarMatcher":
        return self._xgr.GrammarMatcher(self.compile(spec))

    def mask_logits(self, logits: torch.Tensor, matchers: Seq["xgrammar.GrammarMatcher | None"]) -> list[int]:
        """Mask, in place, what each row's matcher forbids; returns the rows left with no
        allowed token (their grammar cannot be continued with this vocabulary)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return []
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        every_row = len(rows) == len(matchers)  # xgrammar's apply is faster without indices
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                              indices=None if every_row else rows)
        blocked = (bitmask[rows] == 0).all(dim=1).tolist()  # on the packed mask: no row scan
        return [row for row, none_left in zip(rows, blocked) if none_left]


def reference_mask(logits: torch.Tensor, allowed: Seq[Collection[int] | None]) -> torch.Tensor:
    """The semantics above from explicit allowed-token sets (tests only)."""
    out = logits.clone()
    for i, tokens in enumerate(allowed):
        if tokens is not None:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
            keep[list(tokens)] = True
            out[i][~keep] = float("-inf")
    return out
