import numpy as np
import pytest

from train.scenes import (
    PALETTE, Placement, cell_placements, centred_placement, random_placements, render_scene, shape_mask,
)

BOX = (10, 10, 40, 40)  # a 30 x 30 box


def test_square_and_cross_fill_exact_areas():
    assert shape_mask("square", BOX, 64).sum() == 30 * 30
    # a plus of three 10-pixel bands: two 30 x 10 bars minus their 10 x 10 overlap
    assert shape_mask("cross", BOX, 64).sum() == 2 * 30 * 10 - 10 * 10


def test_circle_triangle_diamond_areas_are_near_their_geometric_share():
    assert shape_mask("circle", BOX, 64).sum() / 900 == pytest.approx(np.pi / 4, abs=0.03)
    assert shape_mask("triangle", BOX, 64).sum() / 900 == pytest.approx(0.5, abs=0.04)
    assert shape_mask("diamond", BOX, 64).sum() / 900 == pytest.approx(0.5, abs=0.04)


def test_triangle_points_up_and_diamond_is_widest_in_the_middle():
    triangle, diamond = shape_mask("triangle", BOX, 64), shape_mask("diamond", BOX, 64)
    assert triangle[10].sum() <= 2 and triangle[39].sum() == 30
    assert diamond[10].sum() <= 2 and diamond[39].sum() <= 2 and diamond[24:26].sum(axis=1).max() >= 29


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", BOX, 64)


def test_render_reports_the_drawn_box_area_and_exact_colour():
    rng = np.random.default_rng(0)
    scene = render_scene([Placement("square", "blue", (10, 20, 30, 40))], rng, noise=0, colour_jitter=0)
    (obj,) = scene.objects
    assert (obj.shape, obj.colour, obj.box, obj.area) == ("square", "blue", (10, 20, 30, 40), 400)
    assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
    assert (scene.image[20:40, 10:30] == PALETTE["blue"]).all()
    assert not (scene.image[:20] == PALETTE["blue"]).all(axis=-1).any()


def test_later_objects_cover_earlier_ones_and_decide_the_dominant_colour():
    placements = [Placement("square", "red", (0, 0, 20, 20)), Placement("square", "green", (10, 10, 30, 30))]
    scene = render_scene(placements, np.random.default_rng(0), size=32, noise=0, colour_jitter=0)
    red, green = scene.objects
    assert red.area == 400 - 100 and red.box == (0, 0, 20, 20)
    assert green.area == 400
    assert scene.count == 2 and scene.dominant_colour == "green"


def test_same_seed_same_pixels_other_seed_other_pixels():
    def scene(seed):
        rng = np.random.default_rng(seed)
        return render_scene(random_placements(rng, count=3), rng)

    assert np.array_equal(scene(1).image, scene(1).image)
    assert scene(1).objects == scene(1).objects
    assert not np.array_equal(scene(1).image, scene(2).image)


def test_random_placements_keep_the_gap_and_stay_inside():
    rng = np.random.default_rng(3)
    for _ in range(20):
        boxes = [p.box for p in random_placements(rng, count=5, size=64, side_fraction=(0.12, 0.22), gap=2)]
        assert len(boxes) == 5
        for i, a in enumerate(boxes):
            assert 0 <= a[0] < a[2] <= 64 and 0 <= a[1] < a[3] <= 64
            for b in boxes[i + 1:]:
                assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]


def test_impossible_placement_is_an_error():
    with pytest.raises(ValueError, match="could not place"):
        random_placements(np.random.default_rng(0), count=5, size=16, side_fraction=(0.9, 0.9), max_tries=50)


def test_cell_placements_put_each_object_inside_its_own_cell():
    rng = np.random.default_rng(4)
    for _ in range(20):
        boxes = [p.box for p in cell_placements(rng, count=5, size=64, cells=4, side_fraction=(0.6, 0.8))]
        cells = [(b[0] // 16, b[1] // 16) for b in boxes]
        assert len(set(cells)) == 5
        for (x0, y0, x1, y1), (col, row) in zip(boxes, cells):
            assert 10 <= x1 - x0 == y1 - y0 <= 13  # 0.6 and 0.8 of a 16-pixel cell, rounded
            assert x0 % 16 >= 1 and y0 % 16 >= 1  # a margin of 1 pixel inside the cell
            assert x1 // 16 == col and y1 // 16 == row  # and 1 pixel before the next cell


def test_cell_placements_reject_what_cannot_fit():
    with pytest.raises(ValueError, match="one per cell"):
        cell_placements(np.random.default_rng(0), count=10, cells=3)
    with pytest.raises(ValueError, match="do not fit cells"):
        cell_placements(np.random.default_rng(0), count=1, size=64, cells=4, side_fraction=(1.0, 1.0))


def test_centred_placement_stays_within_its_jitter():
    rng = np.random.default_rng(5)
    offsets = set()
    for _ in range(200):
        x0, y0, x1, y1 = centred_placement(rng, size=64, side_fraction=(0.5, 0.5), jitter=0.25).box
        assert x1 - x0 == y1 - y0 == 32
        offsets |= {x0 - 16, y0 - 16}
    assert offsets == set(range(-4, 5))  # margin 16, a quarter of it each way
