"""``GET /v1/capacity``: how many adapters fit in a memory budget, PRoLoRA against LoRA.

All numbers come from ``adapters.accounting``; the page only draws them. Memory is in GiB
(2**30 bytes): query parameters named ``*_gb`` are GiB, and every response says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import APIRouter, Query, Request

from ...adapters import accounting as acc
from ...adapters.config import AdapterConfigError
from ...adapters.presets import MODEL_PRESETS, PAPER_TABLE1_LORA_R2, preset
from ..engine.client import EngineClient
from .errors import APIError, error_response

LOADED = "loaded"
DEFAULT_BASE = "llama2-7b"
DEFAULT_MEMORY_GB = 20.0
MAX_GB = 1e6  # one PiB: beyond any accelerator, keeps the numbers printable
MIN_GB = 1e-6  # one KiB: below it nothing fits and the chart's axis degenerates
MAX_RANK = 65536
CURVE_POINTS = 41
CUSTOM_ID = "custom"


class CapacityRequestError(ValueError):
    """A query parameter is invalid; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CapacityQuery:
    memory_gb: float = DEFAULT_MEMORY_GB
    base: str = DEFAULT_BASE
    dtype: str = "fp32"  # adapter storage dtype
    custom: acc.AdapterVariant | None = None
    gpu_gb: float | None = None
    kv_cache_gb: float | None = None  # None: the engine's KV cache for base=loaded, else 0
    weight_dtype: str | None = None  # None: measured bytes for base=loaded, else nf4
    target_modules: tuple[str, ...] = acc.ALL_TARGETS


