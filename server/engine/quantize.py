"""Weight quantization of the decoder's projections by module swap (embeddings and lm_head stay float).

- ``nf4``: bitsandbytes ``Linear4bit`` (NF4, block 64, float32 absmax). On an AVX512-BF16 CPU
  bitsandbytes repacks the weights on the first eval forward for a fused 4-bit kernel (bf16
  activations) that is as fast as fp32 GEMM on cache-resident weights and far faster once the
  weights stop fitting in cache (``warm_up`` repacks at load so ``nbytes`` is the real size);
  ``NF4Linear`` calls that kernel without bitsandbytes' per-call Python.
- ``int8``: bitsandbytes ``Linear8bitLt`` storage (int8 rows + absmax); on the CPU a weight-only
  dequantizing forward (bitsandbytes' CPU path also quantizes activations: less accurate, and it
  logs a warning per call).
- ``bf16`` / ``fp16`` / ``fp32``: plain casts.

The compute dtype (activations, unquantized weights, the KV cache and adapters by default) is
chosen once per (format, device) in ``COMPUTE_DTYPES``: on the CPU the quantized formats compute
in float32 (bitsandbytes' CPU kernels take float32 or bf16 in and the fused adapter kernel is
float32); on CUDA ``nf4`` computes in bf16 (QLoRA's bnb_4bit_compute_dtype; the NF4 state
dequantizes straight to bf16), ``int8`` in fp16 (bitsandbytes' int8 matmul casts its input to
fp16 anyway), and the float formats in themselves.

On the CPU, the float32 linears that remain (the output layer; every projection of an fp32
base) are then swapped for oneDNN-packed ones (``packed_linear.py``): same float32 products.

Quantizing is slow on the CPU (seconds for a 135M model), so the quantized tensors can be
cached in one safetensors file and reused (``cache_file``).
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import DTYPES
from .packed_linear import PackedLinear, pack_float32_linears


NF4_BLOCKSIZE = 64
CACHE_FORMAT = f"prolora-serve-quantized-1/bnb-{bnb.__version__}"


def _native_nf4_kernel() -> Callable[..., int] | None:
    """bitsandbytes' fused CPU NF4 kernel (AVX512-BF16), the one its ``gemv_4bit`` op calls."""
    try:
        from bitsandbytes.cextension import lib
        return lib.gemv_4bit_inference_cpu_nf4_bf16
    except (ImportError, AttributeError, RuntimeError):
        return None


_NF4_CPU_KERNEL = _native_nf4_kernel()


class NF4Linear(bnb.nn.Linear4bit):
    """bitsandbytes NF4 with a slim CPU path: once the weights are repacked for the fused kernel,
    call it directly. Same kernel and result as ``Linear4bit.forward``, without its ~40 us of
    Python per call (about 8 ms per decode step of a 30-layer model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if (_NF4_CPU_KERNEL is None or x.device.type != "cpu" or self.bias is not None
                or not getattr(state, "packing_format_for_cpu", False)):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.bfloat16)
        _NF4_CPU_KERNEL(ct.c_int64(rows.shape[0]), ct.c_int64(self.out_features),
                        ct.c_int64(self.in_features), _ptr(rows), _ptr(self.weight.data),
                        _ptr(state.absmax), _ptr(out), ct.c_int64(state.blocksize),
                        ct.c_int64(rows.stride(0)), ct.c_int64(out.stride(0)))
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def _ptr(tensor: torch.Tensor) -> ct.c_void_p:
    return ct.c_void_p(tensor.data_ptr())


class Int8Linear(bnb.nn.Linear8bitLt):
    """bitsandbytes int8 storage (per-output-row absmax); weight-only dequantization on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        if self.weight.CB is not None:
            self.init_8bit_state()
        row_scale = (self.state.SCB / 127.0).to(x.dtype)
        out = F.linear(x, self.state.CB.to(x.dtype)) * row_scale
        return out if self.bias is None else out + self.bias.to(x.dtype)


