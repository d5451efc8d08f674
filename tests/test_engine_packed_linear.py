"""oneDNN-packed float32 linears: the same products as nn.Linear, swapped in by module path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prolora_serve.kernels.testing import assert_close_for_dtype
from prolora_serve.server.engine.packed_linear import (PackedLinear, pack_float32_linears,
                                                       packing_available)
from prolora_serve.server.engine.quantize import model_nbytes

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("in_features,out_features,bias", [(1, 1, False), (7, 3, True),
                                                           (576, 1000, False), (33, 129, True)])
@pytest.mark.parametrize("leading", [(1,), (5,), (2, 3)])
def test_packed_linear_matches_float64_reference(in_features: int, out_features: int, bias: bool,
                                                 leading: tuple[int, ...]) -> None:
    torch.manual_seed(in_features + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(*leading, in_features)
    expected = x.double() @ linear.weight.double().T
    if bias:
        expected += linear.bias.double()
    with torch.inference_mode():
        out = PackedLinear(linear)(x)
    assert out.shape == (*leading, out_features) and out.dtype == torch.float32
    assert_close_for_dtype(out, expected, torch.float32)


def test_pack_swaps_only_float32_linears() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6).to(torch.bfloat16), nn.ReLU(),
                          nn.Linear(6, 2, bias=False))
    swapped = pack_float32_linears(model, ["0", "1", "2", "3"])
    assert swapped == 2
    assert [type(m).__name__ for m in model] == ["PackedLinear", "Linear", "ReLU", "PackedLinear"]


def test_packing_a_tied_output_layer_counts_its_own_copy() -> None:
    """The embedding keeps its dense matrix for lookups; the packed output layer is a second copy
    and the resident byte count says so."""
    embed = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    before = model_nbytes(model)
    pack_float32_linears(model, ["head"])
    assert model_nbytes(model) == before + 50 * 8 * 4
    with torch.inference_mode():
        hidden = torch.randn(3, 8)
        assert_close_for_dtype(model["head"](hidden), hidden.double() @ embed.weight.double().T,
                               torch.float32)
