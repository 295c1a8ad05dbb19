"""Seeded random LoRA batches for the kernel tests, one per situation the kernels must handle."""
import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels import Tiles
from pallas_kernels.gpu import SORT_COLS, SORT_ROWS

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
# Small tiles so that tiny shapes still span several token, d_in, rank and d_out tiles.
GPU_TILES = Tiles(block_t=16, block_k=64, block_r=64, block_n=128, split_k=2, num_warps=4, num_stages=2)
# Every GPU kernel variant: natural or slot-sorted token tiles, a tile's runs in one or several
# programs (split-K with an empty split), expand per run or per row (also as the Pallas GEMM's
# epilogue), the base GEMM in Pallas or XLA, the delta as two kernels or as one (fuse_shrink: also
# lora_projection's delta after XLA's base GEMM).
GPU_VARIANTS = {
    "natural": GPU_TILES,
    # split_runs 16 covers every run a tile holds (one run per program); 3 does not (a walk of runs).
    "sorted-split-runs": dataclasses.replace(GPU_TILES, sort=True, split_runs=16, split_k=3),
    "sorted-run-walk": dataclasses.replace(GPU_TILES, sort=True, split_runs=3, split_k=3),
    "expand-rows": dataclasses.replace(GPU_TILES, expand_rows=True),
    "xla-base": dataclasses.replace(GPU_TILES, expand_rows=True, xla_base=True),
    "one-kernel": dataclasses.replace(GPU_TILES, fuse_shrink=True, xla_base=True),
    "one-kernel-sorted-split-runs": dataclasses.replace(GPU_TILES, fuse_shrink=True, xla_base=True, sort=True,
                                                        split_runs=3),
}
TPU_TILES = Tiles(block_t=16, block_k=128, block_r=128, block_n=128)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_in: int
    d_out: int
    ranks: tuple  # true rank of each slot; the pool's rank buffer is max(rank_buffer, ranks)
    rank_buffer: int
    slots: str  # "mixed" | "single" | "distinct" | "none"
    with_base: bool

    def arrays(self, dtype: str, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        n, r_buf = len(self.ranks), self.rank_buffer
        ranks = np.asarray(self.ranks, np.int32)
        a = rng.standard_normal((n, self.d_in, r_buf)) * self.d_in ** -0.5
        b = rng.standard_normal((n, r_buf, self.d_out)) * r_buf ** -0.5
        for i, r in enumerate(ranks):  # garbage past each rank: the kernels must never read it
            a[i, :, r:] = 1e3
            b[i, r:, :] = -1e3
        if self.slots == "mixed":  # slot -1 tokens, ids outside the pool (no adapter), the last slot empty
            slot_ids = rng.integers(-1, n - 1, self.tokens)
            slot_ids[3::10], slot_ids[7::10] = n, -5
        elif self.slots == "single":
            slot_ids = np.full(self.tokens, 1)
        elif self.slots == "distinct":
            slot_ids = rng.permutation(n)[: self.tokens]
        else:
            slot_ids = np.full(self.tokens, -1)
        cast = lambda v: jnp.asarray(v.astype(np.float32), dtype)  # noqa: E731
        return dict(
            x=cast(rng.standard_normal((self.tokens, self.d_in))),
            w=cast(rng.standard_normal((self.d_in, self.d_out)) * self.d_in ** -0.5),
            a_pool=cast(a), b_pool=cast(b),
            slot_ids=jnp.asarray(slot_ids, jnp.int32), ranks=jnp.asarray(ranks),
            scales=jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32),
            base_out=cast(rng.standard_normal((self.tokens, self.d_out))) if self.with_base else None,
        )


CASES = [
    # heterogeneous ranks (incl. rank 0), slot -1 tokens, an empty slot, T = 37 fits no tile
    Case("mixed", 37, 256, 384, (16, 3, 8, 0, 11, 16), 16, "mixed", True),
    # d_in = 200 fits no block_k: the Pallas GEMM's last K block is masked
    Case("single-adapter", 21, 200, 128, (4, 16), 16, "single", False),
    Case("every-token-distinct", 6, 128, 128, tuple(range(1, 9)), 16, "distinct", True),
    Case("no-adapter", 11, 128, 128, (8, 8), 16, "none", True),
    # a rank buffer over 128 (SNELLA served unmerged): several rank blocks, skipped past each rank
    Case("rank-over-128", 19, 128, 128, (256, 130, 7), 256, "mixed", False),
]
# T = 32 is two whole token tiles of GPU_TILES: the kernels' unmasked row paths (every CASES entry
# ends in a partial tile).
WHOLE_TILES = Case("whole-token-tiles", 32, 128, 128, (8, 16, 4), 16, "mixed", True)


def ranks_outside_the_buffer(seed: int = 2) -> tuple[dict, dict]:
    """The mixed case (float32) with ranks past its rank buffer R and below 0, and the same arrays with
    them clipped to [0, R]: what every kernel must compute, without reading past R (where the pool's
    next slot lies)."""
    data = CASES[0].arrays("float32", seed=seed)
    rank_buffer = data["a_pool"].shape[2]
    ranks = np.asarray([rank_buffer + 24, -3, 8, 0, 100, rank_buffer])
    clipped = {**data, "ranks": jnp.asarray(np.clip(ranks, 0, rank_buffer), jnp.int32)}
    return {**data, "ranks": jnp.asarray(ranks, jnp.int32)}, clipped


def slots_past_one_sort_step(seed: int = 4) -> tuple[np.ndarray, int, np.ndarray]:
    """Slot ids (-1 and ids past the pool included) of T = 2 * SORT_COLS + SORT_ROWS + 1 tokens, so that
    the sort kernel compares over several steps and its last program is partial; the pool size; and
    the stable slot order the kernel must give (tokens without an adapter last, in token order)."""
    num_slots = 5
    slot_ids = np.random.default_rng(seed).integers(-1, num_slots + 2, 2 * SORT_COLS + SORT_ROWS + 1)
    keys = np.where((slot_ids >= 0) & (slot_ids < num_slots), slot_ids, num_slots)
    return slot_ids.astype(np.int32), num_slots, np.argsort(keys, kind="stable")
