"""The slot-sorted, tile-padded layout holds every token once, in one-adapter tiles."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.grouping import group_tokens, padded_rows


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_layout_holds_each_token_once_in_single_slot_tiles(data):
    num_slots = data.draw(st.integers(1, 6), label="N")
    block_t = data.draw(st.sampled_from([1, 2, 8, 16]), label="block_t")
    include_unadapted = data.draw(st.booleans(), label="include_unadapted")
    slot_ids = np.array(data.draw(st.lists(st.integers(-1, num_slots), min_size=1, max_size=40)), np.int32)
    g = group_tokens(slot_ids, num_slots, block_t, include_unadapted)
    row_token, token_row = np.asarray(g.row_token), np.asarray(g.token_row)
    tile_slot, num_tiles = np.asarray(g.tile_slot), int(np.asarray(g.num_tiles)[0])
    total_rows = padded_rows(len(slot_ids), num_slots, block_t, include_unadapted)
    assert row_token.shape == (total_rows,) and tile_slot.shape == (total_rows // block_t,)

    key = np.where((slot_ids >= 0) & (slot_ids < num_slots), slot_ids, num_slots)
    kept = np.flatnonzero(include_unadapted | (key < num_slots))
    assert sorted(row_token[row_token >= 0]) == list(kept)
    np.testing.assert_array_equal(row_token[token_row[kept]], kept)
    assert (token_row[np.setdiff1d(np.arange(len(slot_ids)), kept)] == total_rows).all()
    assert (token_row[kept] < num_tiles * block_t).all()
    np.testing.assert_array_equal(tile_slot[token_row[kept] // block_t], key[kept])
    assert (np.diff(tile_slot[:num_tiles]) >= 0).all() and (tile_slot[num_tiles:] == num_slots).all()
    # each non-empty segment takes exactly ceil(count / block_t) tiles
    counts = np.bincount(key[kept], minlength=num_slots + 1)
    assert num_tiles == sum(-(-c // block_t) for c in counts)
