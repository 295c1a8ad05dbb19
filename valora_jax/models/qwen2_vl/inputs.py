"""Host-side (numpy) inputs of Qwen-VL: the per-patch metadata of the vision encoder and M-RoPE positions.

Everything data-dependent is computed here, from `image_grid_thw` and `input_ids`, so the jitted model sees
static shapes only. Each image is its own attention group (vision attention never crosses images, so
its cost is per image, not quadratic in a batch's patches). By default each group is padded to a
bucketed patch count (a power of two, at least MIN_PATCH_BUCKET, from the largest image) and the group
count to a power of two, with padding in attention segments of its own: batches whose images share
those buckets share compiled programs, so a mix of sizes compiles one program per (image-count bucket,
patch bucket) its batches reach. Training batches (one image per row, all of one size) take the exact
layout, without padding, whose groups split over devices with their rows.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from valora_jax.models.qwen2_vl.config import QwenVLConfig

MIN_PATCH_BUCKET = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
    """A batch's image patches, a group per image, each in attention order (Qwen2.5-VL: window by window).

    Within a group, `segments` / `window_segments` give each patch its full-attention and window-attention
    group (an image frame; a window of one); padding is a segment of its own. `restore` puts the group's
    merged tokens (one per `merge_unit` patches, in attention order) back in image order, padding last.
    `order` (padded layouts; None in the exact one) takes the flattened groups' tokens to the batch's image
    tokens in order, padding last. `rows` is the batch row whose prompt each patch's image belongs to: the
    adapter pool's per-row selection reads it.
    """

    pixel_values: jax.Array  # (groups, patches, patch_dim) float
    positions: jax.Array  # (groups, patches, 2) int32: (row, column) of each patch in its image, for the 2-D rotary
    segments: jax.Array  # (groups, patches) int32
    window_segments: jax.Array  # (groups, patches) int32
    restore: jax.Array  # (groups, patches // merge_unit) int32
    rows: jax.Array  # (groups, patches) int32
    order: jax.Array | None = None  # (groups * patches // merge_unit,) int32

    @property
    def num_patches(self) -> int:
        """Patches per group."""
        return self.pixel_values.shape[1]


def patch_bucket(n: int, minimum: int = MIN_PATCH_BUCKET) -> int:
    """Smallest power of two >= n (and >= minimum): the patch counts that get compiled."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _grids(image_grid_thw) -> np.ndarray:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    if (grid <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {grid.tolist()}")
    return grid


