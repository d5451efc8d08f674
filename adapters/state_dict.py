"""Tensor dicts <-> ``CompactAdapter``: key names, and every check a loaded adapter must pass.

Keys (the public file contract): ``base_model.model.<module>.prolora_A0`` (R, ceil(h/m)),
``.prolora_B0`` (ceil(o/n), R), ``.prolora_Au`` (u, h), ``.prolora_Bu`` (o, u); zero-size
tensors are omitted. Plain PEFT LoRA files use ``.lora_A.weight`` (r, h) and
``.lora_B.weight`` (o, r), which are exactly Au and Bu of a PRoLoRA layer with u = r.

Dimensions (h, o) of each module come from, in order: the base model's ``linear_shapes``
when given; the dims the file records (``recorded_dims``: its ``DIMS_METADATA_KEY``
metadata, which ``format`` reads and writes); the tensors, which fix h when u > 0 (Au) or
m = 1 (A0), and o when u > 0 (Bu) or n = 1 (B0). With u = 0 the chunks leave h open within
m values (ceil(h/m) is all A0 says), so such a module with neither source is refused rather
than guessed. Recorded dims must name exactly the modules with tensors, fit every tensor,
and equal the base model's shapes when those are given.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .config import AdapterConfigError, LayerSpec, ProLoRAConfig
from .errors import AdapterFormatError
from .weights import TENSOR_NAMES, CompactAdapter, CompactLinearWeights

KEY_PREFIX = "base_model.model."
PROLORA_SUFFIXES = {f".{name}": name for name in TENSOR_NAMES}
LORA_SUFFIXES = {".lora_A.weight": "prolora_Au", ".lora_B.weight": "prolora_Bu"}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LinearShapes = Mapping[str, tuple[int, int]]
# The safetensors metadata key that records each module's [in_features, out_features].
DIMS_METADATA_KEY = "module_dims"
_Dims = tuple[int | None, int | None, str]  # h, o (None: not fixed by any source), origin


def tensor_key(module_path: str, name: str, lora: bool) -> str:
    """The file key of compact tensor ``name`` (e.g. ``prolora_Au``) of one module.

    LoRA files have no A0/B0; those names keep their PRoLoRA suffix (used in messages only).
    """
    suffixes = {**PROLORA_SUFFIXES, **LORA_SUFFIXES} if lora else PROLORA_SUFFIXES
    suffix = [s for s, n in suffixes.items() if n == name][-1]
    return f"{KEY_PREFIX}{module_path}{suffix}"


def parse_key(key: str, lora: bool) -> tuple[str, str]:
    """``(module_path, tensor name)`` of a file key, or an error saying what is wrong with it."""
    suffixes, others = (LORA_SUFFIXES, PROLORA_SUFFIXES) if lora else (PROLORA_SUFFIXES, LORA_SUFFIXES)
    if not key.startswith(KEY_PREFIX):
        raise AdapterFormatError(f"tensor {key!r}: name must start with {KEY_PREFIX!r}")
    for suffix, name in suffixes.items():
        if key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
            return key[len(KEY_PREFIX):-len(suffix)], name
    if any(key.endswith(suffix) for suffix in others):
        kind = ("PRoLoRA", "LORA") if lora else ("LoRA", "PROLORA")
        raise AdapterFormatError(f"tensor {key!r} is a {kind[0]} tensor but the config's "
                                 f"peft_type is {kind[1]!r}")
    raise AdapterFormatError(f"tensor {key!r}: unrecognized name; expected "
                             f"'{KEY_PREFIX}<module>' followed by one of {sorted(suffixes)}")


def module_paths(keys: list[str] | tuple[str, ...], lora: bool) -> list[str]:
    """Sorted distinct module paths named by file keys."""
    return sorted({parse_key(key, lora)[0] for key in keys})


def adapter_to_state_dict(adapter: CompactAdapter) -> dict[str, torch.Tensor]:
    """File tensors of an adapter (LoRA keys when its config is plain LoRA)."""
    _check_specs_match_config(adapter)
    lora = adapter.config.is_plain_lora
    tensors = {}
    for path, weights in sorted(adapter.modules.items()):
        for name, tensor in zip(TENSOR_NAMES, weights.tensors()):
            if tensor.numel():
                tensors[tensor_key(path, name, lora)] = tensor.detach().to("cpu").contiguous().clone()
    if not tensors:
        raise AdapterFormatError("adapter has no modules: nothing to save")
    return tensors


def _check_specs_match_config(adapter: CompactAdapter) -> None:
    # A spec the config would not rebuild produces a file that does not load back.
    for path, weights in adapter.modules.items():
        spec = weights.spec
        expected = adapter.config.layer_spec(path, spec.in_features, spec.out_features)
        if spec != expected:
            raise AdapterConfigError(f"{path}: layer spec {spec} does not follow from the "
                                     f"adapter config (expected {expected})")


def adapter_from_state_dict(config: ProLoRAConfig, tensors: Mapping[str, torch.Tensor],
                            linear_shapes: LinearShapes | None = None,
                            recorded_dims: LinearShapes | None = None) -> CompactAdapter:
    """Validate file tensors against the config (and the base model, and the dims the file
    records) and build the adapter."""
    if not tensors:
        raise AdapterFormatError("adapter is empty: the file holds no tensors")
    check_tensors(tensors)
    grouped = _group_by_module(config, tensors)
    _check_targets(config, grouped, linear_shapes)
    if recorded_dims is not None:
        _check_recorded_dims(grouped, recorded_dims, linear_shapes)
    dims = {path: _module_dims(config, path, found, linear_shapes, recorded_dims)
            for path, found in grouped.items()}
    _refuse_unknown_dims(config, grouped, dims)
    modules = {path: _build_module(config, path, found, dims[path])
               for path, found in grouped.items()}
    return CompactAdapter(config, modules)


def check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """``check_tensor`` on every tensor, reporting the first bad one in key order (so the error
    does not depend on file order); finiteness is checked in one pass per dtype, and tensor by
    tensor only to name the culprit."""
    for key in sorted(tensors):
        _check_layout(key, tensors[key])
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors.values():
        by_dtype.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(flat)).all()) for flat in by_dtype.values()):
        return
    for key in sorted(tensors):
        check_tensor(key, tensors[key])


def _check_layout(key: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2:
        raise AdapterFormatError(f"tensor {key!r} must be 2-D, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(f"tensor {key!r} has dtype {tensor.dtype}; expected one of "
                                 "float16, bfloat16, float32, float64")


def check_tensor(key: str, tensor: torch.Tensor) -> None:
    _check_layout(key, tensor)
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterFormatError(f"tensor {key!r} contains NaN or Inf values")


def _group_by_module(config: ProLoRAConfig, tensors: Mapping[str, torch.Tensor]
                     ) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        path, name = parse_key(key, config.is_plain_lora)
        if not config.targets(path):
            raise AdapterFormatError(f"tensor {key!r}: module {path!r} has weights but is not in "
                                     f"target_modules {list(config.target_modules)}")
        grouped.setdefault(path, {})[name] = tensors[key]
    return grouped


def _check_targets(config: ProLoRAConfig, grouped: Mapping[str, object],
                   linear_shapes: LinearShapes | None) -> None:
    for path in grouped:
        if linear_shapes is not None and path not in linear_shapes:
            raise AdapterFormatError(f"module {path!r} (tensor "
                                     f"{tensor_key(path, 'prolora_Au', config.is_plain_lora)!r} and "
                                     "siblings) is not a linear layer of the base model")
    candidates = list(grouped) if linear_shapes is None else list(linear_shapes)
    where = "in the adapter's tensors" if linear_shapes is None else "in the base model"
    for target in config.target_modules:
        if not any(path == target or path.endswith("." + target) for path in candidates):
            raise AdapterFormatError(f"target module {target!r} matches no module {where}")
    if linear_shapes is not None:
        _check_every_target_has_weights(config, grouped, linear_shapes)


def _check_every_target_has_weights(config: ProLoRAConfig, grouped: Mapping[str, object],
                                    linear_shapes: LinearShapes) -> None:
    missing = [p for p in linear_shapes if config.targets(p) and p not in grouped]
    if missing:
        key = tensor_key(missing[0], "prolora_Au", config.is_plain_lora)
        raise AdapterFormatError(f"missing tensors for {len(missing)} targeted module(s) of the "
                                 f"base model, first {missing[0]!r} (e.g. {key!r})")


def _build_module(config: ProLoRAConfig, path: str, found: Mapping[str, torch.Tensor],
                  dims: _Dims) -> CompactLinearWeights:
    in_features, out_features, origin = dims
    assert in_features is not None and out_features is not None  # _refuse_unknown_dims ran
    spec = config.layer_spec(path, in_features, out_features)
    dtype = next(iter(found.values())).dtype
    tensors = [_expected_tensor(config, spec, path, name, found.get(name), dtype, origin)
               for name in TENSOR_NAMES]
    return CompactLinearWeights(spec, *tensors)


def _expected_tensor(config: ProLoRAConfig, spec: LayerSpec, path: str, name: str,
                     tensor: torch.Tensor | None, dtype: torch.dtype, origin: str) -> torch.Tensor:
    shape = spec.tensor_shapes()[name]
    key = tensor_key(path, name, config.is_plain_lora)
    if tensor is None:
        if 0 in shape:  # omitted on purpose: u = 0 or R = 0
            return torch.zeros(shape, dtype=dtype)
        raise AdapterFormatError(f"missing tensor {key!r} (expected shape {shape})")
    if tuple(tensor.shape) != shape:
        raise AdapterFormatError(
            f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} for r={spec.r}, "
            f"unshared_r={spec.unshared_r}, reduce_lora_A_x={spec.reduce_a}, "
            f"reduce_lora_B_x={spec.reduce_b}, in={spec.in_features}, out={spec.out_features} "
            f"({origin})")
    return tensor


def _check_recorded_dims(grouped: Mapping[str, object], recorded: LinearShapes,
                         linear_shapes: LinearShapes | None) -> None:
    """Recorded dims cover exactly the modules with tensors and agree with the base model.

    Only the base model comparison is needed here: the tensors are checked against the
    recorded dims when each module is built.
    """
    missing = sorted(set(grouped) - set(recorded))
    if missing:
        raise AdapterFormatError(f"metadata {DIMS_METADATA_KEY!r} has no entry for module "
                                 f"{missing[0]!r} ({len(missing)} module(s) with tensors lack one)")
    extra = sorted(set(recorded) - set(grouped))
    if extra:
        raise AdapterFormatError(f"metadata {DIMS_METADATA_KEY!r} names module {extra[0]!r}, "
                                 "which has no tensors in the file")
    if linear_shapes is None:
        return
    for path in sorted(grouped):
        if tuple(recorded[path]) != tuple(linear_shapes[path]):
            (h, o), (base_h, base_o) = recorded[path], linear_shapes[path]
            raise AdapterFormatError(f"module {path!r}: the file records in_features={h}, "
                                     f"out_features={o} (metadata {DIMS_METADATA_KEY!r}) but "
                                     f"the base model has in_features={base_h}, "
                                     f"out_features={base_o}")


def _module_dims(config: ProLoRAConfig, path: str, found: Mapping[str, torch.Tensor],
                 linear_shapes: LinearShapes | None, recorded: LinearShapes | None) -> _Dims:
    if linear_shapes is not None:
        in_features, out_features = linear_shapes[path]
        return in_features, out_features, "dims from the base model"
    if recorded is not None:
        in_features, out_features = recorded[path]
        return in_features, out_features, f"dims recorded in metadata {DIMS_METADATA_KEY!r}"
    rank_spec = config.layer_spec(path, 1, 1)  # only r and u matter here
    in_features = _infer_dim(config, path, found, rank_spec, "prolora_Au", "prolora_A0", 1,
                             rank_spec.reduce_a)
    out_features = _infer_dim(config, path, found, rank_spec, "prolora_Bu", "prolora_B0", 0,
                              rank_spec.reduce_b)
    return in_features, out_features, "dims inferred from the tensors"


def _infer_dim(config: ProLoRAConfig, path: str, found: Mapping[str, torch.Tensor],
               spec: LayerSpec, unshared: str, shared: str, axis: int, ratio: int) -> int | None:
    """h (or o) where the tensors fix it: the unshared tensor when u > 0, the shared chunk
    when the sharing ratio is 1; None otherwise (a chunk of width c leaves ratio values open).

    ``axis`` is where the dimension lies in both: Au (u, h) / A0 (R, cA) use 1,
    Bu (o, u) / B0 (cB, R) use 0.
    """
    name = unshared if spec.unshared_r > 0 else shared
    if name not in found:
        raise AdapterFormatError(f"missing tensor {tensor_key(path, name, config.is_plain_lora)!r}")
    if spec.unshared_r > 0 or ratio == 1:
        return int(found[name].shape[axis])
    return None


def _refuse_unknown_dims(config: ProLoRAConfig, grouped: Mapping[str, Mapping[str, torch.Tensor]],
                         dims: Mapping[str, _Dims]) -> None:
    """One error naming the modules whose h or o no source fixes, and the range each could be."""
    unknown = [path for path in sorted(dims) if None in dims[path][:2]]
    if not unknown:
        return
    shown = "; ".join(_unknown_dims_text(config, path, grouped[path], dims[path])
                      for path in unknown[:3])
    more = f" (and {len(unknown) - 3} more module(s))" if len(unknown) > 3 else ""
    raise AdapterFormatError(
        f"dimensions unknown for {len(unknown)} module(s): {shown}{more}. With "
        "unshared_r = 0 the file stores only the chunks A0 (R x ceil(h/m)) and B0 "
        f"(ceil(o/n) x R), and it does not record the dims (no {DIMS_METADATA_KEY!r} metadata: "
        "an older or third-party file); pass the base model's shapes (CLI: --base-model DIR)")


def _unknown_dims_text(config: ProLoRAConfig, path: str, found: Mapping[str, torch.Tensor],
                       dims: _Dims) -> str:
    spec = config.layer_spec(path, 1, 1)
    parts = []
    for value, name, symbol, tensor, axis, ratio in (
            (dims[0], "in_features", "h", "prolora_A0", 1, spec.reduce_a),
            (dims[1], "out_features", "o", "prolora_B0", 0, spec.reduce_b)):
        if value is None:
            width = int(found[tensor].shape[axis])
            parts.append(f"{name} unknown (ceil({symbol}/{ratio}) = {width}: {symbol} is "
                         f"{ratio * (width - 1) + 1}..{ratio * width})")
    return f"{path!r} " + ", ".join(parts)
