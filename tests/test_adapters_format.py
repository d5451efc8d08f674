"""Adapter files: round trips of both forms, PEFT LoRA loading, and every validation error."""

from __future__ import annotations

import json
import pickle
import re
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prolora_serve.adapters.config import AdapterConfigError, ProLoRAConfig
from prolora_serve.adapters.dense import delta_weight
from prolora_serve.adapters.factory import random_adapter
from prolora_serve.adapters.format import (CONFIG_NAME, DIMS_METADATA_KEY, WEIGHTS_NAME,
                                           AdapterFormatError, adapter_to_bytes, load_adapter,
                                           load_adapter_bytes, save_adapter)
from prolora_serve.adapters.weights import CompactAdapter

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


def base_shapes(h: int = 24, o: int = 36, layers: int = 2) -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(layers):
        shapes[f"model.layers.{layer}.self_attn.q_proj"] = (h, o)
        shapes[f"model.layers.{layer}.self_attn.v_proj"] = (h, o // 2 + 1)
        shapes[f"model.layers.{layer}.mlp.down_proj"] = (o, h)
    return shapes


def make_config(**overrides) -> ProLoRAConfig:
    fields = dict(r=8, unshared_r=2, reduce_lora_A_x=4, reduce_lora_B_x=5, lora_alpha=16,
                  target_modules=("q_proj", "v_proj", "down_proj"))
    fields.update(overrides)
    return ProLoRAConfig(**fields)


def assert_same_adapter(loaded: CompactAdapter, original: CompactAdapter) -> None:
    assert loaded.config == original.config
    assert set(loaded.modules) == set(original.modules)
    for path, weights in original.modules.items():
        got = loaded.modules[path]
        assert got.spec == weights.spec
        for a, b in zip(got.tensors(), weights.tensors()):
            assert a.dtype == b.dtype and torch.equal(a, b)


def saved_tensors(adapter: CompactAdapter) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(adapter_to_bytes(adapter))


def weights_file(path: Path) -> Path:
    return path / WEIGHTS_NAME if path.is_dir() else path


def rewrite_recorded_dims(path: Path, dims: dict | str | None) -> None:
    """Replace a saved adapter's module_dims metadata (a dict, or raw text); None drops it."""
    file = weights_file(path)
    with safetensors.safe_open(str(file), framework="pt") as handle:
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != DIMS_METADATA_KEY}
    if dims is not None:
        metadata[DIMS_METADATA_KEY] = dims if isinstance(dims, str) else json.dumps(dims)
    safetensors.torch.save_file(safetensors.torch.load_file(str(file)), str(file), metadata)


def strip_recorded_dims(path: Path) -> None:
    """Make a saved adapter look as an older version (or another tool) wrote it."""
    rewrite_recorded_dims(path, None)


def recorded_dims(path: Path) -> dict[str, list[int]]:
    with safetensors.safe_open(str(weights_file(path)), framework="pt") as handle:
        return json.loads(handle.metadata()[DIMS_METADATA_KEY])


def write_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config))
    safetensors.torch.save_file(tensors, str(path / WEIGHTS_NAME))
    return path


@st.composite
def layer_configs(draw):
    r = draw(st.integers(1, 8))
    return dict(r=r, unshared_r=draw(st.integers(0, r)), reduce_lora_A_x=draw(st.integers(1, 6)),
                reduce_lora_B_x=draw(st.integers(1, 6)),
                lora_alpha=draw(st.sampled_from([1, 8, 16.5])))


