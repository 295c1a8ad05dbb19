"""The embedded suite, checked against ground truth measured independently from the pixels."""

import numpy as np
import pytest
from scipy import ndimage

from train.embedded import (
    BOX_GRID, COLOUR_TASK_COLOURS, COUNT_CELLS, DOMINANCE_MARGIN, EMBEDDED, MAX_COUNT, SHAPE_JITTER, SHAPE_SIDE, box_to_grid,
    embedded_suite, embedded_task,
)
from train.metrics import parse_box
from train.scenes import PALETTE, SHAPES

SIZE = 48


@pytest.fixture(scope="module")
def suite():
    return {task.name: task for task in embedded_suite(image_size=SIZE, seed=7, n_train=40, n_val=20)}


def object_pixels(image: np.ndarray) -> np.ndarray:
    """Objects have a channel above 120; the background stays below 50 plus a little noise."""
    return image.max(axis=-1) > 120


def test_suite_has_the_five_tasks_with_their_heads_metrics_and_requirements(suite):
    described = {n: (t.head, t.metric, t.requirement) for n, t in suite.items()}
    assert described == {
        "shape": ("classify", "accuracy", 0.9),
        "colour": ("classify", "accuracy", 0.9),
        "count": ("classify", "accuracy", 0.7),
        "location": ("lm", "iou@0.5", 0.7),
        "digits": ("classify", "accuracy", 0.9),
    }
    for task in suite.values():
        assert (len(task.train), len(task.val)) == (40, 20)
        for example in (*task.train, *task.val):
            assert example.image.shape == (SIZE, SIZE, 3) and example.image.dtype == np.uint8
            if task.head == "classify":
                assert task.labels[example.label] == example.answer
            else:
                assert example.label == -1


def test_every_prompt_and_answer_is_in_the_tiny_vocabulary(suite):
    from valora_jax.models.tiny_processor import UNK_ID, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = [f"user: <image> {task.prompt} assistant: {ex.answer}" for task in suite.values() for ex in task.train]
    texts += [label for task in suite.values() for label in task.labels]
    for text in texts:
        assert UNK_ID not in tokenizer(text)["input_ids"], text


def test_shape_answers_cover_the_shapes(suite):
    assert {ex.answer for ex in suite["shape"].train} == set(SHAPES)
    assert suite["shape"].labels == SHAPES


def test_count_answers_match_connected_components(suite):
    counts = []
    for example in suite["count"].train:
        _, components = ndimage.label(object_pixels(example.image))
        assert example.answer == str(components)
        assert suite["count"].labels[example.label] == example.answer
        counts.append(components)
    assert set(counts) == set(range(1, MAX_COUNT + 1))


def test_location_answers_are_the_pixel_box_on_the_grid(suite):
    for example in suite["location"].train:
        rows, cols = np.nonzero(object_pixels(example.image))
        pixel_box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        expected = tuple(int(np.floor(v * BOX_GRID / SIZE + 0.5)) for v in pixel_box)
        assert parse_box(example.answer) == expected
        assert all(0 <= v <= BOX_GRID for v in expected)


def test_colour_answer_dominates_the_object_pixels_by_the_margin(suite):
    palette = np.array([PALETTE[c] for c in COLOUR_TASK_COLOURS], dtype=float)
    for example in suite["colour"].train:
        pixels = example.image[object_pixels(example.image)].astype(float)
        nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
        areas = np.sort(np.bincount(nearest, minlength=len(palette)))[::-1]
        assert COLOUR_TASK_COLOURS[np.bincount(nearest).argmax()] == example.answer
        assert areas[0] >= DOMINANCE_MARGIN * areas[1]


def test_digits_are_sklearn_images_without_train_val_overlap(suite):
    from sklearn.datasets import load_digits

    digits = load_digits()
    task = suite["digits"]
    train = {ex.image.tobytes() for ex in task.train}
    assert not train & {ex.image.tobytes() for ex in task.val}
    example = task.train[0]
    # block-averaging back to 8x8 must land closest to an sklearn image of the same digit
    small = example.image[:, :, 0].reshape(8, SIZE // 8, 8, SIZE // 8).mean(axis=(1, 3))
    nearest = np.argmin(((digits.images * 255 / 16 - small) ** 2).sum(axis=(1, 2)))
    assert str(digits.target[nearest]) == example.answer


def test_box_to_grid_rounds_each_edge_to_the_nearest_line():
    assert box_to_grid((10, 20, 30, 40), 64, 16) == (3, 5, 8, 10)  # 2.5, 5, 7.5, 10
    assert box_to_grid((0, 0, 1, 1), 64, 16) == (0, 0, 1, 1)  # never collapses to an empty box


def test_same_seed_same_data_other_seed_other_data():
    def first_image(seed):
        return embedded_task("location", seed=seed, n_train=2, n_val=1).train[0].image

    assert np.array_equal(first_image(3), first_image(3))
    assert not np.array_equal(first_image(3), first_image(4))


def test_overrides_and_unknown_kind():
    task = embedded_task("count", name="counting", requirement=0.75, n_train=3, n_val=2)
    assert (task.name, task.requirement, len(task.train), len(task.val)) == ("counting", 0.75, 3, 2)
    with pytest.raises(ValueError, match="unknown embedded task"):
        embedded_task("weather")
    assert set(EMBEDDED) == {"shape", "colour", "count", "location", "digits"}


def test_shape_objects_are_large_and_near_the_centre(suite):
    for example in suite["shape"].train:
        rows, cols = np.nonzero(object_pixels(example.image))
        side = max(cols.max() - cols.min(), rows.max() - rows.min()) + 1
        assert SHAPE_SIDE[0] * SIZE - 2 <= side <= SHAPE_SIDE[1] * SIZE + 1
        margin = (SIZE - side) / 2
        for low, high in ((cols.min(), cols.max()), (rows.min(), rows.max())):
            # triangles and crosses fill their box's extremes, so the extent's midpoint is the box centre
            assert abs((low + high + 1) / 2 - SIZE / 2) <= SHAPE_JITTER * margin + 1.5


def test_count_objects_sit_one_per_layout_cell(suite):
    cell = SIZE // COUNT_CELLS
    for example in suite["count"].train:
        labelled, n = ndimage.label(object_pixels(example.image))
        cells = set()
        for index in range(1, n + 1):
            rows, cols = np.nonzero(labelled == index)
            assert rows.min() // cell == rows.max() // cell and cols.min() // cell == cols.max() // cell
            cells.add((rows.min() // cell, cols.min() // cell))
        assert len(cells) == n
