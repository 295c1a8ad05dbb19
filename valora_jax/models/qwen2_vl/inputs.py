"""Host-side (numpy) inputs of Qwen-VL: the per-patch metadata of the vision encoder and M-RoPE positions.

Everything data-dependent is computed here, from `image_grid_thw` and `input_ids`, so the jitted model sees
static shapes only: the patches of all images are padded to a bucketed count (a power of two), the
padding forms its own attention segment, and images of different sizes whose patches share a bucket
share compiled programs (a mix of sizes compiles one program per bucket its batches reach).
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
    """A batch's image patches in attention order (Qwen2.5-VL: window by window), in attention groups.

    Every field has a leading group axis: attention never crosses groups. The default layout is one group
    holding every image, padded to a bucketed patch count; `per_image` layouts give each image its own group
    (all images the same size, no padding), which keeps attention per image and lets the groups split over
    devices with the rows they belong to (training: one image per row). Within a group, `segments` /
    `window_segments` give each patch its full-attention and window-attention group (an image frame; a
    window of one); padding is a segment of its own. `restore` puts the group's merged tokens (one per
    `merge_unit` patches, in attention order) back in image order, padding last. `rows` is the batch row
    whose prompt each patch's image belongs to: the adapter pool's per-row selection reads it.
    """

    pixel_values: jax.Array  # (groups, patches, patch_dim) float
    positions: jax.Array  # (groups, patches, 2) int32: (row, column) of each patch in its image, for the 2-D rotary
    segments: jax.Array  # (groups, patches) int32
    window_segments: jax.Array  # (groups, patches) int32
    restore: jax.Array  # (groups, patches // merge_unit) int32
    rows: jax.Array  # (groups, patches) int32

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


def vision_inputs(cfg: QwenVLConfig, pixel_values, image_grid_thw, bucket: int | None = None, *,
                  image_rows=None, per_image: bool = False) -> VisionInputs:
    """Per-patch metadata for the image processor's flattened patches (`pixel_values`, (patches, patch_dim)).

    `image_rows` (images,): the batch row of each image (default 0). One group padded to `bucket` patches
    (default `patch_bucket` of the total), or with `per_image` a group per image (images of one size).
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
    rows = np.repeat(image_rows, counts)
    if not per_image:
        return _stacked([_group(cfg, pixel_values, grid, rows, patch_bucket(total) if bucket is None else bucket)])
    if bucket is not None or (grid != grid[0]).any():
        raise ValueError(f"a per-image layout needs images of one size and no bucket; got {grid.tolist()}")
    starts = np.concatenate([[0], np.cumsum(counts)])
    return _stacked([_group(cfg, pixel_values[a:b], grid[i:i + 1], rows[a:b], int(counts[i]))
                     for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))])


def _stacked(groups: list[dict[str, np.ndarray]]) -> VisionInputs:
    return VisionInputs(**{k: np.stack([g[k] for g in groups]) for k in groups[0]})


def _group(cfg: QwenVLConfig, pixel_values: np.ndarray, grid: np.ndarray, rows: np.ndarray,
           bucket: int) -> dict[str, np.ndarray]:
    """One attention group's fields (without the group axis) for the images of `grid`, padded to `bucket`."""
    v = cfg.vision
    m, unit = v.spatial_merge_size, v.merge_unit
    total = len(pixel_values)
    if bucket < total or bucket % unit:
        raise ValueError(f"patch bucket {bucket} must hold {total} patches and be a multiple of {unit}")
    positions, segments, window_segments, order = [], [], [], []
    frame = window = unit_offset = 0
    for t, h, w in grid.tolist():
        # Patches come in merge-block order: (row block, column block, row in block, column in block).
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        positions.append(np.tile(np.stack([block(r), block(c)], axis=-1), (t, 1)))
        segments.append(np.repeat(np.arange(frame, frame + t), h * w))
        frame += t
        # Merged tokens of this image: (t, h/m, w/m); windows of merger_window x merger_window of them
        # (the last row / column of windows ragged), ordered window by window as transformers does.
        lh, lw = h // m, w // m
        tt, r, c = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        tt, r, c = tt.reshape(-1), r.reshape(-1), c.reshape(-1)
        if v.windowed:
            win = v.merger_window
            nwh, nww = -(-lh // win), -(-lw // win)
            win_id = (tt * nwh + r // win) * nww + c // win
            unit_order = np.lexsort((c % win, r % win, win_id))  # by window, then row-major inside it
        else:
            win_id = tt
            unit_order = np.arange(tt.size)
        order.append(unit_offset + unit_order)
        window_segments.append(np.repeat(window + win_id, unit))
        window += int(win_id.max()) + 1
        unit_offset += tt.size
    units = np.concatenate(order)  # attention order -> image-order unit index
    patch_order = (units[:, None] * unit + np.arange(unit)).reshape(-1)
    pad = bucket - total
    padded = lambda a, fill: np.concatenate([a[patch_order], np.full((pad, *a.shape[1:]), fill, a.dtype)])  # noqa: E731
    return {
        "pixel_values": padded(pixel_values, 0),
        "positions": padded(np.concatenate(positions), 0).astype(np.int32),
        "segments": padded(np.concatenate(segments), frame).astype(np.int32),
        "window_segments": padded(np.concatenate(window_segments), window).astype(np.int32),
        "restore": np.concatenate([np.argsort(units), np.arange(total // unit, bucket // unit)]).astype(np.int32),
        "rows": padded(rows, 0).astype(np.int32),
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
