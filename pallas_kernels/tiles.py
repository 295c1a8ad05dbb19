"""Tile shapes per shape class: the tuned table, its nearest-key lookup, and the fallback heuristic.

ATMM's point is that one tile shape cannot serve 1-token decode segments and 4096-token prefill
segments alike, so tiles are chosen per shape class. Tiles are static (they pick the compiled kernel);
the key therefore uses only static quantities. The number of distinct adapters in a batch is data, so
run-time lookups key it by its static upper bound min(N slots, T tokens).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax

BACKENDS = ("pallas_gpu", "pallas_tpu")
TABLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiles"
KEY_FIELDS = ("tokens", "d_in", "d_out", "rank", "adapters")
TPU_SUBLANES, TPU_LANES = 8, 128
GPU_MIN_DOT = 16  # Triton's tl.dot needs every block dim >= 16
FUSE_SHRINK_MAX_TOKENS = 256  # decode-sized token buckets: memory- and launch-bound


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes along tokens, d_in, rank and d_out; split-K and pipelining are GPU-only knobs.

    fuse_shrink (lora_projection only): compute x @ A inside the projection kernel's d_in loop, next
    to x @ W, instead of in a separate shrink kernel. x is then read once and one kernel runs, but
    every d_out tile recomputes the shrink (R / block_n extra FLOPs over the base GEMM): a win while
    the call is bound by bytes and launches (decode), a loss once it is bound by FLOPs (prefill).
    """

    block_t: int
    block_k: int
    block_r: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fuse_shrink: bool = False


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    """A shape class: T bucket (next power of two), d_in, d_out, rank buffer R, distinct adapters."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    adapters: int

    @classmethod
    def of(cls, tokens: int, d_in: int, d_out: int, rank: int, adapters: int) -> ShapeKey:
        return cls(_next_pow2(tokens), d_in, d_out, rank, max(1, min(adapters, tokens)))


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _prev_pow2(n: int) -> int:
    return 1 << max(0, int(math.log2(max(n, 1))))


def _largest_aligned_divisor(dim: int, want: int, align: int) -> int:
    """Largest multiple of `align` that divides `dim` and is <= want; the full dim when none does.

    Mosaic blocks must be (8, 128)-aligned or span the whole axis, and reduction axes must divide
    exactly (a partial block would sum padding garbage).
    """
    for block in range(min(want, dim) // align * align, 0, -align):
        if dim % block == 0:
            return block
    return dim


def fit(tiles: Tiles, key: ShapeKey, backend: str) -> Tiles:
    """Clamp tiles to a shape so that every lookup result is valid for that backend."""
    if backend == "pallas_gpu":
        def gpu_dim(want: int, dim: int) -> int:
            return max(GPU_MIN_DOT, min(_prev_pow2(want), _next_pow2(dim)))

        block_k = gpu_dim(tiles.block_k, key.d_in)
        max_split = max(1, -(-key.d_in // block_k))
        return dataclasses.replace(
            tiles,
            block_t=gpu_dim(tiles.block_t, key.tokens),
            block_k=block_k,
            block_r=gpu_dim(tiles.block_r, key.rank),
            block_n=gpu_dim(tiles.block_n, key.d_out),
            split_k=max(1, min(tiles.split_k, max_split)),
            num_warps=_prev_pow2(min(max(tiles.num_warps, 1), 16)),
            num_stages=max(1, tiles.num_stages),
        )
    if backend == "pallas_tpu":
        # Token tiles of 16 keep bf16 (16, 128) sublane packing; the padded token layout is a
        # multiple of block_t by construction, so it needs no divisibility.
        block_t = max(2 * TPU_SUBLANES, tiles.block_t // TPU_SUBLANES * TPU_SUBLANES)
        return dataclasses.replace(
            tiles,
            block_t=min(block_t, max(2 * TPU_SUBLANES, _next_pow2(key.tokens))),
            block_k=_largest_aligned_divisor(key.d_in, tiles.block_k, TPU_LANES),
            block_r=_largest_aligned_divisor(key.rank, tiles.block_r, TPU_LANES),
            block_n=_largest_aligned_divisor(key.d_out, tiles.block_n, TPU_LANES),
            split_k=1, num_warps=4, num_stages=3,
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def heuristic(key: ShapeKey, backend: str) -> Tiles:
    """Tiles where no table exists.

    Token tiles follow the mean segment length T / adapters (decode segments are a token or two, so
    small tiles waste least padding; prefill segments are long, so large tiles reuse weights); split-K
    spreads the shrink of a short batch over more programs, since few token tiles cannot fill the
    GPU; wide d_out tiles amortise each token tile's reads. The shrink is fused into the projection
    for token buckets up to FUSE_SHRINK_MAX_TOKENS, where the recomputed x @ A hides under the bytes
    (see Tiles). `fit` then enforces each backend's rules.
    """
    fuse_shrink = key.tokens <= FUSE_SHRINK_MAX_TOKENS
    segment = max(1, key.tokens // key.adapters)
    block_t = 16 if segment <= 16 else 64 if segment <= 256 else 128
    if backend == "pallas_gpu":
        split_k = 8 if key.tokens <= 64 else 4 if key.tokens <= 512 else 1
        # (128, 64) x tiles + (64, 128) w tiles in 2 stages stay well inside an H100's 227 KiB of shared
        # memory; (128, 256) d_out tiles in 3 stages asked for 288 KiB and failed to launch at prefill.
        tiles = Tiles(block_t=block_t, block_k=64 if block_t >= 128 else 128, block_r=min(key.rank, 64),
                      block_n=128, split_k=split_k, num_warps=8 if block_t >= 128 else 4,
                      num_stages=2 if block_t >= 128 else 3, fuse_shrink=fuse_shrink)
    else:
        tiles = Tiles(block_t=block_t, block_k=512, block_r=min(key.rank, 256), block_n=512,
                      fuse_shrink=fuse_shrink)
    return fit(tiles, key, backend)


def device_kind() -> str:
    return jax.devices()[0].device_kind


def table_path(kind: str | None = None) -> pathlib.Path:
    """configs/tiles/<device kind>.json, with the kind made file-name safe."""
    safe = "".join(c if c.isalnum() else "_" for c in (kind or device_kind())).strip("_").lower()
    return TABLE_DIR / f"{safe}.json"


@dataclasses.dataclass
class TileTable:
    """Tuned winners for one device and backend, keyed by shape class."""

    device_kind: str
    backend: str
    jax_version: str
    entries: dict[ShapeKey, Tiles] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "device_kind": self.device_kind,
            "backend": self.backend,
            "jax_version": self.jax_version,
            "entries": [{"key": dataclasses.asdict(k), "tiles": dataclasses.asdict(t)}
                        for k, t in self.entries.items()],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TileTable:
        raw = json.loads(text)
        entries = {ShapeKey(**e["key"]): Tiles(**e["tiles"]) for e in raw["entries"]}
        return cls(raw["device_kind"], raw["backend"], raw["jax_version"], entries)

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: pathlib.Path) -> TileTable:
        return cls.from_json(path.read_text())

    def lookup(self, key: ShapeKey) -> Tiles:
        """Tiles of the nearest stored key (log2 distance over all fields), fitted to `key`."""
        if not self.entries:
            return heuristic(key, self.backend)

        def distance(stored: ShapeKey) -> float:
            return sum(abs(math.log2(getattr(stored, f)) - math.log2(getattr(key, f))) for f in KEY_FIELDS)

        return fit(self.entries[min(self.entries, key=distance)], key, self.backend)


_loaded: dict[pathlib.Path, TileTable | None] = {}


def tiles_for(key: ShapeKey, backend: str, path: pathlib.Path | None = None) -> Tiles:
    """Tiles from this device's table when one exists for `backend`, else the heuristic."""
    path = path or table_path()
    if path not in _loaded:
        _loaded[path] = TileTable.load(path) if path.exists() else None
    table = _loaded[path]
    if table is None or table.backend != backend:
        return heuristic(key, backend)
    return table.lookup(key)
