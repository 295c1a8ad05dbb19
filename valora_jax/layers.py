"""Building blocks shared by the model families: linear projections, embeddings, norms, activations.

`Linear` is the one projection type every adaptable weight goes through. It stores its kernel as
(d_in, d_out) so `y = x @ kernel`, and carries an `adapter` slot: when an adapter module is attached
there, its output (a delta computed from the same input) is added to the projection. Norms compute in
float32 and cast back, as transformers does, so bf16 models match their PyTorch counterparts.

Random initialisation only matters for models built from a preset (loading overwrites it), such as the
`tiny` base the training demo adapts; it is scale-preserving rather than transformers' fixed std 0.02,
which starves narrow models. Projections are LeCun-normal (variance 1/d_in, flax's default), so every
layer passes a unit-scale signal on (with 0.02, no logit of the 128-wide `tiny` head can exceed about
128 * 0.02 = 2.6, and attention stays near uniform). CLIP's class and position embeddings are
unit-normal, the scale of the patch features they are added to, so a vision token knows where its
patch is (at 0.02 they are a 2% perturbation, and the demo's location task scores 0.4 instead of 0.8).
Token embeddings keep transformers' std 0.02: nothing of another scale is added to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

TOKEN_EMBEDDING_STD = 0.02


def lecun_normal(rngs: nnx.Rngs, shape: Sequence[int], dtype) -> jax.Array:
    """A (d_in, d_out) projection with variance 1/d_in."""
    return nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.float32).astype(dtype)


def normal(rngs: nnx.Rngs, shape: Sequence[int], dtype, std: float = 1.0) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ adapter(x)); kernel (d_in, d_out) with logical axes for sharding.

    Two adapter hooks: `adapter`, one attached adapter for every row (training, `attach`), and `slots`,
    the adapter pool's slot stack (`valora_jax.adapters.pool`): given a per-row selection
    (`adapters=AdapterBatch`) the projection adds each row's own delta.
    """

    def __init__(self, d_in: int, d_out: int, *, axes: tuple[str | None, str | None], use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param(lecun_normal(rngs, (d_in, d_out), dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype), logical_axes=(axes[1],)) if use_bias else None
        self.adapter = nnx.data(None)
        self.slots = nnx.data(None)

    @property
    def in_features(self) -> int:
        return self.kernel.shape[0]

    @property
    def out_features(self) -> int:
        return self.kernel.shape[1]

    def __call__(self, x: jax.Array, adapters=None) -> jax.Array:
        if adapters is not None and self.slots is not None:
            y = self.slots.project(x, self.kernel[...], adapters)
        else:
            y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        if self.adapter is not None:
            y = y + self.adapter(x).astype(y.dtype)
        return y


def serial_input(block: nnx.Module, x: jax.Array, adapters=None) -> jax.Array:
    """What an attention block's q/k/v read: x through Serial LoRA's transform when the block has one
    (the attached `qkv_input_adapter`, or the pool's `qkv_input_slots` for a per-row selection)."""
    if adapters is not None and block.qkv_input_slots is not None:
        x = block.qkv_input_slots.transform(x, adapters)
    if block.qkv_input_adapter is not None:
        x = block.qkv_input_adapter(x)
    return x


def place_image_features(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """`embeds` (b, s, d) with the rows of `features` (n, d) written, in order, over the image-token
    positions (`is_image` (b, s), row-major): how LLaVA and Qwen-VL put vision tokens into the prompt."""
    index = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[0] - 1)
    scattered = features.astype(embeds.dtype)[index].reshape(embeds.shape)
    return jnp.where(is_image[..., None], scattered, embeds)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = nnx.Param(normal(rngs, (num, dim), dtype, TOKEN_EMBEDDING_STD),
                                   logical_axes=("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding table (tied output head)."""
        return x @ self.embedding[...].T


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
