"""Tile shapes per shape class: the tuned table, its nearest-key lookup, and the fallback heuristic.

ATMM's point is that one tile shape cannot serve 1-token decode segments and 4096-token prefill
segments alike, so tiles are chosen per shape class, separately for the delta (batched_lora) and the
fused projection (whose GEMM wants other tiles). Tiles are static (they pick the compiled kernel); the
key therefore uses only static quantities. The number of distinct adapters in a batch is data, so
run-time lookups key it by its static upper bound min(N slots, T tokens).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

import jax

log = logging.getLogger(__name__)

BACKENDS = ("pallas_gpu", "pallas_tpu")
TABLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tiles"
KEY_FIELDS = ("tokens", "d_in", "d_out", "rank", "adapters")
TPU_SUBLANES, TPU_LANES = 8, 128
GPU_MIN_DOT = 16  # Triton's tl.dot needs every block dim >= 16
FUSE_SHRINK_MAX_TOKENS = 256  # TPU: decode-sized token buckets are memory- and launch-bound
SORT_MIN_TOKENS = 128  # GPU: from here on a slot sort pays for its launch (fewer runs per tile)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Block sizes along tokens, d_in, rank and d_out, plus backend-specific knobs.

    GPU only: split_k (shrink programs per token tile along d_in), num_warps and num_stages
    (Triton's pipelining depth); sort (tile tokens in slot order, made by one sort kernel, rather
    than in natural order: fewer adapters per tile, one more launch); split_runs (programs sharing
    the adapter runs of one token tile); expand_rows (expand by per-row gathers of B instead of one
    dot per adapter run); xla_base (lora_projection only: base GEMM by XLA, delta added by the
    expand, instead of the Pallas GEMM with the expand as epilogue). lora_projection's GEMM always
    walks natural-order tiles; sort there orders its shrink only. See gpu.py.

    fuse_shrink: compute x @ A inside the kernel that writes y instead of in a separate shrink
    kernel, so one kernel runs, but every d_out tile recomputes the shrink: a win while the call is
    bound by launches and bytes (decode), a loss once it is bound by FLOPs. On TPU in the projection
    kernel's d_in loop, next to x @ W (lora_projection only; x is then read once). On GPU in the
    delta's expand (batched_lora, and lora_projection with xla_base): one adapter run per program
    (split_runs set to cover a tile's runs), each with its full d_in loop; split_k and expand_rows
    do not apply there.
    """

    block_t: int
    block_k: int
    block_r: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fuse_shrink: bool = False
    sort: bool = False
    split_runs: int = 1
    expand_rows: bool = False
    xla_base: bool = False


@dataclasses.dataclass(frozen=True)
class ShapeKey:
    """A shape class: T bucket (next power of two), d_in, d_out, rank buffer R, distinct adapters,
    and whether the tiles serve the fused projection (True) or the delta alone."""

    tokens: int
    d_in: int
    d_out: int
    rank: int
    adapters: int
    fused: bool = False

    @classmethod
    def of(cls, tokens: int, d_in: int, d_out: int, rank: int, adapters: int, fused: bool = False) -> ShapeKey:
        return cls(_next_pow2(tokens), d_in, d_out, rank, max(1, min(adapters, tokens)), fused)


