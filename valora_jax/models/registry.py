"""The model families `load_pretrained` knows: each maps config.json's `architectures` to its config parser,
its NNX model class, its checkpoint-name rules and its presets.

What generation, adapters and benchmarks use of a model, whatever its family:
- `config.text` (the decoder's `TextConfig`: KV-cache shapes), `config.pad_token_id` / `eos_token_id`;
- `language_model` (the decoder, with `embed_tokens`, `layers`, `norm`) and `lm_head` (None when tied);
- `hidden_states(input_ids, pixel_values, attention_mask, position_ids, cache)` -> (hidden, cache) and
  `logits(hidden)`: the jit-side entry points; `pixel_values` is whatever the family's vision encoder takes;
- optionally `generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)`
  -> (pixel_values, position_ids): host-side preparation of a prompt batch (Qwen-VL: vision metadata and
  M-RoPE positions), which `Generator` calls before every prefill;
- adaptable projections are `valora_jax.layers.Linear`, attention blocks carry a `qkv_input_adapter` hook;
- `POOL_TOWERS`: the top-level modules whose projections take the adapter pool's per-row selection.

A family's checkpoint rules turn a tensor name of any layout in circulation into the model's parameter
path in two steps: `prefixes` (layout prefix -> canonical prefix, first match wins), then `renames`
(canonical name -> our module path where they differ). Torch `Linear` weights (out, in) become our
kernels (in, out); the convolution weights named in `conv_kernels` are flattened per output channel
first (a stride = kernel convolution is a matmul over flattened patches).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class CheckpointNames:
    prefixes: tuple[tuple[str, str], ...]
    renames: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()  # canonical names a checkpoint may hold that the model has no use for
    conv_kernels: tuple[str, ...] = ()  # our paths holding a flattened torch convolution weight

    def canonical_name(self, key: str) -> str:
        for pattern, repl in self.prefixes:
            if re.match(pattern, key):
                return re.sub(pattern, repl, key, count=1)
        return key

    def param_path(self, canonical: str, params: Mapping[str, Any]) -> tuple[str | None, bool]:
        """(our parameter path, transpose?) for a canonical name; path None when it has no counterpart."""
        name = canonical
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        if name.endswith(".weight") and name[: -len(".weight")] + ".kernel" in params:
            return name[: -len(".weight")] + ".kernel", True  # torch Linear (out, in) -> our kernel (in, out)
        return (name, False) if name in params else (None, False)

    def is_ignored(self, canonical: str) -> bool:
        return any(re.search(p, canonical) for p in self.ignored)

    def convert(self, path: str, array: np.ndarray, transpose: bool) -> np.ndarray:
        if path in self.conv_kernels:  # (d_out, c, [t,] p, p) -> (c*[t*]p*p, d_out)
            return array.reshape(array.shape[0], -1).T
        return array.T if transpose else array


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    config_class: type
    config_from_hf: Callable[[dict], Any]
    model_class: type
    names: CheckpointNames
    presets: Mapping[str, Callable[[], Any]]
    load_processor: Callable[[Any], Any]  # model dir -> the processor its files describe
    hf_modules: tuple[tuple[str, str], ...]  # our path prefix -> transformers 5's live module prefix (PEFT names)
    chat_template: str  # the conversation format of a checkpoint whose processor ships none (valora_jax.chat)


def auto_processor(model_dir) -> Any:
    """transformers' `AutoProcessor` from local files."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


@functools.cache
def families() -> tuple[Family, ...]:
    from valora_jax.models.llava_family import LLAVA
    from valora_jax.models.qwen2_vl.family import QWEN2_5_VL, QWEN2_VL

    return LLAVA, QWEN2_VL, QWEN2_5_VL


def supported_architectures() -> list[str]:
    return [arch for family in families() for arch in family.architectures]


def family_for_hf(hf: Mapping[str, Any]) -> Family:
    """The family of an HF config dict: by `architectures`, else (none listed) by `model_type`."""
    archs, model_type = list(hf.get("architectures") or []), hf.get("model_type")
    for family in families():
        if any(a in family.architectures for a in archs) or (not archs and model_type in family.model_types):
            return family
    raise ValueError(f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                     f"supported: {', '.join(supported_architectures())}")


def family_of(cfg: Any) -> Family:
    """The family of a config: by its class, and among families sharing one (Qwen-VL) by its `version`."""
    matches = [family for family in families() if isinstance(cfg, family.config_class)]
    if len(matches) > 1:
        matches = [family for family in matches if family.name == getattr(cfg, "version", None)]
    if not matches:
        raise TypeError(f"no model family for a config of type {type(cfg).__name__}")
    return matches[0]


def build_model(cfg: Any, **kwargs) -> Any:
    """The NNX model of `cfg`'s family (`kwargs`: dtype, rngs)."""
    return family_of(cfg).model_class(cfg, **kwargs)


def all_presets() -> dict[str, Callable[[], Any]]:
    return {name: make for family in families() for name, make in family.presets.items()}