@settings(max_examples=40, deadline=None)
@given(fields=layer_configs(), h=st.integers(1, 40), o=st.integers(1, 40),
       single_file=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
@example(fields=dict(r=4, unshared_r=0, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=8),
         h=10, o=11, single_file=False, dtype=torch.float32)  # u = 0, h and o not multiples
@example(fields=dict(r=4, unshared_r=4, reduce_lora_A_x=3, reduce_lora_B_x=5, lora_alpha=8),
         h=10, o=11, single_file=True, dtype=torch.bfloat16)  # u = r: plain LoRA structure
@example(fields=dict(r=5, unshared_r=2, reduce_lora_A_x=1, reduce_lora_B_x=1, lora_alpha=8),
         h=7, o=3, single_file=True, dtype=torch.float16)  # m = n = 1
def test_round_trip_both_forms(fields, h, o, single_file, dtype):
    config = make_config(**fields)
    shapes = base_shapes(h, o, layers=1)
    adapter = random_adapter(config, shapes, seed=h * 41 + o, dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("a.safetensors" if single_file else "a")
        save_adapter(adapter, path, single_file=single_file)
        assert_same_adapter(load_adapter(path, shapes), adapter)
        assert_same_adapter(load_adapter(path), adapter)  # the file records h and o
        strip_recorded_dims(path)
        assert_same_adapter(load_adapter(path, shapes), adapter)
        # Without the record the tensors fix h when u > 0 or m = 1 (and o when u > 0 or n = 1).
        specs = [w.spec for w in adapter.modules.values()]
        if all(s.unshared_r > 0 or (s.reduce_a == 1 and s.reduce_b == 1) for s in specs):
            assert_same_adapter(load_adapter(path), adapter)
        else:
            with pytest.raises(AdapterFormatError, match="dimensions unknown"):
                load_adapter(path)


@pytest.mark.parametrize("unshared_r, omitted", [(0, ("prolora_Au", "prolora_Bu")),
                                                 (8, ("prolora_A0", "prolora_B0")),
                                                 (3, ())])
def test_zero_size_tensors_are_omitted(unshared_r, omitted):
    adapter = random_adapter(make_config(unshared_r=unshared_r), base_shapes())
    names = {key.rsplit(".", 1)[-1] for key in saved_tensors(adapter)}
    assert names == {"prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu"} - set(omitted)
    assert all(key.startswith(PREFIX) for key in saved_tensors(adapter))


def test_bytes_upload_both_forms():
    shapes = base_shapes()
    adapter = random_adapter(make_config(), shapes, seed=3)
    assert_same_adapter(load_adapter_bytes(None, adapter_to_bytes(adapter), shapes), adapter)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(adapter, tmp)
        config_json = (Path(tmp) / CONFIG_NAME).read_bytes()
        weights = (Path(tmp) / WEIGHTS_NAME).read_bytes()
    assert_same_adapter(load_adapter_bytes(config_json, weights, shapes), adapter)


def test_rank_and_alpha_patterns_round_trip(tmp_path):
    config = make_config(rank_pattern={"down_proj": 4, "model.layers.1.self_attn.q_proj": 6},
                         alpha_pattern={"v_proj": 3.0})
    shapes = base_shapes()
    adapter = random_adapter(config, shapes)
    assert adapter.modules["model.layers.0.mlp.down_proj"].spec.r == 4
    assert adapter.modules["model.layers.1.self_attn.q_proj"].spec.r == 6
    assert adapter.modules["model.layers.0.self_attn.q_proj"].spec.r == 8
    assert adapter.modules["model.layers.0.self_attn.v_proj"].spec.scale == 3.0 / 8
    save_adapter(adapter, tmp_path / "a")
    assert_same_adapter(load_adapter(tmp_path / "a", shapes), adapter)


def test_peft_lora_file_loads_as_prolora_with_u_equal_r(tmp_path):
    shapes = base_shapes()
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for path, (h, o) in shapes.items():
        if path.endswith("q_proj"):
            tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(4, h, generator=generator)
            tensors[f"{PREFIX}{path}.lora_B.weight"] = torch.randn(o, 4, generator=generator)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "task_type": "CAUSAL_LM", "lora_dropout": 0.05, "bias": "none"}
    adapter = load_adapter(write_dir(tmp_path / "lora", config, tensors), shapes)
    assert adapter.config.is_plain_lora and len(adapter.modules) == 2
    weights = adapter.modules[Q0]
    assert (weights.spec.unshared_r, weights.spec.shared_r, weights.spec.scale) == (4, 0, 2.0)
    assert torch.equal(weights.Au, tensors[f"{PREFIX}{Q0}.lora_A.weight"])
    assert torch.equal(weights.Bu, tensors[f"{PREFIX}{Q0}.lora_B.weight"])
    expected = 2.0 * tensors[f"{PREFIX}{Q0}.lora_B.weight"] @ tensors[f"{PREFIX}{Q0}.lora_A.weight"]
    torch.testing.assert_close(delta_weight(weights), expected)
    save_adapter(adapter, tmp_path / "again")  # plain LoRA stays a PEFT LoRA file
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    assert_same_adapter(load_adapter(tmp_path / "again", shapes), adapter)


def test_peft_regex_targets_and_layer_selection_resolve_to_exact_paths(tmp_path):
    shapes = base_shapes()
    adapter = random_adapter(make_config(r=2, unshared_r=2, peft_type="LORA",
                                         target_modules=("model.layers.1.self_attn.q_proj",)), shapes)
    tensors = saved_tensors(adapter)
    regex = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": r".*\.q_proj"}
    loaded = load_adapter(write_dir(tmp_path / "regex", regex, tensors), shapes)
    assert loaded.config.target_modules == ("model.layers.1.self_attn.q_proj",)
    layered = {**regex, "target_modules": ["q_proj"], "layers_to_transform": [1]}
    loaded = load_adapter(write_dir(tmp_path / "layers", layered, tensors), shapes)
    assert set(loaded.modules) == {"model.layers.1.self_attn.q_proj"}
    wrong = {**regex, "target_modules": r".*\.v_proj"}
    with pytest.raises(AdapterConfigError, match=re.escape("model.layers.1.self_attn.q_proj")):
        load_adapter(write_dir(tmp_path / "wrong", wrong, tensors), shapes)


def test_peft_regex_rank_pattern_resolves_per_module(tmp_path):
    shapes = base_shapes()
    config = make_config(peft_type="LORA", r=4, unshared_r=4, rank_pattern={Q0: 2})
    tensors = saved_tensors(random_adapter(config, shapes))
    raw = {"peft_type": "LORA", "r": 4, "lora_alpha": 16,
           "target_modules": ["q_proj", "v_proj", "down_proj"],
           "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2}}
    loaded = load_adapter(write_dir(tmp_path / "a", raw, tensors), shapes)
    assert loaded.config.rank_pattern == {Q0: 2}
    assert loaded.modules[Q0].spec.r == 2
    assert loaded.modules["model.layers.1.self_attn.q_proj"].spec.r == 4


# ---- recorded module dims (metadata 'module_dims') -------------------------------------------

@pytest.mark.parametrize("single_file", [False, True])
def test_saved_files_record_every_module_dims(tmp_path, single_file):
    shapes = base_shapes(h=23, o=37)
    adapter = random_adapter(make_config(unshared_r=0), shapes)
    path = tmp_path / ("a.safetensors" if single_file else "a")
    save_adapter(adapter, path, single_file=single_file)
    assert recorded_dims(path) == {p: [h, o] for p, (h, o) in shapes.items()}
    with safetensors.safe_open(str(weights_file(path)), framework="pt") as handle:
        assert " " not in handle.metadata()[DIMS_METADATA_KEY]  # compact JSON
    loaded = load_adapter(path)  # no base shapes: the record fixes h and o despite u = 0
    assert loaded.linear_shapes() == shapes
    assert load_adapter_bytes(None, adapter_to_bytes(adapter)).linear_shapes() == shapes


def test_recorded_dims_that_disagree_with_the_tensors_are_refused(tmp_path):
    shapes = base_shapes()  # q_proj (24, 36), m = 4, n = 5
    for unshared_r, dims, tensor in ((2, (23, 36), "prolora_Au"),  # ceil(23/4) = 6 fits A0
                                     (2, (24, 39), "prolora_Bu"),  # ceil(39/5) = 8 fits B0
                                     (0, (20, 36), "prolora_A0"),  # ceil(20/4) = 5, A0 has 6
                                     (0, (24, 41), "prolora_B0")):  # ceil(41/5) = 9, B0 has 8
        path = tmp_path / f"u{unshared_r}-{dims[0]}-{dims[1]}"
        save_adapter(random_adapter(make_config(unshared_r=unshared_r), shapes), path)
        rewrite_recorded_dims(path, {**recorded_dims(path), Q0: list(dims)})
        with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, tensor)) + ".*"
                           + re.escape(f"in={dims[0]}, out={dims[1]}") + ".*module_dims"):
            load_adapter(path)