def call_key(x_shape: tuple, a_pool_shape: tuple, b_pool_shape: tuple, fused: bool = False) -> ShapeKey:
    """The key a call with these operand shapes looks its tiles up by: x (T, d_in), a_pool
    (N, d_in, R), b_pool (N, R, d_out). Its adapter count is the static bound min(N slots, T), not the
    distinct adapters of a batch (data). `api` looks up and `tune` stores entries by this one function,
    so a tuned entry is found by the calls of the shape it was tuned on."""
    (tokens, d_in), (num_slots, _, rank_buffer), d_out = x_shape, a_pool_shape, b_pool_shape[2]
    return ShapeKey.of(tokens, d_in, d_out, rank_buffer, num_slots, fused)


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
        block_t = gpu_dim(tiles.block_t, key.tokens)
        max_split = max(1, -(-key.d_in // block_k))
        xla_base = tiles.xla_base and key.fused
        fuse_shrink = tiles.fuse_shrink and (xla_base or not key.fused)  # the Pallas GEMM has no fused shrink
        split_runs = min(block_t, key.adapters + 1)  # a tile's runs: its rows, the slots and "no adapter"
        return dataclasses.replace(
            tiles,
            block_t=block_t,
            block_k=block_k,
            block_r=gpu_dim(tiles.block_r, key.rank),
            block_n=gpu_dim(tiles.block_n, key.d_out),
            split_k=1 if fuse_shrink else max(1, min(tiles.split_k, max_split)),
            num_warps=_prev_pow2(min(max(tiles.num_warps, 1), 16)),
            num_stages=max(1, tiles.num_stages),
            fuse_shrink=fuse_shrink,
            split_runs=split_runs if fuse_shrink else max(1, min(tiles.split_runs, split_runs)),
            expand_rows=tiles.expand_rows and not fuse_shrink,
            xla_base=xla_base,
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
            split_k=1, num_warps=4, num_stages=3, sort=False, split_runs=1, expand_rows=False, xla_base=False,
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def heuristic(key: ShapeKey, backend: str) -> Tiles:
    """Tiles where no table exists; `fit` then enforces each backend's rules.

    GPU (fitted to the H100 tuning runs): decode buckets (T <= 256) are bound by launches and bytes,
    so every kernel is spread wide: the delta's token tiles are small, each tile's adapter runs get
    programs of their own (split_runs = the expected runs per tile) and split-K brings the shrink to
    about 256 programs. Tokens are slot-sorted from SORT_MIN_TOKENS on, where a tile would otherwise
    hold most adapters. The fused projection is a GEMM first, over natural-order token tiles: at
    decode one or a few token tiles cover the batch (W read once), narrow d_out tiles fill the SMs,
    and the epilogue gathers B per row (expand_rows: a decode tile holds many adapters, whose runs
    would be a chain of dependent loads); at prefill its tiles are the usual GEMM tiles and a tile
    holds a few runs (requests are token ranges), each one tensor-core dot.

    The one-kernel delta (fuse_shrink) is left to the tuned table: on the H100 it won only at T = 32
    with the tiles of PERF.md rounds 3 and 4, lost at T = 256, and lost at T = 32 too once the two
    kernels had split_k 4 and block_n 256 (round 5, which the table now holds); `tune` tries it with
    its own tiles (tune.ONE_KERNEL).

    TPU: token tiles follow the mean segment length T / adapters over the padded slot-sorted layout;
    the shrink is fused into the projection up to FUSE_SHRINK_MAX_TOKENS (see Tiles).
    """
    segment = max(1, key.tokens // key.adapters)
    if backend == "pallas_tpu":
        block_t = 16 if segment <= 16 else 64 if segment <= 256 else 128
        tiles = Tiles(block_t=block_t, block_k=512, block_r=min(key.rank, 256), block_n=512,
                      fuse_shrink=key.tokens <= FUSE_SHRINK_MAX_TOKENS)
        return fit(tiles, key, backend)
    decode, sort = key.tokens <= 256, key.tokens >= SORT_MIN_TOKENS
    if key.fused:
        block_t = min(64, key.tokens) if decode else 128
        block_n = 32 if key.tokens <= 32 else 128 if decode else 256
    else:
        block_t = 16 if not sort or segment <= 16 else 64 if segment <= 256 else 128
        block_n = 128 if decode else 256
    block_t = max(GPU_MIN_DOT, min(block_t, key.tokens))  # as `fit` will clamp it
    runs = min(key.adapters + 1, block_t // segment + 1 if sort else block_t)
    split_runs = runs if decode else 1
    programs = -(-key.tokens // block_t) * split_runs
    split_k = max(1, min(8 if decode else 4, _prev_pow2(max(1, 256 // programs))))
    block_k, num_warps, num_stages = (128, 4, 4 if key.fused else 3) if decode else (64, 8, 3)
    tiles = Tiles(block_t=block_t, block_k=block_k, block_r=min(key.rank, 64), block_n=block_n,
                  split_k=split_k, num_warps=num_warps, num_stages=num_stages, sort=sort,
                  split_runs=split_runs, expand_rows=key.fused and decode)
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
        """The table of `to_json`'s text; ValueError naming the entry and the fields where an entry's key
        or tiles has fields these classes lack (e.g. a table written by another version) or lacks
        required ones."""
        raw = json.loads(text)
        entries = {}
        for index, entry in enumerate(raw["entries"]):
            key = _from_fields(ShapeKey, entry["key"], f"entry {index}'s key")
            entries[key] = _from_fields(Tiles, entry["tiles"], f"entry {index}'s tiles")
        return cls(raw["device_kind"], raw["backend"], raw["jax_version"], entries)

    def save(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: pathlib.Path) -> TileTable:
        try:
            return cls.from_json(path.read_text())
        except ValueError as error:
            raise ValueError(f"tile table {path}: {error}") from None

    def lookup(self, key: ShapeKey) -> Tiles:
        """Tiles of the nearest stored key of the same kind (delta or fused; log2 distance over the
        sizes), fitted to `key`; the heuristic's when the table holds none of that kind."""
        entries = [stored for stored in self.entries if stored.fused == key.fused]
        if not entries:
            return heuristic(key, self.backend)

        def distance(stored: ShapeKey) -> float:
            return sum(abs(math.log2(getattr(stored, f)) - math.log2(getattr(key, f))) for f in KEY_FIELDS)

        return fit(self.entries[min(entries, key=distance)], key, self.backend)


def _from_fields(cls, fields: dict, what: str):
    """cls(**fields), or a ValueError saying which fields `what` has that cls lacks, or lacks that cls
    requires."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    missing = sorted(name for name, f in known.items() if name not in fields
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        problems = [f"unknown fields {unknown}"] * bool(unknown) + [f"missing fields {missing}"] * bool(missing)
        raise ValueError(f"{what}: {' and '.join(problems)}; {cls.__name__} has {list(known)}")
    return cls(**fields)


_loaded: dict[pathlib.Path, TileTable | None] = {}
_warned: set[tuple[pathlib.Path, str]] = set()  # (table path, backend) whose heuristic fallback was logged


def tiles_for(key: ShapeKey, backend: str, path: pathlib.Path | None = None) -> Tiles:
    """Tiles from this device's table when one exists for `backend`, else the heuristic's (with one
    warning per table and backend: silently untuned kernels would look like slow ones)."""
    path = path or table_path()
    if path not in _loaded:
        _loaded[path] = TileTable.load(path) if path.exists() else None
    table = _loaded[path]
    if table is None or table.backend != backend:
        if (path, backend) not in _warned:  # every un-jitted call looks tiles up: warn on the first only
            _warned.add((path, backend))
            found = "no tile table" if table is None else f"a {table.backend} tile table"
            log.warning("%s at %s: %s uses the heuristic's tiles, which may be slower than tuned ones; "
                        "`python -m pallas_kernels.tune --backend %s` writes a table for this device",
                        found, path, backend, backend)
        return heuristic(key, backend)
    return table.lookup(key)
