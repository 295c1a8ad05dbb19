"""Synthetic mixed-adapter batches for tuning and benchmarking (not for tests: those build their own)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.tiles import ShapeKey, call_key


@dataclasses.dataclass(frozen=True)
class Workload:
    """One projection d_in -> d_out over T tokens drawn from `adapters` slots of an N-slot pool."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    adapters: int
    pool: int = 64
    dtype: str = "bfloat16"

    def arrays(self, seed: int = 0) -> dict:
        """x, w, a_pool, b_pool, slot_ids, ranks, scales; `adapters` random slots share the tokens."""
        rng = np.random.default_rng(seed)
        dtype = jnp.dtype(self.dtype)

        def normal(*shape, std):
            return jnp.asarray(rng.standard_normal(shape, np.float32) * std, dtype)

        chosen = rng.choice(self.pool, size=min(self.adapters, self.pool), replace=False)
        return dict(
            x=normal(self.tokens, self.d_in, std=1.0),
            w=normal(self.d_in, self.d_out, std=self.d_in ** -0.5),
            a_pool=normal(self.pool, self.d_in, self.rank, std=self.d_in ** -0.5),
            b_pool=normal(self.pool, self.rank, self.d_out, std=self.rank ** -0.5),
            slot_ids=jnp.asarray(rng.choice(chosen, size=self.tokens), jnp.int32),
            ranks=jnp.full((self.pool,), self.rank, jnp.int32),
            scales=jnp.full((self.pool,), 2.0, jnp.float32),
        )

    def key(self, fused: bool = False) -> ShapeKey:
        """The tile-table key that calls on this workload's arrays look up (`tiles.call_key`)."""
        return call_key((self.tokens, self.d_in), (self.pool, self.d_in, self.rank), (self.pool, self.rank, self.d_out),
                        fused)

    def distinct_adapters(self, arrays: dict) -> int:
        return int(np.unique(np.asarray(arrays["slot_ids"])).size)

    def floor_bytes(self, distinct: int) -> int:
        """BENCHMARKS.md byte floor: distinct adapters' A and B, read x, write y."""
        item = jnp.dtype(self.dtype).itemsize
        adapters = distinct * (self.d_in * self.rank + self.rank * self.d_out)
        return (adapters + self.tokens * self.d_in + self.tokens * self.d_out) * item

    def copy_bytes(self) -> int:
        """Bytes of one input copy (pools dominate), for sizing the rotation past the cache."""
        item = jnp.dtype(self.dtype).itemsize
        pools = self.pool * self.rank * (self.d_in + self.d_out)
        return (pools + self.tokens * (self.d_in + self.d_out) + self.d_in * self.d_out) * item
