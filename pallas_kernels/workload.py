"""Synthetic mixed-adapter batches for tuning and benchmarking (not for tests: those build their own)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from pallas_kernels import api
from pallas_kernels.tiles import ShapeKey, Tiles, call_key

LORA_ARRAYS = ("x", "a_pool", "b_pool", "slot_ids", "ranks", "scales")


def operation(fused: bool, backend: str, tiles: Tiles | None = None,
              interpret: bool = False) -> tuple[Callable, tuple[str, ...]]:
    """The call that bench and tune time (fused: lora_projection, else batched_lora; tiles None: the
    table's), and the names of the `Workload.arrays` it takes, in order."""
    kw = {"backend": backend, "interpret": interpret, "tiles": tiles}
    if fused:
        return (lambda *a: api.lora_projection(*a, **kw)), ("x", "w", *LORA_ARRAYS[1:])
    return (lambda *a: api.batched_lora(*a, **kw)), LORA_ARRAYS


@dataclasses.dataclass(frozen=True)
class Workload:
    """One projection d_in -> d_out over T tokens drawn from `adapters` slots of an N-slot pool.

    `requests=None` draws every token's adapter on its own, as a decode batch holds one token per
    request; `requests=n` packs the tokens as n contiguous requests of random lengths, each of one
    adapter, as a prefill batch holds whole prompts.
    """

    tokens: int
    d_in: int
    d_out: int
    rank: int
    adapters: int
    pool: int = 64
    dtype: str = "bfloat16"
    requests: int | None = None

    def __post_init__(self):
        if self.requests is not None and not 1 <= self.requests <= self.tokens:
            raise ValueError(f"requests must be between 1 and tokens ({self.tokens}), got {self.requests}")

    @classmethod
    def parse(cls, spec: str, hidden: int, pool: int) -> Workload:
        """A command line's "T,RANK,ADAPTERS[,REQUESTS]" as a hidden -> hidden workload."""
        try:
            tokens, rank, adapters, *requests = (int(v) for v in spec.split(","))
            if len(requests) > 1:
                raise ValueError("too many fields")
        except ValueError as error:
            raise ValueError(f"shape {spec!r} is not T,RANK,ADAPTERS[,REQUESTS] ({error})") from None
        return cls(tokens, hidden, hidden, rank, adapters, pool=pool, requests=requests[0] if requests else None)

    @property
    def label(self) -> str:
        """The adapter mix, for progress lines: "a4", or "a4 in 8 requests"."""
        return f"a{self.adapters}" + ("" if self.requests is None else f" in {self.requests} requests")

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
            slot_ids=jnp.asarray(self._slot_ids(rng, chosen), jnp.int32),
            ranks=jnp.full((self.pool,), self.rank, jnp.int32),
            scales=jnp.full((self.pool,), 2.0, jnp.float32),
        )

    def _slot_ids(self, rng: np.random.Generator, chosen: np.ndarray) -> np.ndarray:
        if self.requests is None:
            return rng.choice(chosen, size=self.tokens)
        # every chosen adapter owns a request when there are enough of them, in random order
        owners = rng.permutation(np.resize(chosen, self.requests))
        cuts = np.sort(rng.choice(np.arange(1, self.tokens), size=self.requests - 1, replace=False))
        return np.repeat(owners, np.diff(cuts, prepend=0, append=self.tokens))

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