# (base weight format, device type) -> the compute dtype; see the module docstring.
COMPUTE_DTYPES: dict[tuple[str, str], torch.dtype] = {
    ("nf4", "cpu"): torch.float32, ("nf4", "cuda"): torch.bfloat16,
    ("int8", "cpu"): torch.float32, ("int8", "cuda"): torch.float16,
    ("bf16", "cpu"): torch.bfloat16, ("bf16", "cuda"): torch.bfloat16,
    ("fp16", "cpu"): torch.float16, ("fp16", "cuda"): torch.float16,
    ("fp32", "cpu"): torch.float32, ("fp32", "cuda"): torch.float32,
}
# The dtype the checkpoint is read into before quantizing: the float formats read straight into
# their own dtype (a 7B fp32 copy never exists), the quantized ones quantize from float32.
LOAD_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype_for(dtype: str, device: torch.device | str) -> torch.dtype:
    """The float dtype activations (and unquantized weights) use for a weight format."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")
    device_type = torch.device(device).type
    if (dtype, device_type) not in COMPUTE_DTYPES:
        raise ValueError(f"no compute dtype for {dtype} on {device_type} (cpu or cuda)")
    return COMPUTE_DTYPES[dtype, device_type]


def load_dtype_for(dtype: str) -> torch.dtype:
    """The dtype checkpoint tensors are read into for a weight format."""
    return LOAD_DTYPES.get(dtype, torch.float32)


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCKSIZE,
                                       compress_statistics=False, quant_type="nf4")
    return {"packed": packed, "absmax": state.absmax}


def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, scales, _ = bnbf.int8_vectorwise_quant(weight.float().contiguous())
    return {"rows": rows, "scales": scales}


def nf4_linear(linear: nn.Linear, q: dict[str, torch.Tensor], compute_dtype: torch.dtype,
               device: torch.device) -> NF4Linear:
    """A Linear4bit from quantized tensors, canonical or (``cpu_packed``) in bitsandbytes' CPU layout."""
    module = NF4Linear(linear.in_features, linear.out_features, linear.bias is not None,
                       compute_dtype=compute_dtype, quant_type="nf4", device="meta")
    # the dtype the weights dequantize to: the compute dtype on CUDA (one pass, no float32 copy
    # of each weight per call); float32 on the CPU, as bitsandbytes' CPU repacking expects
    state = bnbf.QuantState(absmax=q["absmax"], shape=torch.Size(linear.weight.shape),
                            code=bnbf.get_4bit_type("nf4", device=q["packed"].device),
                            blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                            dtype=compute_dtype if device.type == "cuda" else torch.float32)
    if _flag(q, "cpu_packed"):
        _mark_cpu_packed(state)
    module.weight = bnb.nn.Params4bit(q["packed"], requires_grad=False, quant_state=state,
                                      blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                      quant_type="nf4", bnb_quantized=True, module=module)
    module.quant_state = state
    # bitsandbytes' CPU kernel needs 32 | out and 64 | in (true of real LLaMA shapes); other
    # shapes take its dequantize-then-GEMM path.
    module.support_avx512bf16_for_cpu &= (linear.out_features % 32 == 0
                                          and linear.in_features % NF4_BLOCKSIZE == 0)
    _copy_bias(module, linear, compute_dtype)
    return module.to(device)