@pytest.mark.parametrize("dims, message", [
    ("{not json", "module_dims.*invalid JSON"),
    ("[]", "module_dims.*must be a non-empty JSON object"),
    ({Q0: [24]}, re.escape(repr(Q0)) + ".*integers >= 1"),
    ({Q0: [24, 0]}, re.escape(repr(Q0)) + ".*integers >= 1"),
    ({Q0: [True, 36]}, re.escape(repr(Q0)) + ".*integers >= 1"),
    ({Q0: [24.0, 36]}, re.escape(repr(Q0)) + ".*integers >= 1"),
])
def test_malformed_recorded_dims_are_refused(tmp_path, dims, message):
    path = tmp_path / "a.safetensors"
    save_adapter(random_adapter(make_config(), base_shapes()), path, single_file=True)
    if isinstance(dims, dict):
        dims = {**recorded_dims(path), **dims}
    rewrite_recorded_dims(path, dims)
    with pytest.raises(AdapterFormatError, match=re.escape(str(path)) + ".*" + message):
        load_adapter(path)


def test_recorded_dims_must_cover_exactly_the_modules_with_tensors(tmp_path):
    save_adapter(random_adapter(make_config(), base_shapes()), tmp_path / "a")
    dims = recorded_dims(tmp_path / "a")
    rewrite_recorded_dims(tmp_path / "a", {p: d for p, d in dims.items() if p != Q0})
    with pytest.raises(AdapterFormatError, match="no entry for module " + re.escape(repr(Q0))):
        load_adapter(tmp_path / "a")
    rewrite_recorded_dims(tmp_path / "a", {**dims, "model.layers.9.mlp.up_proj": [24, 36]})
    with pytest.raises(AdapterFormatError, match=r"'model\.layers\.9\.mlp\.up_proj', which has no"):
        load_adapter(tmp_path / "a")


