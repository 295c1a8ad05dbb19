"""PEFT's on-disk LoRA layout: tensor names, their orientation, and `adapter_config.json`.

PEFT names a tensor `base_model.model.<HF module>.lora_A.weight` (r, d_in) / `.lora_B.weight` (d_out, r),
with HF module names of the transformers 5 live model (LLaVA: `model.language_model.layers.0.self_attn.q_proj`,
`model.vision_tower.encoder.layers.0.mlp.fc1`; Qwen-VL: `model.visual.blocks.0.attn.qkv`). HF -> ours reuses
the model family's checkpoint-name rules (`valora_jax.models.registry`); ours -> HF is the family's
`hf_modules` prefix table, checked against those rules on every name.
"""

from __future__ import annotations

import re
from typing import Any

from flax import nnx

from valora_jax.adapters.config import AdapterConfig, pattern_value
from valora_jax.layers import Linear
from valora_jax.models.registry import Family

PEFT_PREFIX = "base_model.model."
PEFT_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# LoraConfig features this loader does not implement: (field, value PEFT uses when the feature is off).
UNSUPPORTED_FIELDS = (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("fan_in_fan_out", False),
                      ("lora_bias", False), ("target_parameters", None), ("trainable_token_indices", None),
                      ("layer_replication", None), ("use_qalora", False), ("layers_to_transform", None))


def linear_kernels(model: nnx.Module) -> dict[str, Linear]:
    """`<path>.kernel` -> Linear for every projection: the parameter names the loader maps onto."""
    return {".".join(map(str, p)) + ".kernel": m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def module_path_from_hf(hf_module: str, kernels: dict[str, Linear], family: Family) -> str | None:
    """Our Linear path for an HF module name, or None when the model has no such projection."""
    names = family.names
    path, _ = names.param_path(names.canonical_name(hf_module + ".weight"), kernels)
    return None if path is None else path[: -len(".kernel")]


def hf_module_name(path: str, kernels: dict[str, Linear], family: Family) -> str:
    """The HF module name PEFT would use for our Linear at `path` (verified by mapping it back)."""
    for ours, theirs in family.hf_modules:
        if path.startswith(ours):
            name = theirs + path[len(ours):]
            if module_path_from_hf(name, kernels, family) == path:
                return name
    raise ValueError(f"no PEFT / transformers module name for {path!r}")


def peft_tensor_name(hf_module: str, factor: str) -> str:
    return f"{PEFT_PREFIX}{hf_module}.lora_{factor}.weight"


def peft_config_json(config: AdapterConfig, hf_names: dict[str, str], base_model: str | None) -> dict[str, Any]:
    """`adapter_config.json` for PEFT's `LoraConfig`: explicit module list, per-module rank / alpha overrides."""
    rank_pattern = {re.escape(hf): config.rank_for(p) for p, hf in hf_names.items() if config.rank_for(p) != config.rank}
    alpha_pattern = {re.escape(hf): pattern_value(config.alpha_pattern, p, config.alpha) for p, hf in hf_names.items()
                     if pattern_value(config.alpha_pattern, p, config.alpha) != config.alpha}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(hf_names.values()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True,
        "layers_pattern": None,
        **dict(UNSUPPORTED_FIELDS),
    }


def check_supported(peft_config: dict[str, Any]) -> None:
    for field, off in UNSUPPORTED_FIELDS:
        if peft_config.get(field, off) not in (off, [], {}):
            raise ValueError(f"PEFT adapter uses {field}={peft_config[field]!r}, which valora_jax does not support")
