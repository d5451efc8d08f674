"""Shared pytest fixtures (edit additively)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings


# One intra-op thread in tests: on a shared 2-core CPU (other test processes, server threads)
# every parallel region of a multi-threaded op waits for a descheduled peer. Measured here:
# a 12-token greedy decode of the default model took 45 s with 2 threads, 1 s with 1.
# Library code never sets this; servers and benchmarks choose their own.
torch.set_num_threads(1)

# Triton kernels (tests marked `triton`) run compiled on a GPU where there is one, else in
# Triton's interpreter on CPU tensors; the variable must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Hypothesis: the same examples on every run by default (CI must not pass or fail by luck);
# HYPOTHESIS_PROFILE=explore draws new ones, to hunt for bugs locally.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) converted once to an HF directory."""
    from prolora_serve.server.engine.loader import default_model_hf_dir

    return default_model_hf_dir()


@pytest.fixture(scope="session")
def default_model_nf4():
    """The embedded default model loaded once with NF4 weights (a LoadedModel); engines built on
    it wrap its projections for adapters (idempotent), so build one engine at a time."""
    from prolora_serve.server.engine.loader import load_base_model

    return load_base_model(None, "nf4")


# --- training: a tiny LLaMA and a word-level chat tokenizer (no download, seconds to build) ---

TINY_WORDS = ("the cat dog sat on mat a red blue green sky is bonjour oui non merci what color "
              "say hello yes no arr matey ahoy ship sea one two three four five").split()
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                      "<|im_start|>assistant\n{% endif %}")


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = specials + ["system", "user", "assistant", ".", "?", ",", "!", ":"] + list(TINY_WORDS)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        pad_token="<pad>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=1, eos_token_id=3, bos_token_id=2,
                         initializer_range=0.3)  # logits wide enough for an adapter to fit data
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with the word-level chat tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_byte_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges): any text, JSON included, is
    spelled out, so grammar-constrained decoding has every character it needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<unk>", "<|im_end|>", "<|im_start|>", *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_bytes_llama_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA over the byte-level tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("tiny-bytes-llama")
    tokenizer = build_byte_tokenizer()
    build_tiny_llama(len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- server: real uvicorn servers on 127.0.0.1, each in a background thread -------------------

class LiveServer:
    """One app served by uvicorn on a pre-bound free port (no port race)."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True, name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout=60)
        self.socket.close()


@pytest.fixture(scope="session")
def live_server():
    """Factory ``live_server(server_config, **create_app_kwargs) -> LiveServer`` (started);
    every server still running is stopped at the end of the session."""
    from prolora_serve.server.api.app import create_app

    started: list[LiveServer] = []

    def start(config, **kwargs) -> LiveServer:
        server = LiveServer(create_app(config, **kwargs)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
