"""Procedurally rendered scenes with exact ground truth, for the embedded task suite.

Each scene is a few filled shapes on a dark, noisy background. The ground truth (shape, colour,
visible pixel box and area of every object) is measured from the rendered masks rather than taken
from the requested geometry, so it is exactly what the image shows. Everything is drawn from a
`numpy.random.Generator`: the same seed gives the same pixels.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Saturated, well separated RGB values; every name is a word of the tiny vocabulary.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 50),
    "cyan": (40, 210, 220),
    "magenta": (215, 50, 200),
    "orange": (245, 140, 30),
    "purple": (130, 60, 190),
    "white": (240, 240, 240),
}

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 pixel edges; x1 and y1 exclusive


@dataclasses.dataclass(frozen=True)
class Placement:
    """A shape requested at a square box; what is drawn inside the box depends on the shape."""

    shape: str
    colour: str
    box: Box


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """Ground truth of one drawn object, measured from its visible pixels."""

    shape: str
    colour: str
    box: Box
    area: int


@dataclasses.dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8, (size, size, 3)
    objects: tuple[SceneObject, ...]

    @property
    def count(self) -> int:
        return len(self.objects)

    def colour_areas(self) -> Counter[str]:
        """Visible pixels per colour name, summed over objects."""
        areas: Counter[str] = Counter()
        for obj in self.objects:
            areas[obj.colour] += obj.area
        return areas

    @property
    def dominant_colour(self) -> str:
        """The colour covering the most object pixels (ties: first drawn)."""
        return self.colour_areas().most_common(1)[0][0]


def _shape_outline(shape: str, box: Box) -> tuple[str, list]:
    """PIL draw call name and coordinates for `shape` inside `box` (PIL boxes are inclusive)."""
    x0, y0, x1, y1 = box
    right, bottom = x1 - 1, y1 - 1
    mid_x, mid_y = (x0 + right) / 2, (y0 + bottom) / 2
    if shape == "circle":
        return "ellipse", [x0, y0, right, bottom]
    if shape == "square":
        return "rectangle", [x0, y0, right, bottom]
    if shape == "triangle":
        return "polygon", [(x0, bottom), (right, bottom), (mid_x, y0)]
    if shape == "diamond":
        return "polygon", [(mid_x, y0), (right, mid_y), (mid_x, bottom), (x0, mid_y)]
    if shape == "cross":
        third = (x1 - x0) / 3
        return "polygon", [
            (x0 + third, y0), (x1 - third - 1, y0), (x1 - third - 1, y0 + third), (right, y0 + third),
            (right, y1 - third - 1), (x1 - third - 1, y1 - third - 1), (x1 - third - 1, bottom),
            (x0 + third, bottom), (x0 + third, y1 - third - 1), (x0, y1 - third - 1),
            (x0, y0 + third), (x0 + third, y0 + third),
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def shape_mask(shape: str, box: Box, size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` drawn in `box`."""
    canvas = Image.new("L", (size, size), 0)
    method, coords = _shape_outline(shape, box)
    getattr(ImageDraw.Draw(canvas), method)(coords, fill=255)
    return np.asarray(canvas) > 0


def render_scene(
    placements: Sequence[Placement],
    rng: np.random.Generator,
    *,
    size: int = 64,
    noise: float = 6.0,
    colour_jitter: int = 15,
) -> Scene:
    """Draw `placements` in order (later ones cover earlier ones) over a random dark background.

    Noise and colour jitter make pixels vary between scenes so a model cannot key on exact RGB
    values; pass 0 for both to get exact palette colours.
    """
    background = rng.integers(0, 50, size=3)
    image = np.broadcast_to(background, (size, size, 3)).astype(np.float64)
    masks = []
    for placement in placements:
        mask = shape_mask(placement.shape, placement.box, size)
        jitter = rng.integers(-colour_jitter, colour_jitter + 1, size=3)
        image[mask] = np.asarray(PALETTE[placement.colour]) + jitter
        masks = [m & ~mask for m in masks] + [mask]
    if noise:
        image += rng.normal(0.0, noise, size=image.shape)
    objects = tuple(
        SceneObject(p.shape, p.colour, _mask_box(mask), int(mask.sum())) for p, mask in zip(placements, masks)
    )
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), objects)


def _mask_box(mask: np.ndarray) -> Box:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def random_placements(
    rng: np.random.Generator,
    *,
    count: int,
    size: int = 64,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(PALETTE),
    side_fraction: tuple[float, float] = (0.2, 0.4),
    gap: int = 2,
    max_tries: int = 1000,
) -> list[Placement]:
    """`count` non-overlapping square boxes (at least `gap` pixels apart), each with a random shape and colour.

    Sides are drawn from `side_fraction` of the image size; non-overlap keeps counting unambiguous.
    """
    low, high = (max(3, round(f * size)) for f in side_fraction)
    boxes: list[Box] = []
    for _ in range(max_tries):
        side = int(rng.integers(low, high + 1))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_apart(box, other, gap) for other in boxes):
            boxes.append(box)
            if len(boxes) == count:
                break
    if len(boxes) < count:
        raise ValueError(f"could not place {count} objects of side {low}..{high} in {size}x{size}")
    return [Placement(str(rng.choice(shapes)), str(rng.choice(colours)), box) for box in boxes]


def _apart(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def cell_placements(
    rng: np.random.Generator,
    *,
    count: int,
    size: int = 64,
    cells: int = 3,
    side_fraction: tuple[float, float] = (0.6, 0.875),
    margin: int = 1,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(PALETTE),
) -> list[Placement]:
    """`count` square boxes in distinct cells of a `cells` x `cells` layout, each at a random spot inside its
    cell, with sides drawn from `side_fraction` of the cell's side.

    One object per cell, at least `margin` pixels from the cell's edges, keeps objects apart by
    construction, so a count is never ambiguous.
    """
    if count > cells * cells:
        raise ValueError(f"{count} objects do not fit one per cell of a {cells}x{cells} layout")
    cell = size // cells
    low, high = (max(3, round(f * cell)) for f in side_fraction)
    if high > cell - 2 * margin:
        raise ValueError(f"objects of side up to {high} do not fit cells of {cell} pixels with margin {margin}")
    placements = []
    for index in rng.choice(cells * cells, size=count, replace=False):
        side = int(rng.integers(low, high + 1))
        row, col = divmod(int(index), cells)
        x0, y0 = (origin * cell + int(rng.integers(margin, cell - side - margin + 1)) for origin in (col, row))
        placements.append(Placement(str(rng.choice(shapes)), str(rng.choice(colours)), (x0, y0, x0 + side, y0 + side)))
    return placements


def centred_placement(
    rng: np.random.Generator,
    *,
    size: int = 64,
    side_fraction: tuple[float, float] = (0.5, 0.8),
    jitter: float = 0.3,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(PALETTE),
) -> Placement:
    """One square box near the centre: its side drawn from `side_fraction` of the image size, its centre
    moved by up to `jitter` times its margin to the image edge along each axis."""
    low, high = (max(3, round(f * size)) for f in side_fraction)
    side = int(rng.integers(low, high + 1))
    centred = (size - side) / 2
    reach = int(jitter * centred)
    x0, y0 = (round(centred) + int(rng.integers(-reach, reach + 1)) for _ in range(2))
    return Placement(str(rng.choice(shapes)), str(rng.choice(colours)), (x0, y0, x0 + side, y0 + side))