def test_recorded_dims_that_disagree_with_the_base_model_are_refused(tmp_path):
    """u = 0, and the recorded h = 23 gives the same A0 width as the base's 24 (ceil(./4) = 6):
    only the recorded dims say the file was made for another model. The registry, which
    validates through ``load_adapter`` with the base's shapes, refuses it too."""
    from prolora_serve.adapters.registry import AdapterRegistry, InvalidAdapterError

    shapes = base_shapes()
    other = {**shapes, Q0: (23, 36)}
    path = tmp_path / "other.safetensors"
    save_adapter(random_adapter(make_config(unshared_r=0), other), path, single_file=True)
    expected = (re.escape(f"module {Q0!r}: the file records in_features=23, out_features=36")
                + ".*base model has in_features=24, out_features=36")
    with pytest.raises(AdapterFormatError, match=expected):
        load_adapter(path, shapes)
    registry = AdapterRegistry(tmp_path / "store", shapes)
    with pytest.raises(InvalidAdapterError, match=expected):
        registry.register_path("other", path)
    with pytest.raises(InvalidAdapterError, match=expected):
        registry.register_upload("other", file=path.open("rb"))
    assert len(registry) == 0
    strip_recorded_dims(path)  # without the record nothing tells the two models apart
    assert load_adapter(path, shapes).modules[Q0].spec.in_features == 24


def test_u0_without_recorded_dims_names_the_modules_and_the_open_dims(tmp_path):
    shapes = base_shapes(h=24, o=36)  # m = 4, n = 5: ceil(24/4) = 6, ceil(36/5) = 8
    save_adapter(random_adapter(make_config(unshared_r=0), shapes), tmp_path / "a")
    strip_recorded_dims(tmp_path / "a")
    with pytest.raises(AdapterFormatError) as caught:
        load_adapter(tmp_path / "a")
    message = str(caught.value)
    assert "dimensions unknown for 6 module(s)" in message and "--base-model" in message
    assert (f"{Q0!r} in_features unknown (ceil(h/4) = 6: h is 21..24), "
            "out_features unknown (ceil(o/5) = 8: o is 36..40)") in message
    assert "(and 3 more module(s))" in message
    assert load_adapter(tmp_path / "a", shapes).linear_shapes() == shapes


# ---- validation errors: type, and the message names the tensor / module -------------------

def load_modified(tmp_path: Path, change, config: ProLoRAConfig | None = None, shapes=None):
    """Save a valid adapter's tensors after ``change(tensors)`` and load them back."""
    config = config or make_config()
    tensors = saved_tensors(random_adapter(config, base_shapes()))
    raw = config.to_json_dict()
    change(tensors, raw)
    return load_adapter(write_dir(tmp_path / "bad", raw, tensors), shapes)


def key(module: str, name: str) -> str:
    return f"{PREFIX}{module}.{name}"


@pytest.mark.parametrize("name", ["prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu"])
def test_missing_tensor_is_named(tmp_path, name):
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, name))):
        load_modified(tmp_path, lambda t, c: t.pop(key(Q0, name)), shapes=base_shapes())


@pytest.mark.parametrize("bad_key", [key(Q0, "prolora_a0"), key(Q0, "prolora_A0.weight"),
                                     "model.layers.0.self_attn.q_proj.prolora_A0",
                                     key("lm_head", "weight")])
