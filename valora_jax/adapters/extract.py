"""Adapter weights on their own: what the serving pool stores and what training counts."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from valora_jax.adapters.attach import adapter_sites
from valora_jax.adapters.variables import AdapterParam, AdapterState


def extract(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """Host path -> {variable name: array} of every attached adapter (`AdapterParam` and `AdapterState`).

    LoRA and Serial LoRA entries also carry `scaling` (a float32 scalar) so a consumer can apply the delta
    without the config: LoRA delta = scaling * x A B; Serial LoRA x' = x + scaling * x A B.
    """
    out = {}
    for path, _, adapter in adapter_sites(model):
        arrays = nnx.to_pure_dict(nnx.state(adapter, nnx.Any(AdapterParam, AdapterState)))
        if hasattr(adapter, "scaling"):
            arrays["scaling"] = np.float32(adapter.scaling)
        out[path] = arrays
    return out


def count_trainable(model: nnx.Module) -> int:
    """Number of trainable adapter parameters (`AdapterParam` entries) attached to the model."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, AdapterParam)))
