"""Serial LoRA: one shared low-rank pair per attention block, applied to the block input before q, k, v.

x' = x + scaling * dropout(x) A_s B_s with A_s (d, r), B_s (r, d), and q, k, v computed from x' (the
output projection is not adapted). The paper's form has no scale: `scaling` is alpha / r as for LoRA, so
alpha = r reproduces it exactly. Initialisation is not published: A_s as LoRA's A, B_s zeros, so an attached
block starts as the identity.

Merge: x' W = x (I + s A_s B_s) W, so W_{q,k,v} <- W + s A_s (B_s W) (biases unchanged). Unmerge inverts
(I + s A_s B_s) with the Woodbury identity, B_s W = (I_r + s B_s A_s)^-1 B_s W', which needs only an r x r
solve and restores W to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.adapters.lora import LowRankPair

QKV = ("q_proj", "k_proj", "v_proj", "qkv")  # separate projections, or one fused (Qwen-VL's vision blocks)


def qkv_projections(attention: nnx.Module) -> list[nnx.Module]:
    """The projections an attention block computes q, k, v with."""
    return [getattr(attention, name) for name in QKV if hasattr(attention, name)]


class SerialLoRA(LowRankPair):
    """The input transform of one attention block (attached at `attention.qkv_input_adapter`)."""

    def __init__(self, attention: nnx.Module, *, rank: int, scaling: float, dropout: float, dtype, rngs: nnx.Rngs):
        d = qkv_projections(attention)[0].in_features
        super().__init__(d, d, rank=rank, scaling=scaling, dropout=dropout, axes=("embed", "embed"), dtype=dtype,
                         rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return x
        return x + self.low_rank(x)

    def _factors(self) -> tuple[jax.Array, jax.Array]:
        return self.scaling * self.A[...].astype(jnp.float32), self.B[...].astype(jnp.float32)

    def merge_into(self, attention: nnx.Module) -> None:
        a, b = self._factors()
        for projection in qkv_projections(attention):
            kernel = projection.kernel
            w = kernel[...].astype(jnp.float32)
            kernel.set_value((w + a @ (b @ w)).astype(kernel.dtype))

    def unmerge_from(self, attention: nnx.Module) -> None:
        a, b = self._factors()
        small = jnp.eye(a.shape[1], dtype=jnp.float32) + b @ a
        for projection in qkv_projections(attention):
            kernel = projection.kernel
            w = kernel[...].astype(jnp.float32)
            kernel.set_value((w - a @ jnp.linalg.solve(small, b @ w)).astype(kernel.dtype))
