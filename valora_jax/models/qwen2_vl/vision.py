"""The Qwen2-VL / Qwen2.5-VL vision encoder as transformers computes it (`model.visual`).

Flattened patches -> patch embedding (the Conv3d with stride = kernel, as a matmul) -> blocks of
non-causal attention with a 2-D rotary embedding (float32) and an MLP -> PatchMerger (norm, then the
features of each 2x2 block of patches concatenated, through a 2-layer GELU MLP). Attention stays within
each patch's group and segment (`VisionInputs`): its image frame, or in Qwen2.5-VL's window blocks its
window. With the adapter pool's selection (`adapters`), every projection adds the delta of the adapter
of the row each patch's image belongs to (`VisionInputs.rows`).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.layers import LayerNorm, Linear, RMSNorm, activation, serial_input
from valora_jax.models.llama import apply_rope
from valora_jax.models.qwen2_vl.config import QwenVisionConfig
from valora_jax.models.qwen2_vl.inputs import VisionInputs
from valora_jax.sharding import constrain

NORM_EPS = 1e-6


def _norm(cfg: QwenVisionConfig, dim: int, dtype):
    return (RMSNorm if cfg.windowed else LayerNorm)(dim, eps=NORM_EPS, dtype=dtype)


def vision_rotary(cfg: QwenVisionConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 cos/sin (..., patches, head_dim) of positions (..., patches, 2): rows rotate the first half of
    each rotary pair set, columns the second."""
    half = cfg.head_dim // 2  # rotary angles per axis: half of a head's pairs
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    freqs = (positions.astype(jnp.float32)[..., None] * inv_freq).reshape(*positions.shape[:-1], -1)  # (.., h|w)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=(None, "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, patches: jax.Array, adapters=None) -> jax.Array:
        return self.proj(patches.astype(self.proj.kernel.dtype), adapters)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(d, 3 * d, axes=("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(d, d, axes=("heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        # Hooks for adapters that transform the block input before q/k/v (Serial LoRA): `serial_input`.
        self.qkv_input_adapter = nnx.data(None)
        self.qkv_input_slots = nnx.data(None)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, adapters=None) -> jax.Array:
        """x (groups, patches, d), cos / sin (groups, patches, head_dim), mask (groups, patches, patches)."""
        qkv = self.qkv(serial_input(self, x, adapters), adapters)
        q, k, v = einops.rearrange(qkv, "g p (three h d) -> three g p h d", three=3, h=self.num_heads)
        q, k = (apply_rope(t.astype(jnp.float32), cos, sin).astype(x.dtype) for t in (q, k))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        return self.proj(einops.rearrange(out, "g p h d -> g p (h d)"), adapters)


class VisionMlp(nnx.Module):
    """Qwen2-VL: fc2(act(fc1(x)))."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.fc1 = Linear(d, f, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(f, d, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, adapters=None):
        return self.fc2(self.act(self.fc1(x, adapters)), adapters)


class GatedVisionMlp(nnx.Module):
    """Qwen2.5-VL: down_proj(act(gate_proj(x)) * up_proj(x)), with biases."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x, adapters=None):
        return self.down_proj(self.act(self.gate_proj(x, adapters)) * self.up_proj(x, adapters), adapters)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, cfg.hidden_size, dtype)
        self.norm2 = _norm(cfg, cfg.hidden_size, dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = (GatedVisionMlp if cfg.windowed else VisionMlp)(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, adapters=None):
        x = x + self.attn(self.norm1(x), cos, sin, mask, adapters)
        return constrain(x + self.mlp(self.norm2(x), adapters), "batch", "length", "embed")


class Gelu(nnx.Module):
    """The parameter-free middle entry of the merger's `mlp` (torch's nn.Sequential index 1)."""

    def __call__(self, x):
        return activation("gelu")(x)


class PatchMerger(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size * cfg.merge_unit
        self.ln_q = _norm(cfg, cfg.hidden_size, dtype)
        self.mlp = nnx.List([
            Linear(d, d, axes=("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs),
            Gelu(),
            Linear(d, cfg.out_hidden_size, axes=("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs),
        ])
        self.merged_dim = d

    def __call__(self, x, adapters=None):
        """(groups, patches, d) -> (groups, patches // merge_unit, out_hidden_size)."""
        x = self.ln_q(x).reshape(*x.shape[:-2], -1, self.merged_dim)
        first, act, last = self.mlp
        return last(act(first(x, adapters)), adapters)


class VisionTransformer(nnx.Module):
    """`__call__(VisionInputs, adapters)` -> the batch's merged image tokens (groups * patches // merge_unit,
    out_hidden_size) in image order, padding last."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, inputs: VisionInputs, adapters=None) -> jax.Array:
        per_patch = per_token = None
        if adapters is not None:  # each patch (merged token) reads its image's row's adapter
            per_patch = adapters.for_rows(inputs.rows)
            per_token = adapters.for_rows(inputs.rows[:, ::self.cfg.merge_unit])
        x = constrain(self.patch_embed(inputs.pixel_values, per_patch), "batch", "length", "embed")
        cos, sin = vision_rotary(self.cfg, inputs.positions)
        same = lambda s: s[:, :, None] == s[:, None, :]  # noqa: E731
        full, window = same(inputs.segments), same(inputs.window_segments)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if self.cfg.full_attention(i) else window, per_patch)
        merged = jnp.take_along_axis(self.merger(x, per_token), inputs.restore[..., None], axis=1)
        tokens = merged.reshape(-1, merged.shape[-1])
        return tokens if inputs.order is None else tokens[inputs.order]
