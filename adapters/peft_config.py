"""adapter_config.json as written by PEFT (or the PRoLoRA authors' PEFT fork) <-> ProLoRAConfig.

PEFT has selection features ``ProLoRAConfig`` does not model (a regex string or
``"all-linear"`` as target_modules, ``layers_to_transform``, ``exclude_modules``, regex keys
in ``rank_pattern``). They are resolved once, at load time, against the module paths the
file actually holds: the loaded config then names those exact paths, so it means the same
thing to us, to the kernels and to PEFT after export. Features that change the math
(DoRA, rsLoRA scaling, biases, extra trained modules) are refused with a clear error.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from .config import PEFT_TYPE_LORA, AdapterConfigError, ProLoRAConfig

# (config key, value that is fine, what the feature is)
_UNSUPPORTED = (
    ("use_dora", False, "DoRA (use_dora) adapters"),
    ("use_rslora", False, "rank-stabilized scaling (use_rslora)"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D-style) weights"),
    ("lora_bias", False, "LoRA biases (lora_bias)"),
    ("bias", "none", "trained biases (bias other than 'none')"),
    ("modules_to_save", None, "extra trained modules (modules_to_save)"),
    ("trainable_token_indices", None, "trainable token embeddings"),
)
_REGEX_CHARS = re.compile(r"[\\^$*+?{}\[\]|()]")


def is_lora_config(raw: Mapping[str, Any]) -> bool:
    return str(raw.get("peft_type", "")).upper() == PEFT_TYPE_LORA


def parse_config(raw: Any, module_paths: Sequence[str]) -> ProLoRAConfig:
    """Validate a config dict and resolve PEFT selection features against ``module_paths``."""
    if not isinstance(raw, Mapping):
        raise AdapterConfigError("adapter config must be a JSON object")
    try:
        return _parse_config(raw, module_paths)
    except re.error as err:
        raise AdapterConfigError(f"invalid regular expression in the adapter config: {err}") from None


def _parse_config(raw: Mapping[str, Any], module_paths: Sequence[str]) -> ProLoRAConfig:
    _refuse_unsupported(raw)
    data = dict(raw)
    if _selects_by_more_than_names(raw):
        _check_selected(raw, module_paths)
        data["target_modules"] = list(module_paths)
    for pattern in ("rank_pattern", "alpha_pattern"):
        data[pattern] = _resolve_pattern(raw.get(pattern), module_paths, pattern)
    try:
        return ProLoRAConfig.from_json_dict(data)
    except AdapterConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise AdapterConfigError(f"invalid adapter config: {err}") from None


def config_to_json(config: ProLoRAConfig) -> dict[str, Any]:
    """The adapter_config.json to write: PEFT's LoRA fields for plain LoRA, else PRoLoRA's."""
    if config.is_plain_lora:
        return peft_lora_config_dict(config)
    return config.to_json_dict()


def peft_lora_config_dict(config: ProLoRAConfig) -> dict[str, Any]:
    """A config PEFT's ``LoraConfig`` loads; scaling alpha / r per module as ours."""
    return {
        "peft_type": PEFT_TYPE_LORA,
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": list(config.target_modules),
        "base_model_name_or_path": config.base_model_name_or_path,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _refuse_unsupported(raw: Mapping[str, Any]) -> None:
    for key, fine, feature in _UNSUPPORTED:
        value = raw.get(key, fine)
        if value != fine and value not in (None, False, [], {}):
            raise AdapterConfigError(f"{feature} not supported (config has {key}={value!r})")


def _selects_by_more_than_names(raw: Mapping[str, Any]) -> bool:
    targets = raw.get("target_modules")
    return (isinstance(targets, str)
            or (isinstance(targets, (list, tuple)) and "all-linear" in targets)
            or raw.get("layers_to_transform") not in (None, [])
            or bool(raw.get("exclude_modules")))


def _check_selected(raw: Mapping[str, Any], module_paths: Sequence[str]) -> None:
    for path in module_paths:
        if not _peft_selects(raw, path):
            raise AdapterConfigError(f"module {path!r} has weights but the config's "
                                     "target_modules / layers_to_transform / exclude_modules "
                                     "do not select it")


def _peft_selects(raw: Mapping[str, Any], path: str) -> bool:
    """PEFT's module selection (tuners_utils.check_target_module_exists), for one path."""
    if _matches_names(raw.get("exclude_modules"), path):
        return False
    targets = raw.get("target_modules")
    if not (isinstance(targets, (list, tuple)) and "all-linear" in targets
            or _matches_names(targets, path)):
        return False
    layers = raw.get("layers_to_transform")
    if layers in (None, []):
        return True
    wanted = {layers} if isinstance(layers, int) else set(layers)
    index = re.search(r"\.(\d+)\.", path)
    return index is not None and int(index.group(1)) in wanted


def _matches_names(names: Any, path: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    if isinstance(names, (list, tuple)):
        return any(path == name or path.endswith("." + name) for name in names)
    return False


def _resolve_pattern(pattern: Any, module_paths: Sequence[str], name: str) -> dict[str, Any]:
    """Regex keys become the exact paths they select (PEFT: first key matching a suffix wins)."""
    if not pattern:
        return {}
    if not isinstance(pattern, Mapping):
        raise AdapterConfigError(f"{name} must be a JSON object")
    if not any(_REGEX_CHARS.search(key) for key in pattern):
        return dict(pattern)
    resolved = {}
    for path in module_paths:
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)
        if key is not None:
            resolved[path] = pattern[key]
    return resolved
