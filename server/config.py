"""Every setting, declared once.

Each setting is a dataclass field made with ``option(...)``: its metadata (an ``Option``) holds
the help text, the parser for flag and environment text, the choices and the check. From that
one declaration come the ``serve`` flags and their ``--help`` (``add_options``), the
``PROLORA_SERVE_*`` environment variables (``from_sources``: a flag wins over its variable,
a variable over the default) and validation, run once in ``__post_init__``.

``ServerConfig`` holds the ``EngineConfig``: the engine's settings are declared in one place
and the server never copies them. This module stays torch-free (``--help`` is instant).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ..adapters.accounting import WEIGHT_DTYPES

ENV_PREFIX = "PROLORA_SERVE_"
DTYPES = WEIGHT_DTYPES  # base weight formats
ADAPTER_DTYPES = ("auto", "fp32", "fp16", "bf16")  # resident adapter weights
KV_CACHE_DTYPES = ADAPTER_DTYPES  # the same float names for the KV cache; auto: the compute dtype
ADAPTER_BACKENDS = ("auto", "cpu", "torch", "triton", "reference")  # kernels.interface.BACKEND_NAMES
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
METRICS_ADAPTER_LABELS = ("key", "open")  # who sees adapter-labelled /metrics series
MIB = 1 << 20

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


# --- text parsers (flag and environment text -> value) -----------------------------------------
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


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise ValueError(f"invalid boolean {text!r}: use one of {', '.join(_TRUE + _FALSE)}")


def optional_text(text: str) -> str | None:
    """An empty value means "not set" (an empty key is never a key)."""
    return text or None


def expanded_path(text: str) -> Path:
    return Path(text).expanduser()


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/prolora-serve`` or ``~/.local/share/prolora-serve``."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "prolora-serve"


# --- checks (a value -> the problem, or None) --------------------------------------------------
Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(value: Any) -> str | None:
    return None if _is_int(value) and value >= 1 else "must be a positive integer"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def non_negative(value: Any) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an integer >= 0"


def positive_number(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and value > 0
    return None if ok else "must be a number > 0"


def port_number(value: Any) -> str | None:
    return None if _is_int(value) and 0 <= value <= 65535 else "must be an integer in 0..65535"


def device_name(value: Any) -> str | None:
    ok = isinstance(value, str) and _DEVICE_PATTERN.match(value)
    return None if ok else "must be cpu, cuda or cuda:N"


def existing_directory(value: Any) -> str | None:
    return None if Path(value).is_dir() else f"no such directory: {value}"


def existing_directories(value: Any) -> str | None:
    missing = [str(p) for p in value if not Path(p).is_dir()]
    return f"no such directory: {', '.join(missing)}" if missing else None


# --- the declaration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """How one setting is given, shown and checked."""

    help: str
    parse: Callable[[str], Any] = str  # flag / environment text -> value
    check: Check | None = None  # run on every value, however it was given
    choices: tuple[str, ...] | None = None
    many: bool = False  # a list: the flag takes several values, the variable os.pathsep-separated
    optional: bool = False  # None is allowed (and means the documented fallback)
    shown_default: str | None = None  # how --help shows the default, where repr would not do
    metavar: str | None = None


T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, *, help: str,  # noqa: A002 - argparse's word
           default_factory: Callable[[], Any] | None = None, **how: Any) -> Any:
    """A dataclass field declaring one setting (see ``Option`` for ``how``)."""
    metadata = {"option": Option(help=help, **how)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """``adapter_memory`` -> ``--adapter-memory``."""
    return "--" + name.replace("_", "-")


def env_name(option_name: str) -> str:
    """``adapter_memory`` or ``--adapter-memory`` -> ``PROLORA_SERVE_ADAPTER_MEMORY``."""
    return ENV_PREFIX + option_name.lstrip("-").replace("-", "_").upper()


def declared_options(cls: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    """Every option of ``cls``, nested option dataclasses (ServerConfig.engine) included."""
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            yield f, f.metadata["option"]
        elif f.metadata.get("options_of") is not None:
            yield from declared_options(f.metadata["options_of"])


def nested(cls: type) -> Any:
    """A field holding another options dataclass, built from the same sources."""
    return field(default_factory=cls, metadata={"options_of": cls})


def _coerce(opt: Option, value: Any) -> Any:
    """Text given in code (``ServerConfig(port="8000")``) reads as flag text would."""
    if opt.many:
        return [opt.parse(v) if isinstance(v, str) else v for v in value]
    return opt.parse(value) if isinstance(value, str) and opt.parse is not str else value


def _problem(opt: Option, value: Any) -> str | None:
    if value is None:
        return None if opt.optional else "must be set"
    if opt.choices is not None and value not in opt.choices:
        return f"must be one of {', '.join(opt.choices)}"
    return opt.check(value) if opt.check is not None else None


def validate_options(config: Any) -> None:
    """Coerce and check every option field of ``config``: the one validation of each setting."""
    for f in dataclasses.fields(config):
        opt = f.metadata.get("option")
        if opt is None:
            continue
        try:
            value = _coerce(opt, getattr(config, f.name))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{describe(f.name)}: {err}") from None
        problem = _problem(opt, value)
        if problem is not None:
            raise ValueError(f"{describe(f.name)} {problem}, got {getattr(config, f.name)!r}")
        object.__setattr__(config, f.name, value)


def describe(name: str) -> str:
    """How errors name a setting: its field, flag and variable."""
    return f"{name} ({flag_name(name)}, {env_name(name)})"


def parse_env_text(opt: Option, text: str) -> Any:
    if opt.many:
        return [opt.parse(part) for part in text.split(os.pathsep) if part]
    return opt.parse(text)


def from_sources(cls: type[T], given: Mapping[str, Any],
                 environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from values by option name (flags, or code), then the environment, then
    the declared defaults. Unknown names are refused."""
    environ = os.environ if environ is None else environ
    known = {f.name for f, _ in declared_options(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    return _build(cls, given, environ)


def _build(cls: type[T], given: Mapping[str, Any], environ: Mapping[str, str]) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("options_of") is not None:
            kwargs[f.name] = _build(f.metadata["options_of"], given, environ)
        elif "option" in f.metadata:
            if f.name in given:
                kwargs[f.name] = given[f.name]
            elif env_name(f.name) in environ:
                try:
                    kwargs[f.name] = parse_env_text(f.metadata["option"], environ[env_name(f.name)])
                except ValueError as err:
                    raise ValueError(f"{env_name(f.name)}: {err}") from None
    return cls(**kwargs)


def _shown_default(f: dataclasses.Field, opt: Option) -> str:
    if opt.shown_default is not None:
        return opt.shown_default
    default = f.default
    if opt.parse is parse_size and _is_int(default):
        return format_size(default)
    if default is None:
        return "unset"
    return str(default)


def _flag_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse shows the parser's own message only for ArgumentTypeError."""
    def run(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    run.__name__ = getattr(parse, "__name__", "value")
    return run


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per declared option; absent flags stay absent (``from_sources`` fills them)."""
    for f, opt in declared_options(cls):
        text = f"{opt.help} (env {env_name(f.name)}; default: {_shown_default(f, opt)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": text}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            metavar = opt.metavar or ("SIZE" if opt.parse is parse_size else None)
            kwargs.update(type=_flag_parser(opt.parse), choices=opt.choices, metavar=metavar)
            if opt.many:
                kwargs["nargs"] = "+"
        parser.add_argument(flag_name(f.name), **kwargs)


# --- the settings ------------------------------------------------------------------------------
@dataclass
class EngineConfig:
    """What the engine needs: the model, its memory budgets and the batch limits."""

    model: str | None = option(None, optional=True, help="HF model directory or .gguf file",
                               shown_default="the embedded SmolLM2-135M-Instruct")
    dtype: str = option("nf4", choices=DTYPES, help="base weight format")
    device: str = option("cpu", check=device_name, help="torch device for the model")
    max_batch: int = option(32, parse=int, check=positive,
                            help="most sequences in one running batch")
    max_batched_tokens: int = option(512, parse=int, check=positive,
                                     help="most tokens in one engine step")
    block_size: int = option(16, parse=int, check=positive, help="token slots per KV cache block")
    kv_cache_memory: int = option(256 * MIB, parse=parse_size, check=positive,
                                  help="device memory for the KV cache")
    kv_cache_dtype: str = option(
        "auto", choices=KV_CACHE_DTYPES,
        help="KV cache element type (auto: the model's compute dtype; fp16/bf16 hold twice the "
             "tokens per --kv-cache-memory and halve decode attention's memory traffic)")
    adapter_memory: int = option(256 * MIB, parse=parse_size, check=positive,
                                 help="device memory for resident adapters")
    adapter_host_memory: int = option(
        1024 * MIB, parse=parse_size, check=non_negative,
        help="host memory for adapters read from disk or evicted from the device, kept ready to "
             "install (LRU; 0 turns the host tier off)")
    adapter_dtype: str = option(
        "auto", choices=ADAPTER_DTYPES,
        help="resident adapter weights (auto: fp16 next to an nf4/int8 base on the CPU, else the "
             "model's compute dtype)")
    adapter_backend: str = option(
        "auto", choices=ADAPTER_BACKENDS,
        help="adapter kernels (auto: the fused C++ kernel on the CPU, for float32, bf16 and fp16 "
             "activations; Triton on CUDA, else torch; reference is the float64 check, slow)")
    max_model_len: int = option(2048, parse=int, check=positive,
                                help="most tokens per sequence (prompt + output)")
    max_queue: int = option(1024, parse=int, check=positive,
                            help="most waiting requests before 429")
    prefix_caching: bool = option(
        True, parse=parse_bool, check=boolean,
        help="reuse the KV blocks of a prompt prefix seen before on the same adapter weights "
             "(--no-prefix-caching turns it off)")
    enforce_eager: bool = option(
        False, parse=parse_bool, check=boolean,
        help="run every decode step eagerly, without CUDA graphs (graphs are used only on CUDA "
             "with the triton adapter backend and decode attention; nothing changes on the CPU)")
    cache_dir: Path | None = option(None, parse=expanded_path, optional=True,
                                    help="where the converted default model is cached",
                                    shown_default="$PROLORA_SERVE_CACHE or the user cache")

    def __post_init__(self) -> None:
        validate_options(self)


@dataclass
class ScaleOutConfig:
    """Scale-out on Ray Serve (``--replicas N``): N engine replicas behind one ingress serving the
    same app. Unset, the server is one process and Ray is never imported (it is an optional
    extra: ``pip install 'prolora-serve[ray]'``)."""

    replicas: int | None = option(
        None, parse=int, check=positive, optional=True, shown_default="unset: one process, no Ray",
        help="engine replicas on Ray Serve behind one ingress; requests on an adapter go to a "
             "replica holding it (Ray Serve model multiplexing, the adapter id as model id)")
    ray_address: str | None = option(
        None, parse=optional_text, optional=True, metavar="ADDR",
        shown_default="start a local cluster on 127.0.0.1",
        help="with --replicas: join this Ray cluster (host:port, ray://host:port or auto) instead "
             "of starting a local one; Ray's ports belong on a private network")
    replica_cpus: float = option(
        1.0, parse=float, check=positive_number, metavar="X",
        help="with --replicas: CPUs Ray reserves for each engine replica (fractions allowed); on "
             "cuda each replica also takes one GPU")
    replica_max_adapters: int | None = option(
        None, parse=int, check=positive, optional=True, metavar="K",
        shown_default="--adapter-memory over the largest registered adapter's resident bytes",
        help="with --replicas: adapter ids each replica holds for routing (Ray Serve's "
             "max_num_models_per_replica); keep it within what --adapter-memory holds")
    ray_object_store_memory: int = option(
        200 * MIB, parse=parse_size, check=positive,
        help="with --replicas and a local cluster: the Ray object store's size")

    def __post_init__(self) -> None:
        validate_options(self)


@dataclass
class ServerConfig:
    """Everything ``prolora-serve serve`` needs: HTTP, the registry, keys, and the engine."""

    engine: EngineConfig = nested(EngineConfig)
    scaleout: ScaleOutConfig = nested(ScaleOutConfig)
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(8000, parse=int, check=port_number, help="port to bind")
    adapter_dir: Path = option(default_factory=lambda: default_data_dir() / "adapters",
                               parse=expanded_path, help="adapter registry directory",
                               shown_default="$XDG_DATA_HOME/prolora-serve/adapters")
    max_upload_size: int = option(1024 * MIB, parse=parse_size, check=positive,
                                  help="largest adapter upload")
    api_key: str | None = option(None, parse=optional_text, optional=True,
                                 help="key required on /v1/* and adapter reads")
    admin_key: str | None = option(None, parse=optional_text, optional=True,
                                   help="key required for adapter uploads and deletes")
    register: list[Path] = option(
        default_factory=list, parse=expanded_path, many=True, check=existing_directories,
        metavar="DIR", shown_default="none",
        help="register every adapter found in DIR at start-up, skipping ids already present "
             f"(the variable is {os.pathsep!r}-separated)")
    adapter_import_dir: Path | None = option(
        None, parse=expanded_path, check=existing_directory, optional=True, metavar="DIR",
        help="directory POST /v1/load_lora_adapter may read lora_path from (unset: that endpoint "
             "answers 403; paths resolving outside it, through symlinks or '..', are refused)")
    metrics_adapter_labels: str = option(
        "key", choices=METRICS_ADAPTER_LABELS,
        help="who gets the adapter-labelled /metrics series: key (with --api-key set, only "
             "scrapes presenting a valid key; the rest get every other series) or open (everyone)")
    log_level: str = option("info", choices=LOG_LEVELS, help="log level")
    threads: int | None = option(None, parse=int, check=positive, optional=True,
                                 help="torch intra-op threads (fewer can be faster on a shared CPU)",
                                 shown_default="all cores")

    def __post_init__(self) -> None:
        validate_options(self)

    @classmethod
    def from_options(cls, **values: Any) -> "ServerConfig":
        """Server and engine settings by name in one call, e.g. ``from_options(dtype="fp32",
        port=0)``; the environment is not read (tests and embedding code set what they mean)."""
        return from_sources(cls, values, environ={})


@dataclass
class RemoteConfig:
    """How the remote ``adapters`` commands reach a server."""

    url: str = option("http://127.0.0.1:8000", help="server URL")
    api_key: str | None = option(None, parse=optional_text, optional=True, help="API key")
    admin_key: str | None = option(None, parse=optional_text, optional=True,
                                   help="admin key (uploads and deletes)")

    def __post_init__(self) -> None:
        validate_options(self)