def _mark_cpu_packed(state: bnbf.QuantState) -> None:
    """What ``bitsandbytes.functional._convert_weight_packed_for_cpu`` records on a state."""
    rows, cols = state.shape
    state.original_dtype, state.original_nested = torch.float32, False
    state.original_qshape = torch.Size([rows * cols // 2, 1])
    state.dtype = torch.bfloat16
    state.packing_format_for_cpu = True


def _flag(q: dict[str, torch.Tensor], name: str) -> bool:
    return name in q and bool(q[name].item())


def is_cpu_packed(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def int8_linear(linear: nn.Linear, q: dict[str, torch.Tensor], compute_dtype: torch.dtype,
                device: torch.device) -> Int8Linear:
    module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                        has_fp16_weights=False, threshold=0.0, device="meta")
    module.weight = bnb.nn.Int8Params(q["rows"], requires_grad=False, has_fp16_weights=False,
                                      CB=q["rows"], SCB=q["scales"])
    _copy_bias(module, linear, compute_dtype)
    return module.to(device)


def quantized_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``nf4_linear`` / ``int8_linear`` rebuild ``module`` from (for the cache)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return {"packed": module.weight.data, "absmax": module.weight.quant_state.absmax,
                "cpu_packed": torch.tensor([is_cpu_packed(module)], dtype=torch.uint8)}
    scales = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    return {"rows": module.weight.data, "scales": scales}


def _copy_bias(module: nn.Module, linear: nn.Linear, dtype: torch.dtype) -> None:
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)


QUANTIZERS = {"nf4": (quantize_nf4, nf4_linear), "int8": (quantize_int8, int8_linear)}


def quantize_model(model: nn.Module, dtype: str, device: torch.device | str,
                   linear_paths: list[str], cache_file: Path | None = None) -> nn.Module:
    """Quantize the linears at ``linear_paths`` in place and move ``model`` to ``device``."""
    device = torch.device(device)
    compute_dtype = compute_dtype_for(dtype, device)
    cached = None
    if dtype in QUANTIZERS:
        cached = read_quantized(cache_file, dtype, linear_paths, device.type)
        for path in linear_paths:  # one layer at a time: full-precision weights never all
            _swap_linear(model, path, dtype, compute_dtype, device, cached)  # sit on the device
    model.to(device=device, dtype=compute_dtype)  # integer weights keep their dtype
    model.eval().requires_grad_(False)
    pack_float32_linears(model, ["lm_head", *linear_paths])  # the float32 ones, on the CPU
    warm_up(model, compute_dtype)
    if dtype in QUANTIZERS and cached is None and cache_file is not None:
        write_quantized(cache_file, dtype,
                        {p: quantized_tensors(model.get_submodule(p)) for p in linear_paths})
    return model


def quantize_linear(model: nn.Module, path: str, dtype: str, device: torch.device | str) -> None:
    """Quantize one linear in place (``nf4`` / ``int8``; float formats are left alone), from the
    weight it holds, on ``device``: how a model is built layer by layer without a full-precision
    copy (``loader.random_base_model``)."""
    device = torch.device(device)
    if dtype in QUANTIZERS:
        _swap_linear(model, path, dtype, compute_dtype_for(dtype, device), device, None)


def _swap_linear(model: nn.Module, path: str, dtype: str, compute_dtype: torch.dtype,
                 device: torch.device, cached: dict[str, dict[str, torch.Tensor]] | None) -> None:
    quantize, build = QUANTIZERS[dtype]
    parent_path, name = path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    linear = getattr(parent, name)
    tensors = quantize(linear.weight.data.to(device)) if cached is None else cached[path]
    tensors = {k: t.to(device) for k, t in tensors.items()}
    setattr(parent, name, build(linear, tensors, compute_dtype, device))


@torch.inference_mode()
def warm_up(model: nn.Module, dtype: torch.dtype) -> None:
    """One tiny forward per quantized linear, so lazy repacking happens now, not mid-serving."""
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            module(torch.zeros(1, module.in_features, dtype=dtype, device=module.weight.device))


def read_quantized(cache_file: Path | None, dtype: str, linear_paths: list[str],
                   device_type: str = "cpu") -> dict[str, dict[str, torch.Tensor]] | None:
    """Cached tensors per module path, or None if absent, stale, unreadable or for another CPU
    (tensors repacked for bitsandbytes' CPU kernel serve only a CPU)."""
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        flat = load_file(str(cache_file))
        header = json.loads(flat.pop("__header__").numpy().tobytes().decode())
    except Exception:  # a corrupt cache is rebuilt, never fatal
        return None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        path, name = key.rsplit(":", 1)
        grouped.setdefault(path, {})[name] = tensor
    packed = any(_flag(q, "cpu_packed") for q in grouped.values())
    if header != _header(dtype) or set(grouped) != set(linear_paths) or (
            packed and (device_type != "cpu" or not bnbf.has_avx512bf16())):
        return None
    return grouped


def _header(dtype: str) -> dict:
    return {"format": CACHE_FORMAT, "dtype": dtype}


def write_quantized(cache_file: Path, dtype: str, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write atomically (temp file + rename); failure to cache only costs time later."""
    flat = {f"{path}:{name}": t.detach().cpu().contiguous()
            for path, parts in tensors.items() for name, t in parts.items()}
    header = json.dumps(_header(dtype)).encode()
    flat["__header__"] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    temp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{cache_file.name}-", dir=cache_file.parent)
        os.close(handle)
        save_file(flat, temp)
        os.replace(temp, cache_file)
    except OSError:
        pass
    finally:
        if temp is not None and os.path.exists(temp):
            os.unlink(temp)


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, bnb.nn.Linear4bit):
        state = module.weight.quant_state
        return [t for t in state.as_dict(packed=False).values() if isinstance(t, torch.Tensor)]
    if isinstance(module, bnb.nn.Linear8bitLt):
        scales = module.state.SCB if module.state.SCB is not None else module.weight.SCB
        return [scales] if scales is not None else []
    return []


def model_nbytes(model: nn.Module) -> int:
    """Resident bytes: parameters and buffers (shared ones once) plus quantization state."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors.extend(_quant_state_tensors(module))
    for tensor in tensors:
        if tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total + sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))
