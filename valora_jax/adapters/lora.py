"""LoRA: delta(x) = scaling * dropout(x) A B, with A (d_in, r) and B (r, d_out); merges as W += scaling A B.

A is initialised as PEFT does (`kaiming_uniform_(a=sqrt(5))`, i.e. uniform with bound 1/sqrt(d_in)) and
B with zeros, so an attached adapter starts as the identity and trained adapters match PEFT's numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.adapters.variables import AdapterParam
from valora_jax.layers import Linear


def kaiming_uniform(in_axis: int = -2, out_axis: int = -1):
    """torch's `kaiming_uniform_(a=sqrt(5))`: uniform(+-1/sqrt(fan_in)), fan_in = the `in_axis` size times
    the sizes of the axes other than `in_axis` and `out_axis` (torch's receptive field)."""
    return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


def input_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
    """Dropout on the adapter input (active until `model.eval()`); None when the rate is 0."""
    return nnx.Dropout(rate, rngs=rngs) if rate else None


class LowRankPair(nnx.Module):
    """A (d_in, r), Kaiming-uniform, and B (r, d_out), zeros, with a scale and optional input dropout:
    the state LoRA and Serial LoRA share. `low_rank(x)` is scaling * dropout(x) A B."""

    def __init__(self, d_in: int, d_out: int, *, rank: int, scaling: float, dropout: float, axes, dtype,
                 rngs: nnx.Rngs):
        self.A = AdapterParam(kaiming_uniform()(rngs.params(), (d_in, rank), dtype), logical_axes=(axes[0], None))
        self.B = AdapterParam(jnp.zeros((rank, d_out), dtype), logical_axes=(None, axes[1]))
        self.scaling = scaling
        self.dropout = input_dropout(dropout, rngs)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def low_rank(self, x: jax.Array) -> jax.Array:
        h = x if self.dropout is None else self.dropout(x)
        return self.scaling * ((h @ self.A[...].astype(x.dtype)) @ self.B[...].astype(x.dtype))


class LoRA(LowRankPair):
    """The delta branch of one `Linear` (attached at `linear.adapter`)."""

    def __init__(self, linear: Linear, *, rank: int, scaling: float, dropout: float, dtype, rngs: nnx.Rngs):
        super().__init__(linear.in_features, linear.out_features, rank=rank, scaling=scaling, dropout=dropout,
                         axes=getattr(linear.kernel, "logical_axes", (None, None)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:  # already folded into the kernel
            return jnp.zeros((), x.dtype)
        return self.low_rank(x)

    def delta_weight(self) -> jax.Array:
        """(d_in, d_out) float32 update this adapter adds to the kernel."""
        return self.scaling * (self.A[...].astype(jnp.float32) @ self.B[...].astype(jnp.float32))

    def merge_into(self, linear: Linear) -> None:
        linear.kernel.set_value((linear.kernel[...].astype(jnp.float32) + self.delta_weight()).astype(linear.kernel.dtype))

    def unmerge_from(self, linear: Linear) -> None:
        linear.kernel.set_value((linear.kernel[...].astype(jnp.float32) - self.delta_weight()).astype(linear.kernel.dtype))