# --- parsing ------------------------------------------------------------------------------
def _parse_float(params: Mapping[str, str], name: str, low: float) -> float | None:
    """A GiB amount in [low, MAX_GB]; None when absent."""
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise CapacityRequestError(name, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or not low <= value <= MAX_GB:
        raise CapacityRequestError(name, f"{name} must be a number in [{low:g}, {MAX_GB:g}] (GiB), "
                                         f"got {raw!r}")
    return value


def _parse_int(params: Mapping[str, str], name: str, low: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw.strip() == "":
        return None
    if not re.fullmatch(r"[0-9]{1,9}", raw.strip()) or not low <= int(raw) <= MAX_RANK:
        raise CapacityRequestError(name, f"{name} must be an integer in [{low}, {MAX_RANK}], got {raw!r}")
    return int(raw)


def _parse_choice(params: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise CapacityRequestError(name, f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _parse_custom(params: Mapping[str, str]) -> acc.AdapterVariant | None:
    """The custom row: r required once any of r/unshared_r/reduce_a/reduce_b is given;
    unshared_r defaults to 0 and the sharing ratios to 1."""
    r = _parse_int(params, "r", 1)
    unshared = _parse_int(params, "unshared_r", 0)
    reduce_a, reduce_b = _parse_int(params, "reduce_a", 1), _parse_int(params, "reduce_b", 1)
    if r is None:
        if (unshared, reduce_a, reduce_b) != (None, None, None):
            raise CapacityRequestError("r", "r is required for a custom row (unshared_r, reduce_a "
                                            "or reduce_b was given)")
        return None
    try:
        return acc.AdapterVariant(r, unshared or 0, reduce_a or 1, reduce_b or 1)
    except AdapterConfigError as err:
        raise CapacityRequestError("unshared_r", str(err)) from None


def _parse_targets(params: Mapping[str, str]) -> tuple[str, ...]:
    raw = params.get("target_modules")
    if raw is None or raw.strip() == "":
        return acc.ALL_TARGETS
    names = tuple(dict.fromkeys(t.strip() for t in raw.split(",") if t.strip()))
    unknown = [n for n in names if n not in acc.PROJECTIONS]
    if unknown or not names:
        raise CapacityRequestError("target_modules", f"target_modules must be a comma-separated "
                                                     f"subset of {', '.join(acc.ALL_TARGETS)}, got {raw!r}")
    return names


def parse_capacity_query(params: Mapping[str, str], bases: tuple[str, ...]) -> CapacityQuery:
    """Validate raw query strings; ``bases`` are the base names this server can answer for."""
    memory = _parse_float(params, "memory_gb", MIN_GB)
    return CapacityQuery(
        memory_gb=DEFAULT_MEMORY_GB if memory is None else memory,
        base=_parse_choice(params, "base", bases) or DEFAULT_BASE,
        dtype=_parse_choice(params, "dtype", tuple(acc.ADAPTER_DTYPE_BYTES)) or "fp32",
        custom=_parse_custom(params),
        gpu_gb=_parse_float(params, "gpu_gb", MIN_GB),
        kv_cache_gb=_parse_float(params, "kv_cache_gb", 0.0),
        weight_dtype=_parse_choice(params, "weight_dtype", acc.WEIGHT_DTYPES),
        target_modules=_parse_targets(params),
    )


# --- the base model -----------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModel:
    """The base the adapters attach to: its shape and what its weights and KV cache take."""

    name: str
    source: str  # "preset" | "loaded"
    shape: acc.ModelShape
    weight_dtype: str  # a WEIGHT_DTYPES entry, or "measured"
    weight_bytes: int
    kv_cache_bytes: int


@dataclass(frozen=True)
class LoadedBase:
    """The model this server runs, as the calculator sees it (from ``EngineClient``)."""

    name: str
    hf_config: Any  # transformers PretrainedConfig
    weight_bytes: int  # measured: every byte the resident base model holds
    kv_cache_bytes: int


def available_bases(loaded: LoadedBase | None) -> tuple[str, ...]:
    return tuple(MODEL_PRESETS) + ((LOADED,) if loaded is not None else ())


def resolve_base(query: CapacityQuery, loaded: LoadedBase | None) -> BaseModel:
    kv_given = None if query.kv_cache_gb is None else acc.gib_to_bytes(query.kv_cache_gb)
    if query.base == LOADED and loaded is not None:
        shape = acc.ModelShape.from_config(loaded.hf_config)
        dtype = query.weight_dtype or "measured"
        weights = loaded.weight_bytes if dtype == "measured" else acc.base_model_nbytes(shape, dtype)
        kv = loaded.kv_cache_bytes if kv_given is None else kv_given
        return BaseModel(loaded.name, LOADED, shape, dtype, weights, kv)
    shape = acc.ModelShape.from_config(preset(query.base))
    dtype = query.weight_dtype or "nf4"
    return BaseModel(query.base, "preset", shape, dtype, acc.base_model_nbytes(shape, dtype), kv_given or 0)


def _base_json(base: BaseModel) -> dict[str, Any]:
    shape = base.shape
    return {
        "name": base.name, "source": base.source,
        "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers, "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size, "num_params": acc.base_model_num_params(shape),
        "weight_dtype": base.weight_dtype, "weight_bytes": base.weight_bytes,
        "kv_cache_bytes_per_token_16bit": acc.kv_cache_bytes_per_token(shape),
        "linear_shapes": {name: list(io) for name, io in shape.projection_shapes().items()},
    }


# --- the report ---------------------------------------------------------------------------
def _gpu_json(query: CapacityQuery, base: BaseModel) -> dict[str, Any] | None:
    if query.gpu_gb is None:
        return None
    gpu_bytes = acc.gib_to_bytes(query.gpu_gb)
    left = gpu_bytes - base.weight_bytes - base.kv_cache_bytes
    return {"gpu_gb": query.gpu_gb, "gpu_bytes": gpu_bytes, "base_weight_bytes": base.weight_bytes,
            "kv_cache_bytes": base.kv_cache_bytes, "available_bytes": max(left, 0),
            "fits_base_and_kv": left >= 0}


def _variants(query: CapacityQuery) -> list[tuple[str, acc.AdapterVariant]]:
    rows = [(v.id, v) for v in acc.PAPER_VARIANTS]
    return rows + ([(CUSTOM_ID, query.custom)] if query.custom is not None else [])


def _row_json(row_id: str, fp: acc.AdapterFootprint, memory_bytes: int,
              gpu: dict[str, Any] | None) -> dict[str, Any]:
    v = fp.variant
    return {
        "id": row_id, "label": v.label + (" (custom)" if row_id == CUSTOM_ID else ""), "kind": v.kind,
        "custom": row_id == CUSTOM_ID, "r": v.r, "unshared_r": v.unshared_r,
        "reduce_a": v.reduce_a, "reduce_b": v.reduce_b, "params": fp.num_params,
        "bytes_per_adapter": fp.nbytes, "fit": acc.adapters_that_fit(memory_bytes, fp.nbytes),
        "fit_next_to_model": None if gpu is None else acc.adapters_that_fit(gpu["available_bytes"], fp.nbytes),
    }


def _ratio(numerator: int | None, denominator: int | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _pairing_json(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prolora, lora = (rows[v.id] for v in acc.EQUAL_QUALITY_PAIR)
    return {
        "prolora": prolora["id"], "lora": lora["id"],
        "prolora_params": prolora["params"], "lora_params": lora["params"],
        "params_ratio": lora["params"] / prolora["params"],
        "prolora_fit": prolora["fit"], "lora_fit": lora["fit"],
        "fit_ratio": _ratio(prolora["fit"], lora["fit"]),
        "fit_ratio_next_to_model": _ratio(prolora["fit_next_to_model"], lora["fit_next_to_model"]),
        "source": "Paper Table 2 (LLaMA2-7B): PRoLoRA r=32, u=4, m=n=7 matches or beats LoRA r=16 "
                  "with about half the parameters",
    }


def _nice_ceiling(value: float) -> float:
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) >= value."""
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if step * power >= value)


def _curve_json(memory_gb: float, footprints: dict[str, acc.AdapterFootprint]) -> dict[str, Any]:
    top = _nice_ceiling(2 * memory_gb)
    xs = [top * i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
    series = {row_id: [acc.adapters_that_fit(acc.gib_to_bytes(x), fp.nbytes) for x in xs]
              for row_id, fp in footprints.items()}
    return {"memory_gb": xs, "series": series}


def _notes(base: BaseModel) -> list[str]:
    notes = ["Resident bytes per adapter = compact parameters (A0, B0, Au, Bu) x dtype bytes; this "
             "server materializes nothing and pads nothing, so the residency overhead is 0 bytes."]
    if base.name in PAPER_TABLE1_LORA_R2:
        paper = PAPER_TABLE1_LORA_R2[base.name] / 1e6
        real = acc.footprint(base.shape, acc.lora(2)).num_params / 1e6
        notes.append(f"The paper's Table 1 lists {paper:.2f}M parameters for LoRA r=2 on {base.name}; "
                     f"the model's published shapes give {real:.2f}M (shown here).")
    if base.weight_dtype == "nf4":
        notes.append("NF4 base bytes: 4-bit codes + one float32 absmax per 64 weights (no double "
                     "quantization); embeddings, lm_head and norms in 16 bits.")
    return notes


def capacity_report(query: CapacityQuery, base: BaseModel) -> dict[str, Any]:
    memory_bytes = acc.gib_to_bytes(query.memory_gb)
    gpu = _gpu_json(query, base)
    footprints = {row_id: acc.footprint(base.shape, v, query.dtype, query.target_modules)
                  for row_id, v in _variants(query)}
    rows = {row_id: _row_json(row_id, fp, memory_bytes, gpu) for row_id, fp in footprints.items()}
    return {
        "unit": "GiB", "bytes_per_unit": acc.GIB,
        "memory_gb": query.memory_gb, "memory_bytes": memory_bytes,
        "dtype": query.dtype, "dtype_bytes": acc.dtype_bytes(query.dtype),
        "target_modules": list(query.target_modules),
        "base": _base_json(base), "gpu": gpu, "rows": list(rows.values()),
        "pairing": _pairing_json(rows), "curve": _curve_json(query.memory_gb, footprints),
        "notes": _notes(base),
    }


def _choices(loaded: LoadedBase | None) -> dict[str, Any]:
    return {"bases": list(available_bases(loaded)), "dtypes": list(acc.ADAPTER_DTYPE_BYTES),
            "weight_dtypes": list(acc.WEIGHT_DTYPES), "target_modules": list(acc.ALL_TARGETS)}


def capacity_json(params: Mapping[str, str], loaded: LoadedBase | None) -> dict[str, Any]:
    """The whole response for raw query strings; raises CapacityRequestError."""
    query = parse_capacity_query(params, available_bases(loaded))
    try:
        report = capacity_report(query, resolve_base(query, loaded))
    except acc.AccountingError as err:
        raise CapacityRequestError("base", str(err)) from None
    return {**report, "choices": _choices(loaded)}


async def loaded_base(engine: EngineClient | None) -> LoadedBase | None:
    if engine is None:
        return None
    snapshot = await engine.snapshot()
    # One device's KV cache: a scale-out deployment's sums span its replicas (server/scaleout).
    stats = next(iter(snapshot.replicas.values())).stats if snapshot.replicas else snapshot.stats
    return LoadedBase(engine.model.name, engine.model.hf_config, engine.model.base_model_bytes,
                      stats.kv_cache_bytes)


# --- the route ----------------------------------------------------------------------------
router = APIRouter(tags=["dashboard"])

_GB = "GiB (2**30 bytes)"


@router.get("/v1/capacity", summary="How many adapters fit in a memory budget, PRoLoRA vs LoRA")
async def get_capacity(
    request: Request,
    memory_gb: str | None = Query(None, description=f"adapter memory in {_GB}; default 20"),
    base: str | None = Query(None, description="llama2-7b | llama2-13b | llama2-70b | smollm2-135m | loaded"),
    dtype: str | None = Query(None, description="adapter storage dtype: fp32 | bf16 | fp16"),
    r: str | None = Query(None, description="custom row: total rank"),
    unshared_r: str | None = Query(None, description="custom row: unshared rank u (default 0)"),
    reduce_a: str | None = Query(None, description="custom row: A sharing ratio m (default 1)"),
    reduce_b: str | None = Query(None, description="custom row: B sharing ratio n (default 1)"),
    gpu_gb: str | None = Query(None, description=f"accelerator memory in {_GB}: also count what fits next to the model"),
    kv_cache_gb: str | None = Query(None, description=f"KV cache reserved on the accelerator, {_GB}"),
    weight_dtype: str | None = Query(None, description="base weight dtype: nf4 | int8 | bf16 | fp32"),
    target_modules: str | None = Query(None, description="comma-separated projections (default all seven)"),
) -> Any:
    given = {"memory_gb": memory_gb, "base": base, "dtype": dtype, "r": r, "unshared_r": unshared_r,
             "reduce_a": reduce_a, "reduce_b": reduce_b, "gpu_gb": gpu_gb, "kv_cache_gb": kv_cache_gb,
             "weight_dtype": weight_dtype, "target_modules": target_modules}
    raw = {name: value for name, value in given.items() if value is not None}
    loaded = await loaded_base(request.app.state.engine)
    try:
        return capacity_json(raw, loaded)
    except CapacityRequestError as err:
        return error_response(APIError(400, str(err), param=err.param, code="invalid_value"))
