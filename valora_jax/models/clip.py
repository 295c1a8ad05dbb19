"""CLIP vision tower as transformers' `CLIPVisionModel` computes it (the part LLaVA uses).

Patch embedding (a stride-`patch` convolution, done as a reshape + matmul), class token, learned
position embeddings, pre-LayerNorm, then pre-norm encoder layers with quick-GELU MLPs. Returns the
hidden states LLaVA selects features from; the post-LayerNorm is not used by LLaVA and so not applied.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.config import VisionConfig
from valora_jax.layers import LayerNorm, Linear, activation, lecun_normal, normal, serial_input
from valora_jax.sharding import constrain


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        # Hooks for adapters that transform the block input before q/k/v (Serial LoRA): `serial_input`.
        self.qkv_input_adapter = nnx.data(None)
        self.qkv_input_slots = nnx.data(None)

    def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
        split = lambda t: einops.rearrange(t, "b s (h d) -> b s h d", h=self.num_heads)
        qkv_in = serial_input(self, x, adapters)
        out = jax.nn.dot_product_attention(split(self.q_proj(qkv_in, adapters)), split(self.k_proj(qkv_in, adapters)),
                                           split(self.v_proj(qkv_in, adapters)))
        return self.out_proj(einops.rearrange(out, "b s h d -> b s (h d)"), adapters)


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), use_bias=True, dtype=dtype,
                          rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), use_bias=True, dtype=dtype,
                          rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
        return self.fc2(self.act(self.fc1(x, adapters)), adapters)


class VisionEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), adapters)
        return constrain(x + self.mlp(self.layer_norm2(x), adapters), "batch", "length", "embed")


class VisionTower(nnx.Module):
    """CLIP ViT: `__call__(pixel_values NCHW, num_layers)` -> hidden states after each of the first layers."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_dim = cfg.num_channels * cfg.patch_size**2
        self.patch_embedding = nnx.Param(lecun_normal(rngs, (patch_dim, cfg.hidden_size), dtype),
                                         logical_axes=(None, "embed"))
        self.class_embedding = nnx.Param(normal(rngs, (cfg.hidden_size,), dtype), logical_axes=("embed",))
        self.position_embedding = nnx.Param(normal(rngs, (cfg.num_patches + 1, cfg.hidden_size), dtype),
                                            logical_axes=(None, "embed"))
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([VisionEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        if pixel_values.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixel_values must be (batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}) NCHW, "
                f"got {pixel_values.shape}"
            )
        dtype = self.patch_embedding.dtype
        # Conv2d(kernel=stride=patch) == per-patch flatten (c, ph, pw order, as torch's weight) + matmul.
        patches = einops.rearrange(pixel_values.astype(dtype), "b c (h ph) (w pw) -> b (h w) (c ph pw)",
                                   ph=cfg.patch_size, pw=cfg.patch_size)
        x = patches @ self.patch_embedding[...]
        cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        return self.pre_layrnorm(x)

    def __call__(self, pixel_values: jax.Array, num_layers: int | None = None, adapters=None) -> list[jax.Array]:
        """Hidden states [embeddings, after layer 1, ..., after layer `num_layers`] (HF `hidden_states` order);
        `adapters` selects each image's adapter slot."""
        x = constrain(self.embed(pixel_values), "batch", "length", "embed")
        states = [x]
        for layer in self.layers[: num_layers if num_layers is not None else len(self.layers)]:
            x = layer(x, adapters)
            states.append(x)
        return states
