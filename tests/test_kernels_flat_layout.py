"""A known file's adapter reaches the pool as its flat buffer (``FlatAdapter``) and is laid out in
one gather, without the file's 840 views: the result equals the per-tensor layout of the fully
validated load, bit for bit, with the same identity and slot-table rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prolora_serve.adapters.format import AdapterFormatError, load_adapter
from prolora_serve.adapters.known_headers import KnownHeaders
from prolora_serve.adapters.weights import FlatAdapter
from prolora_serve.kernels import AdapterWeightPool
from prolora_serve.kernels.pool import resident_identity
from prolora_serve.kernels.slot_tables import adapter_rows, table_entry
from test_adapters_known_headers import CONFIGS, SHAPES, adapter, write


def known_file(tmp_path: Path, kind: str, dtype: torch.dtype) -> tuple[FlatAdapter, Path]:
    """The second file of a header, as the registry's fast path reads it."""
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "first", adapter(kind, 0, dtype)))
    path = write(tmp_path, "second", adapter(kind, 1, dtype))
    fast = known.load(path)
    assert isinstance(fast, FlatAdapter) and known.fast_loads == 1
    return fast, path


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("file_dtype,pool_dtype", [(torch.float16, torch.float16),
                                                   (torch.float16, torch.float32),
                                                   (torch.float32, torch.float16),
                                                   (torch.bfloat16, torch.float32)])
def test_the_gathered_layout_equals_the_per_tensor_layout(tmp_path: Path, kind: str,
                                                          file_dtype: torch.dtype,
                                                          pool_dtype: torch.dtype) -> None:
    fast, path = known_file(tmp_path, kind, file_dtype)
    pool = AdapterWeightPool("cpu", pool_dtype)
    gathered = pool.layout(fast)
    assert "modules" not in vars(fast)  # the file's views were never made
    per_tensor = pool.layout(load_adapter(path, SHAPES))  # the full load: a plain CompactAdapter
    assert torch.equal(gathered.flat, per_tensor.flat)
    assert list(gathered.modules) == list(per_tensor.modules)
    for path_, weights in gathered.modules.items():
        for mine, theirs in zip(weights.tensors(), per_tensor.modules[path_].tensors()):
            assert mine.shape == theirs.shape and mine.stride() == theirs.stride()
            assert mine.numel() == 0 or (mine.data_ptr() - gathered.flat.data_ptr()
                                         == theirs.data_ptr() - per_tensor.flat.data_ptr())
            assert torch.equal(mine, theirs)
    assert resident_identity(gathered) == resident_identity(per_tensor)
    rows = adapter_rows(gathered)  # from the layout's cached template
    assert torch.equal(rows.entries,
                       torch.tensor([table_entry(w) for w in gathered.modules.values()]))


def test_a_flat_adapter_too_large_for_the_pool_dtype_names_its_tensor(tmp_path: Path) -> None:
    known = KnownHeaders(SHAPES)
    known.load(write(tmp_path, "first", adapter("prolora", 0, torch.float32)))
    large = adapter("prolora", 1, torch.float32)
    large.modules["model.layers.1.self_attn.q_proj"].Bu[2, 0] = 1e6
    fast = known.load(write(tmp_path, "large", large))
    assert isinstance(fast, FlatAdapter)
    with pytest.raises(AdapterFormatError, match=r"layers\.1\.self_attn\.q_proj\.prolora_Bu.*1e\+06"):
        AdapterWeightPool("cpu", torch.float16).check_representable(fast)
    AdapterWeightPool("cpu", torch.float32).check_representable(fast)  # fits fp32
    fits = known.load(write(tmp_path, "fits", adapter("prolora", 2, torch.float32)))
    AdapterWeightPool("cpu", torch.float16).check_representable(fits)


def test_a_flat_adapter_is_a_compact_adapter_to_everyone_else(tmp_path: Path) -> None:
    """Its module views, made on first use, are the fully validated load's tensors."""
    fast, path = known_file(tmp_path, "u = 0", torch.float16)
    full = load_adapter(path, SHAPES)
    assert fast.num_params == full.num_params and fast.nbytes == full.nbytes
    assert list(fast.modules) == list(full.modules)
    for path_, weights in full.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(fast.modules[path_].tensors(), weights.tensors()))
    with pytest.raises(ValueError, match="one contiguous 1-D tensor"):
        FlatAdapter(fast.layout, fast.flat[:-1])