def test_unrecognized_tensor_is_named(tmp_path, bad_key):
    def add(tensors, config):
        tensors[bad_key] = torch.zeros(2, 2)
    with pytest.raises(AdapterFormatError, match=re.escape(repr(bad_key))):
        load_modified(tmp_path, add)


def test_lora_key_in_prolora_file_names_peft_type(tmp_path):
    bad = key(Q0, "lora_A.weight")
    with pytest.raises(AdapterFormatError, match=re.escape(bad) + ".*peft_type"):
        load_modified(tmp_path, lambda t, c: t.__setitem__(bad, torch.zeros(2, 24)))


@pytest.mark.parametrize("name, shape", [("prolora_A0", (6, 5)), ("prolora_B0", (9, 6)),
                                         ("prolora_Au", (3, 24)), ("prolora_Bu", (36, 1)),
                                         ("prolora_Bu", (35, 2))])
def test_wrong_shape_is_named(tmp_path, name, shape):
    def reshape(tensors, config):
        tensors[key(Q0, name)] = torch.zeros(shape)
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, name)) + ".*expected"):
        load_modified(tmp_path, reshape, shapes=base_shapes())


def test_shape_mismatch_with_base_model_dims(tmp_path):
    save_adapter(random_adapter(make_config(), base_shapes()), tmp_path / "a")
    wider = {**base_shapes(), Q0: (32, 36)}  # ceil(32/4) != ceil(24/4): caught at A0
    with pytest.raises(AdapterFormatError,
                       match="records in_features=24.*base model has in_features=32"):
        load_adapter(tmp_path / "a", wider)
    strip_recorded_dims(tmp_path / "a")  # older files: the tensors are checked one by one
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "prolora_A0")) + ".*in=32"):
        load_adapter(tmp_path / "a", wider)
    narrower = {**base_shapes(), Q0: (21, 36)}  # ceil(21/4) = ceil(24/4): caught at Au
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "prolora_Au")) + ".*in=21"):
        load_adapter(tmp_path / "a", narrower)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_floating_dtype_is_named(tmp_path, dtype):
    def retype(tensors, config):
        tensors[key(Q0, "prolora_B0")] = tensors[key(Q0, "prolora_B0")].to(dtype)
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "prolora_B0")) + ".*dtype"):
        load_modified(tmp_path, retype)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_named(tmp_path, value):
    def poison(tensors, config):
        tensors[key(Q0, "prolora_Au")][1, 3] = value
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "prolora_Au")) + ".*NaN or Inf"):
        load_modified(tmp_path, poison)


def test_one_dimensional_tensor_is_named(tmp_path):
    def flatten(tensors, config):
        tensors[key(Q0, "prolora_Au")] = tensors[key(Q0, "prolora_Au")].flatten()
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "prolora_Au")) + ".*2-D"):
        load_modified(tmp_path, flatten)


@pytest.mark.parametrize("field, value, message", [
    ("unshared_r", 9, "unshared_r"), ("unshared_r", -1, "unshared_r"),
    ("reduce_lora_A_x", 0, "reduce_a"), ("reduce_lora_B_x", 0, "reduce_b"),
    ("r", "8", "r must be"), ("lora_alpha", "x", "lora_alpha"),
    ("peft_type", "IA3", "peft_type"), ("target_modules", [], "target_modules"),
    ("use_dora", True, "DoRA"), ("use_rslora", True, "use_rslora"),
    ("modules_to_save", ["lm_head"], "modules_to_save"), ("rank_pattern", [1], "rank_pattern"),
])
def test_inconsistent_config_values(tmp_path, field, value, message):
    with pytest.raises(AdapterConfigError, match=message):
        load_modified(tmp_path, lambda t, c: c.__setitem__(field, value))


def test_module_not_in_target_modules_is_named(tmp_path):
    def retarget(tensors, config):
        config["target_modules"] = ["v_proj", "down_proj"]
    with pytest.raises(AdapterFormatError, match=re.escape(key(Q0, "")) + ".*not in target_modules"):
        load_modified(tmp_path, retarget)


def test_module_the_base_model_does_not_have(tmp_path):
    shapes = base_shapes()
    del shapes[Q0]
    with pytest.raises(AdapterFormatError, match=re.escape(Q0) + ".*not a linear layer"):
        load_modified(tmp_path, lambda t, c: None, shapes=shapes)


