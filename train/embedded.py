"""The embedded default task suite: rendered scenes and sklearn's bundled handwritten digits.

It needs no files and no network, and every prompt and answer uses only words of the `tiny`
preset's vocabulary (numbers 0..99 included), so the word-level tokenizer never emits `<unk>`.
Class labels are drawn uniformly before the image is made, so closed-set tasks are balanced.
Each task draws from its own seeded stream: changing one task's size does not change another's data.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from train.scenes import SHAPES, Box, cell_placements, centred_placement, random_placements, render_scene
from train.tasks import Example, Task

# Location answers are box edges on a BOX_GRID x BOX_GRID grid (words 0..4): on the tiny preset's 64-px
# images its lines are the 16-px patch boundaries, the finest positions the model sees as separate tokens.
BOX_GRID = 4
LOCATION_SIDE = (0.3, 0.6)  # object side, as a fraction of the image: 1.2 to 2.4 grid cells
SHAPE_SIDE = (0.5, 0.8)  # one large object near the centre: its outline, not its position, is what varies
SHAPE_JITTER = 0.3  # the object's centre moves by up to this fraction of its margin to the image edge
COUNT_CELLS = 4  # count scenes: at most one object per cell of a COUNT_CELLS x COUNT_CELLS layout
MAX_COUNT = 5
COUNT_LABELS = tuple(str(n) for n in range(1, MAX_COUNT + 1))
COLOUR_TASK_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
# The dominant colour covers at least 3x the next colour's area: a colour question, not a fine area
# comparison (measured on the earlier tiny base: 1.5x gave 0.86 val accuracy, 3x 0.94).
DOMINANCE_MARGIN = 3.0
DEFAULT_N_TRAIN = 1024  # rendered scenes are free: enough that 150 steps of batch 32 do not memorise them
DEFAULT_N_VAL = 100

ExamplesMaker = Callable[[np.random.Generator, int, int], list[Example]]  # (rng, image size, count)


@dataclasses.dataclass(frozen=True)
class EmbeddedTask:
    """How to make one embedded task; `make` draws its examples (train first, then val)."""

    head: str
    metric: str
    requirement: float
    prompt: str
    labels: tuple[str, ...]
    make: ExamplesMaker


def box_to_grid(box: Box, image_size: int, grid: int = BOX_GRID) -> Box:
    """Pixel-edge box -> grid-edge box, rounding each edge to the nearest grid line."""
    x0, y0, x1, y1 = (int(np.floor(v * grid / image_size + 0.5)) for v in box)
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def _make_shape(rng: np.random.Generator, size: int) -> Example:
    label = int(rng.integers(len(SHAPES)))
    placement = centred_placement(rng, size=size, side_fraction=SHAPE_SIDE, jitter=SHAPE_JITTER)
    scene = render_scene([dataclasses.replace(placement, shape=SHAPES[label])], rng, size=size)
    return Example(scene.image, SHAPES[label], label)


def _make_colour(rng: np.random.Generator, size: int) -> Example:
    label = int(rng.integers(len(COLOUR_TASK_COLOURS)))
    target = COLOUR_TASK_COLOURS[label]
    others = [c for c in COLOUR_TASK_COLOURS if c != target]
    while True:
        placements = random_placements(rng, count=int(rng.integers(1, 4)), size=size, side_fraction=(0.15, 0.45))
        colours = [target] + [str(rng.choice(others)) for _ in placements[1:]]
        scene = render_scene([dataclasses.replace(p, colour=c) for p, c in zip(placements, colours)], rng, size=size)
        areas = scene.colour_areas().most_common()
        runner_up = areas[1][1] if len(areas) > 1 else 0
        if areas[0][0] == target and areas[0][1] >= DOMINANCE_MARGIN * runner_up:
            return Example(scene.image, target, label)


def _make_count(rng: np.random.Generator, size: int) -> Example:
    count = int(rng.integers(1, MAX_COUNT + 1))
    placements = cell_placements(rng, count=count, size=size, cells=COUNT_CELLS, side_fraction=(0.65, 0.875))
    scene = render_scene(placements, rng, size=size)
    return Example(scene.image, str(scene.count), scene.count - 1)


def _make_location(rng: np.random.Generator, size: int) -> Example:
    scene = render_scene(random_placements(rng, count=1, size=size, side_fraction=LOCATION_SIDE), rng, size=size)
    return Example(scene.image, " ".join(str(v) for v in box_to_grid(scene.objects[0].box, size)))


def _independent(make_one: Callable[[np.random.Generator, int], Example]) -> ExamplesMaker:
    """Rendered examples are independent draws."""
    return lambda rng, size, count: [make_one(rng, size) for _ in range(count)]


def _make_digits(rng: np.random.Generator, size: int, count: int) -> list[Example]:
    """sklearn's 1797 digits drawn without replacement, so train and val never share an image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if count > len(digits.target):
        raise ValueError(f"digits has {len(digits.target)} images; {count} were asked for")
    examples = []
    for index in rng.permutation(len(digits.target))[:count]:
        ink = (digits.images[index] * (255 / 16)).astype(np.uint8)  # 8x8, 0..16 -> 0..255
        grey = np.asarray(Image.fromarray(ink).resize((size, size), Image.Resampling.BILINEAR))
        label = int(digits.target[index])
        examples.append(Example(np.repeat(grey[:, :, None], 3, axis=2), str(label), label))
    return examples


def _embedded_tasks() -> dict[str, EmbeddedTask]:
    return {
        "shape": EmbeddedTask(
            "classify", "accuracy", 0.9, "what shape is the object ?", SHAPES, _independent(_make_shape)
        ),
        "colour": EmbeddedTask(
            "classify", "accuracy", 0.9, "what is the dominant colour in the image ?", COLOUR_TASK_COLOURS,
            _independent(_make_colour),
        ),
        "count": EmbeddedTask(
            "classify", "accuracy", 0.7, "how many objects are in the image ?", COUNT_LABELS, _independent(_make_count)
        ),
        "location": EmbeddedTask(
            "lm", "iou@0.5", 0.7, "where is the object ?", (),
            _independent(_make_location),
        ),
        "digits": EmbeddedTask(
            "classify", "accuracy", 0.9, "what digit is in this image ?", tuple(str(d) for d in range(10)), _make_digits
        ),
    }


EMBEDDED = _embedded_tasks()


def embedded_task(
    kind: str,
    *,
    name: str | None = None,
    image_size: int = 64,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_val: int = DEFAULT_N_VAL,
    requirement: float | None = None,
) -> Task:
    """One embedded task (`kind` is a key of EMBEDDED), optionally renamed or with another requirement."""
    if kind not in EMBEDDED:
        raise ValueError(f"unknown embedded task {kind!r}; known: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[kind]
    rng = np.random.default_rng([seed, zlib.crc32(kind.encode())])
    examples = spec.make(rng, image_size, n_train + n_val)
    return Task(
        name=name or kind,
        head=spec.head,
        metric=spec.metric,
        requirement=spec.requirement if requirement is None else requirement,
        prompt=spec.prompt,
        train=tuple(examples[:n_train]),
        val=tuple(examples[n_train:]),
        labels=spec.labels,
    )


def embedded_suite(
    image_size: int = 64, seed: int = 0, n_train: int = DEFAULT_N_TRAIN, n_val: int = DEFAULT_N_VAL
) -> list[Task]:
    """All embedded tasks, the default of `python -m train`."""
    return [
        embedded_task(kind, image_size=image_size, seed=seed, n_train=n_train, n_val=n_val) for kind in EMBEDDED
    ]
