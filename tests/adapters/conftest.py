"""Small LLaVA models and inputs for the adapter tests (sub-second forward passes on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from valora_jax.adapters import AdapterParam
from valora_jax.config import LlavaConfig, TextConfig, VisionConfig
from valora_jax.models.llava import LlavaForConditionalGeneration

IMAGE_TOKEN = 63


def small_config(num_key_value_heads: int = 4) -> LlavaConfig:
    """Two vision and two decoder layers; the last vision layer feeds the projector, so every layer matters."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=16, patch_size=8),
        text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=64),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, pad_token_id=0,
    )


def small_model(seed: int = 0, **config) -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(small_config(**config), rngs=nnx.Rngs(seed))


def small_inputs(batch: int = 2, text_len: int = 6, seed: int = 0):
    """(input_ids, pixel_values, attention_mask): one image (4 feature tokens) then text, row 0 left-padded by 2."""
    rng = np.random.default_rng(seed)
    text = rng.integers(1, IMAGE_TOKEN, (batch, text_len))
    pads = [2] + [0] * (batch - 1)
    ids = np.asarray([[0] * p + [IMAGE_TOKEN] * 4 + list(t[: text_len - p]) for p, t in zip(pads, text)], np.int32)
    mask = np.asarray([[0] * p + [1] * (4 + text_len - p) for p in pads], np.int32)
    pixels = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)


def randomize_adapter(model, seed: int, std: float = 0.2) -> None:
    """Non-zero random values for every trainable adapter weight (matrices ~N(0, std), scalars 1 +- std)."""
    rng = np.random.default_rng(seed)
    for _, var in sorted(nnx.to_flat_state(nnx.state(model, AdapterParam)), key=lambda kv: str(kv[0])):
        noise = std * rng.standard_normal(var.shape)
        base = 0.0 if var.ndim else np.asarray(var[...])
        var.set_value(jnp.asarray(base + noise, var.dtype))


def base_params(model) -> dict:
    """Flat copy of the base (non-adapter) parameters."""
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(
        nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))}


@pytest.fixture
def inputs():
    return small_inputs()