def test_target_module_the_base_model_does_not_have(tmp_path):
    def retarget(tensors, config):
        config["target_modules"] = ["q_proj", "v_proj", "down_proj", "gate_proj"]
    with pytest.raises(AdapterFormatError, match="'gate_proj' matches no module in the base"):
        load_modified(tmp_path, retarget, shapes=base_shapes())
    with pytest.raises(AdapterFormatError, match="'gate_proj' matches no module in the adapter"):
        load_modified(tmp_path, retarget)


def test_targeted_base_module_without_tensors(tmp_path):
    def drop_layer(tensors, config):
        for name in ("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu"):
            del tensors[key(Q0, name)]
    with pytest.raises(AdapterFormatError, match="missing tensors.*" + re.escape(Q0)):
        load_modified(tmp_path, drop_layer, shapes=base_shapes())


def test_empty_adapter(tmp_path):
    with pytest.raises(AdapterFormatError, match="empty"):
        load_modified(tmp_path, lambda t, c: t.clear())


class _Marker:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_files_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"adapter_model{suffix}"
    path.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(AdapterFormatError, match="convert to safetensors"):
        load_adapter(path)
    assert not marker.exists()


def test_directory_with_only_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "peft_dir"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps(make_config().to_json_dict()))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(AdapterFormatError, match="adapter_model.bin.*convert to safetensors"):
        load_adapter(folder)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [0, 5, 8, 40, -1, -100])
def test_truncated_safetensors_is_a_format_error(tmp_path, cut):
    data = adapter_to_bytes(random_adapter(make_config(), base_shapes()))
    truncated = data[:cut] if cut >= 0 else data[:len(data) + cut]
    with pytest.raises(AdapterFormatError, match="safetensors"):
        load_adapter_bytes(None, truncated)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(truncated)
    with pytest.raises(AdapterFormatError, match=re.escape(str(path))):
        load_adapter(path)


def test_corrupt_safetensors_header_is_a_format_error():
    data = bytearray(adapter_to_bytes(random_adapter(make_config(), base_shapes())))
    data[8:20] = b"\xff" * 12
    with pytest.raises(AdapterFormatError, match="invalid JSON|safetensors"):
        load_adapter_bytes(None, bytes(data))
    with pytest.raises(AdapterFormatError, match="safetensors"):
        load_adapter_bytes(None, (2**40).to_bytes(8, "little") + b"{}")


def test_bad_config_sources_are_named(tmp_path):
    adapter = random_adapter(make_config(), base_shapes())
    plain = safetensors.torch.save(saved_tensors(adapter))
    with pytest.raises(AdapterFormatError, match="'adapter_config'"):
        load_adapter_bytes(None, plain)
    with pytest.raises(AdapterFormatError, match="adapter_config.json.*invalid JSON"):
        load_adapter_bytes(b"{not json", plain)
    save_adapter(adapter, tmp_path / "a")
    (tmp_path / "a" / CONFIG_NAME).unlink()
    with pytest.raises(AdapterFormatError, match="missing adapter_config.json"):
        load_adapter(tmp_path / "a")
    with pytest.raises(AdapterFormatError, match="no such"):
        load_adapter(tmp_path / "absent")


def test_failed_save_keeps_the_existing_adapter(tmp_path):
    shapes = base_shapes()
    good = random_adapter(make_config(), shapes)
    save_adapter(good, tmp_path / "a")
    mismatched = random_adapter(make_config(unshared_r=3), shapes)
    bad = CompactAdapter(good.config, mismatched.modules)  # specs do not follow from the config
    with pytest.raises(AdapterConfigError, match="does not follow from the adapter config"):
        save_adapter(bad, tmp_path / "a")
    assert_same_adapter(load_adapter(tmp_path / "a", shapes), good)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_random_adapter_is_reproducible_nonzero_and_targeted():
    shapes = base_shapes()
    config = make_config(target_modules=("v_proj",))
    first = random_adapter(config, shapes, seed=7, dtype=torch.bfloat16)
    assert set(first.modules) == {p for p in shapes if p.endswith("v_proj")}
    assert_same_adapter(random_adapter(config, shapes, seed=7, dtype=torch.bfloat16), first)
    other = random_adapter(config, shapes, seed=8, dtype=torch.bfloat16)
    for path, weights in first.modules.items():
        assert weights.A0.dtype == torch.bfloat16
        assert weights.B0.abs().sum() > 0 and weights.Bu.abs().sum() > 0
        assert not torch.equal(weights.A0, other.modules[path].A0)
    with pytest.raises(AdapterConfigError, match="match no linear layer"):
        random_adapter(make_config(target_modules=("o_proj",)), shapes)