def vision_inputs(cfg: QwenVLConfig, pixel_values, image_grid_thw, *, image_rows=None,
                  exact: bool = False) -> VisionInputs:
    """Per-patch metadata for the image processor's flattened patches (`pixel_values`, (patches, patch_dim)).

    `image_rows` (images,): the batch row of each image (default 0). Padded to the buckets, or with
    `exact` (images of one size) not padded at all.
    """
    v = cfg.vision
    pixel_values = np.asarray(pixel_values)
    grid = _grids(image_grid_thw)
    counts = grid.prod(axis=1)
    total = int(counts.sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (total, v.patch_dim):
        raise ValueError(f"pixel_values must be (patches, {v.patch_dim}) with {total} patches for image_grid_thw "
                         f"{grid.tolist()}, got {pixel_values.shape}")
    if (grid[:, 1:] % v.spatial_merge_size).any():
        raise ValueError(f"image_grid_thw heights and widths must be multiples of spatial_merge_size "
                         f"{v.spatial_merge_size}: {grid.tolist()}")
    image_rows = np.zeros(len(grid), np.int64) if image_rows is None else np.asarray(image_rows, np.int64)
    if image_rows.shape != (len(grid),):
        raise ValueError(f"image_rows must give one row per image ({len(grid)}), got shape {image_rows.shape}")
    if exact and (grid != grid[0]).any():
        raise ValueError(f"the exact layout needs images of one size; got {grid.tolist()}")
    size = int(counts[0]) if exact else patch_bucket(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)])
    groups = [_group(cfg, pixel_values[a:b], tuple(grid[i].tolist()), int(image_rows[i]), size)
              for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
    if exact:
        return VisionInputs(**_stacked(groups))
    n_groups = 1 << (len(groups) - 1).bit_length()
    groups += [_group(cfg, pixel_values[:0], None, 0, size)] * (n_groups - len(groups))
    tokens = size // v.merge_unit
    real = np.zeros((n_groups, tokens), bool)
    for g, n in enumerate(counts // v.merge_unit):
        real[g, :n] = True
    order = np.concatenate([np.flatnonzero(real), np.flatnonzero(~real)]).astype(np.int32)
    return VisionInputs(**_stacked(groups), order=order)


def _stacked(groups: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([g[k] for g in groups]) for k in groups[0]}


def _group(cfg: QwenVLConfig, pixel_values: np.ndarray, thw: tuple[int, int, int] | None, row: int,
           bucket: int) -> dict[str, np.ndarray]:
    """One attention group's fields (without the group axis): the image of grid `thw` (its frames, patch rows
    and columns; None: a group of padding only) in the batch's row `row`, padded to `bucket` patches."""
    v = cfg.vision
    m, unit = v.spatial_merge_size, v.merge_unit
    total = len(pixel_values)
    if bucket < total or bucket % unit:
        raise ValueError(f"patch bucket {bucket} must hold {total} patches and be a multiple of {unit}")
    positions, segments, window_segments = np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    units = np.zeros(0, np.int64)  # attention order -> image-order index of the merged tokens
    frames = windows = 0
    if thw is not None:
        t, h, w = thw
        # Patches come in merge-block order: (row block, column block, row in block, column in block).
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        positions = np.tile(np.stack([block(r), block(c)], axis=-1), (t, 1))
        segments, frames = np.repeat(np.arange(t), h * w), t
        # Merged tokens: (t, h/m, w/m); windows of merger_window x merger_window of them (the last row /
        # column of windows ragged), ordered window by window as transformers does.
        lh, lw = h // m, w // m
        tt, r, c = (a.reshape(-1) for a in np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij"))
        if v.windowed:
            win = v.merger_window
            win_id = (tt * -(-lh // win) + r // win) * -(-lw // win) + c // win
            units = np.lexsort((c % win, r % win, win_id))  # by window, then row-major inside it
        else:
            win_id, units = tt, np.arange(tt.size)
        window_segments, windows = np.repeat(win_id, unit), int(win_id.max()) + 1
    patch_order = (units[:, None] * unit + np.arange(unit)).reshape(-1)
    pad = bucket - total
    padded = lambda a, fill: np.concatenate([a[patch_order], np.full((pad, *a.shape[1:]), fill, a.dtype)])  # noqa: E731
    return {
        "pixel_values": padded(pixel_values, 0),
        "positions": padded(positions, 0).astype(np.int32),
        "segments": padded(segments, frames).astype(np.int32),
        "window_segments": padded(window_segments, windows).astype(np.int32),
        "restore": np.concatenate([np.argsort(units), np.arange(total // unit, bucket // unit)]).astype(np.int32),
        "rows": padded(np.full(total, row, np.int64), 0).astype(np.int32),
    }


def image_rows(cfg: QwenVLConfig, input_ids, attention_mask=None) -> np.ndarray:
    """(images,) the batch row of each image: its run of `<|image_pad|>` tokens, in row-major order."""
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    is_image = (input_ids == cfg.image_token_id) & mask
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return np.repeat(np.arange(len(input_ids)), starts.sum(axis=1))


def image_token_counts(cfg: QwenVLConfig, image_grid_thw) -> np.ndarray:
    """Decoder tokens of each image: its patches over the merge unit."""
    return _grids(image_grid_thw).prod(axis=1) // cfg.vision.merge_unit


def rope_positions(cfg: QwenVLConfig, input_ids, attention_mask=None, image_grid_thw=None) -> np.ndarray:
    """M-RoPE positions (3, batch, seq) int32 as transformers' `get_rope_index`: text tokens share one position
    on all three axes; each run of image tokens takes the (temporal, row, column) of its merged tokens,
    offset by the position it starts at, and the text after it continues from that offset plus the image's
    larger side. Padding gets position 0."""
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(_grids(image_grid_thw).tolist() if image_grid_thw is not None else [])
    m = cfg.vision.spatial_merge_size
    out = np.zeros((3, *input_ids.shape), np.int64)
    for row, (ids, keep) in enumerate(zip(input_ids, mask)):
        pieces, start = [], 0
        for is_image, run in itertools.groupby(ids[keep] == cfg.image_token_id):
            n = len(list(run))
            if not is_image:
                pieces.append(np.broadcast_to(start + np.arange(n), (3, n)))
                start += n
                continue
            t, h, w = next(grids, (0, 0, 0))
            lh, lw = h // m, w // m
            if n != t * lh * lw:
                raise ValueError(f"row {row}: a run of {n} image tokens does not match the next image_grid_thw "
                                 f"{[t, h, w]} ({t * lh * lw} tokens); use the processor's image token expansion")
            tt, r, c = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
            pieces.append(start + np.stack([tt.reshape(-1), r.reshape(-1), c.reshape(-1)]))
            start += max(h, w) // m
        if pieces:
            out[:, row, keep] = np.concatenate(pieces, axis=1)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw lists more images than input_ids has image-token runs")
    return out.astype(np.int32)
