"""In-memory compact adapter weights: A0/B0/Au/Bu per adapted module, never the dense A/B."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .config import LayerSpec, ProLoRAConfig

TENSOR_NAMES = ("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu")
# Option names (--adapter-dtype, --save-dtype, --pool-dtype) -> the dtype adapter weights take.
ADAPTER_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CompactLinearWeights:
    """The compact tensors of one adapted linear layer (zero-size tensors where u = 0 or R = 0)."""

    spec: LayerSpec
    A0: torch.Tensor  # (R, cA)
    B0: torch.Tensor  # (cB, R)
    Au: torch.Tensor  # (u, h)
    Bu: torch.Tensor  # (o, u)

    def __post_init__(self) -> None:
        shapes = self.spec.tensor_shapes()
        for name, tensor in zip(TENSOR_NAMES, self.tensors()):
            expected = shapes[name]
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")

    @classmethod
    def of_known_shapes(cls, spec: LayerSpec, A0: torch.Tensor, B0: torch.Tensor,
                        Au: torch.Tensor, Bu: torch.Tensor) -> "CompactLinearWeights":
        """Without the shape check: for tensors whose shapes were checked once for the layout
        they are views of (a loader makes 210 of these per adapter; the check is most of it)."""
        weights = object.__new__(cls)
        weights.spec, weights.A0, weights.B0, weights.Au, weights.Bu = spec, A0, B0, Au, Bu
        return weights

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.A0, self.B0, self.Au, self.Bu)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "CompactLinearWeights":
        moved = [t.to(device=device, dtype=dtype) for t in self.tensors()]
        return CompactLinearWeights(self.spec, *moved)

    @classmethod
    def zeros(cls, spec: LayerSpec, dtype: torch.dtype = torch.float32) -> "CompactLinearWeights":
        shapes = spec.tensor_shapes()
        return cls(spec, *(torch.zeros(shapes[n], dtype=dtype) for n in TENSOR_NAMES))

    @classmethod
    def random(cls, spec: LayerSpec, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, std: float = 1.0) -> "CompactLinearWeights":
        """Random non-zero weights (B included), for tests and benchmarks."""
        shapes = spec.tensor_shapes()
        return cls(spec, *(torch.randn(shapes[n], generator=generator, dtype=dtype) * std
                           for n in TENSOR_NAMES))


# Where a view lies in its flat tensor: shape, strides and offset in elements.
ViewPlace = tuple[tuple[int, int], tuple[int, int], int]


def views_of(flat: torch.Tensor, places: Iterable[ViewPlace]) -> list[torch.Tensor]:
    """Views of ``flat`` (1-D, contiguous) at these places: one ``as_strided`` each (a split
    then a view makes two tensor objects, and an adapter has 840 tensors)."""
    base = flat.storage_offset()  # as_strided counts from the storage
    return [flat.as_strided(shape, strides, base + offset) for shape, strides, offset in places]


@dataclass(eq=False)  # compared by identity (tensors have no truth value); weakly referable
class CompactAdapter:
    """A whole adapter: its config and the compact weights of every adapted module.

    ``modules`` is keyed by the Hugging Face module path, e.g. ``model.layers.0.self_attn.q_proj``.
    """

    config: ProLoRAConfig
    modules: dict[str, CompactLinearWeights] = field(default_factory=dict)

    @classmethod
    def of_views(cls, config: ProLoRAConfig, specs: Iterable[tuple[str, LayerSpec]],
                 views: Sequence[torch.Tensor]) -> "CompactAdapter":
        """From each module's path and spec, in order, and four views per module (A0, B0, Au,
        Bu) whose shapes the layout they come from fixed (``of_known_shapes``)."""
        return cls(config, {
            path: CompactLinearWeights.of_known_shapes(spec, *views[4 * index:4 * index + 4])
            for index, (path, spec) in enumerate(specs)})

    @property
    def num_params(self) -> int:
        return sum(w.num_params for w in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.modules.values())

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> (in_features, out_features) of every adapted module."""
        return {path: (w.spec.in_features, w.spec.out_features)
                for path, w in sorted(self.modules.items())}

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "CompactAdapter":
        return CompactAdapter(self.config, {k: w.to(device, dtype) for k, w in self.modules.items()})

    @classmethod
    def random(cls, config: ProLoRAConfig, linear_shapes: dict[str, tuple[int, int]],
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               std: float = 1.0) -> "CompactAdapter":
        """Random non-zero weights on every targeted module of ``linear_shapes`` (path -> (in, out)),
        for tests and benchmarks."""
        modules = {path: CompactLinearWeights.random(config.layer_spec(path, h, o), generator,
                                                     dtype, std)
                   for path, (h, o) in linear_shapes.items() if config.targets(path)}
        return cls(config, modules)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: caches are keyed by it
class FlatLayout:
    """Where every tensor of an adapter lies in one flat tensor: the config, each module's path
    and spec in the adapter's order, and four places per module (A0, B0, Au, Bu; an omitted
    zero-size tensor anywhere). Every one of the ``num_elements`` belongs to one tensor."""

    config: ProLoRAConfig
    modules: tuple[tuple[str, LayerSpec], ...]
    places: tuple[ViewPlace, ...]
    num_elements: int


class FlatAdapter(CompactAdapter):
    """A ``CompactAdapter`` whose tensors all lie in one flat tensor, at ``layout``'s places.

    The module views (840 for all seven projections of a 30-layer model, a few microseconds
    each) are made on first use of ``modules``, so a reader that only re-lays the data out (the
    pool, from a file's buffer) never makes them; ``views`` passes them where they exist."""

    def __init__(self, layout: FlatLayout, flat: torch.Tensor,
                 views: Sequence[torch.Tensor] | None = None) -> None:
        if flat.dim() != 1 or not flat.is_contiguous() or flat.numel() != layout.num_elements:
            raise ValueError(f"a flat adapter needs one contiguous 1-D tensor of "
                             f"{layout.num_elements} elements, got shape {tuple(flat.shape)}")
        self.config = layout.config
        self.layout = layout
        self.flat = flat
        if views is not None:
            self.modules = self._of(views)

    @cached_property
    def modules(self) -> dict[str, CompactLinearWeights]:  # type: ignore[override]
        return self._of(views_of(self.flat, self.layout.places))

    def _of(self, views: Sequence[torch.Tensor]) -> dict[str, CompactLinearWeights]:
        return CompactAdapter.of_views(self.config, self.layout.modules, views).modules

    @property
    def num_params(self) -> int:
        return self.layout.num_elements

    @property
    def nbytes(self) -> int:
        return self.layout.num_elements * self.flat.element_size()
