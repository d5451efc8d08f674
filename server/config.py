"""Server settings: one validated dataclass, filled from CLI flags whose defaults come from env vars.

Every flag ``--some-option`` can also be set as ``PROLORA_SERVE_SOME_OPTION``; the flag wins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "PROLORA_SERVE_"
DTYPES = ("nf4", "int8", "bf16", "fp32")
ADAPTER_DTYPES = ("auto", "fp32", "fp16", "bf16")  # resident adapter weights
KV_CACHE_DTYPES = ADAPTER_DTYPES  # the same float names for the KV cache; auto: the compute dtype
MiB = 1 << 20

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from ``"256MiB"``, ``"1GB"``, ``"512M"`` (binary), ``"1048576"``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE_PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: use a number with an optional unit "
                         "(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(nbytes: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{nbytes} B"


def env_name(option: str) -> str:
    """``adapter_memory`` or ``--adapter-memory`` -> ``PROLORA_SERVE_ADAPTER_MEMORY``."""
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


def env_default(option: str, fallback: Any = None) -> Any:
    """The env var's raw string (argparse converts string defaults with the flag's type)."""
    return os.environ.get(env_name(option), fallback)


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/prolora-serve`` or ``~/.local/share/prolora-serve``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "prolora-serve"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """The one check of every named-option setting, shared by ServerConfig and EngineConfig."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ServerConfig:
    """Everything ``prolora-serve serve`` needs; the engine part is handed to ``EngineConfig``."""

    model: str | None = None  # None = the embedded default model
    dtype: str = "nf4"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    adapter_dir: Path = field(default_factory=lambda: default_data_dir() / "adapters")
    adapter_memory: int = 256 * MiB
    kv_cache_memory: int = 256 * MiB
    max_batch: int = 32
    max_batched_tokens: int = 512
    max_model_len: int = 2048
    max_queue: int = 1024
    max_upload_size: int = 1024 * MiB
    api_key: str | None = None
    admin_key: str | None = None
    register: list[Path] = field(default_factory=list)
    cache_dir: Path | None = None
    log_level: str = "info"
    threads: int | None = None  # torch intra-op threads; None = torch's default (all cores)
    adapter_dtype: str = "auto"  # resident adapter weights: auto, fp32, fp16, bf16
    kv_cache_dtype: str = "auto"  # auto (the model's compute dtype), fp32, fp16, bf16

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("adapter_memory", "kv_cache_memory", "max_batch", "max_batched_tokens",
                     "max_model_len", "max_queue", "max_upload_size"):
            _positive(name, getattr(self, name))
        if self.threads is not None:
            _positive("threads", self.threads)
        for name in ("api_key", "admin_key"):
            if getattr(self, name) == "":
                setattr(self, name, None)  # an empty env var means "no key", never "the empty key"
        self.adapter_dir = Path(self.adapter_dir).expanduser()
        self.register = [Path(p).expanduser() for p in self.register]
        missing = [str(p) for p in self.register if not p.is_dir()]
        if missing:
            raise ValueError(f"--register: no such directory: {', '.join(missing)}")

    def engine_config(self) -> Any:
        """The engine's ``EngineConfig`` (imported lazily: torch is heavy)."""
        from prolora_serve.server.engine.engine import EngineConfig

        return EngineConfig(
            model=self.model, dtype=self.dtype, device=self.device, max_batch=self.max_batch,
            max_batched_tokens=self.max_batched_tokens, kv_cache_bytes=self.kv_cache_memory,
            adapter_memory_bytes=self.adapter_memory, max_model_len=self.max_model_len,
            max_queue=self.max_queue, cache_dir=self.cache_dir, adapter_dtype=self.adapter_dtype,
            kv_cache_dtype=self.kv_cache_dtype,
        )
