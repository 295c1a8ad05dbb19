"""The embedded default's base model: the `tiny` LLaVA preset with seeded-random weights and its in-memory
processor, so training and serving run with no files (`--model tiny`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from valora_jax.config import preset
from valora_jax.models.llava import LlavaForConditionalGeneration
from valora_jax.models.tiny_processor import tiny_processor

TINY = "tiny"
BASE_SEED = 0  # fixed, so every run adapts (and serves) the same base model


def tiny_base(dtype=jnp.float32):
    """(model, processor) of the `tiny` preset."""
    cfg = preset(TINY)
    model = LlavaForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(BASE_SEED))
    return model, tiny_processor(cfg.vision.image_size, cfg.vision.patch_size)
