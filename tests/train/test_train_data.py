import json
import logging

import numpy as np
import pytest
from PIL import Image

from train.data import NAMED_SKIPS, DataError, read_jsonl, split_examples
from train.images import read_rgb


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "text.png").write_bytes(b"this is not an image")
    whole = (tmp_path / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def conversation(image, question, answer):
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]}


def test_good_rows_become_examples(images):
    path = write_jsonl(images / "d.jsonl", [
        conversation("red.png", "what colour ?", "red"),
        "",  # blank lines are not rows
        {"image": "blue.png", "label": "blue"},
    ])
    examples, report = read_jsonl(path, head="classify", labels=("red", "blue"))
    assert report.total == 0
    first, second = examples
    assert (first.prompt, first.answer, first.label, first.image) == ("what colour ?", "red", 0, images / "red.png")
    assert (second.prompt, second.answer, second.label) == (None, "blue", 1)


def test_labels_match_ignoring_case_and_punctuation_and_take_the_tasks_spelling(images):
    path = write_jsonl(images / "d.jsonl", [{"image": "red.png", "label": "RED."},
                                            {"image": "blue.png", "label": "Blue"}])
    examples, report = read_jsonl(path, head="classify", labels=("red", "blue"))
    assert report.total == 0 and [(e.answer, e.label) for e in examples] == [("red", 0), ("blue", 1)]


def test_lm_rows_keep_their_text_and_no_label(images):
    path = write_jsonl(images / "d.jsonl", [conversation("red.png", "describe", "a red square")])
    (example,), _ = read_jsonl(path, head="lm")
    assert (example.answer, example.label) == ("a red square", -1)


def test_bad_rows_are_skipped_counted_by_reason_and_the_first_named(images, caplog):
    rows = [
        {"image": "red.png", "label": "red"},                # 1 good
        '{"image": "red.png", "label": ',                     # 2 malformed json
        {"image": "gone.png", "label": "red"},                # 3 missing image
        {"label": "red"},                                     # 4 missing image (no key)
        {"image": "text.png", "label": "red"},                # 5 undecodable
        {"image": "cut.png", "label": "red"},                 # 6 undecodable (truncated)
        conversation("red.png", "what ?", "  "),              # 7 empty answer
        {"image": "red.png", "label": "green"},               # 8 unknown label
        [1, 2],                                               # 9 malformed row
        {"image": "red.png"},                                 # 10 malformed row
        {"image": "red.png", "conversations": [{"from": "gpt", "value": "red"}]},  # 11 malformed row
        conversation("blue.png", "which ?", "blue"),          # 12 good
    ]
    path = write_jsonl(images / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        examples, report = read_jsonl(path, head="classify", labels=("red", "blue"))
    assert [e.answer for e in examples] == ["red", "blue"]
    assert dict(report.counts) == {
        "malformed json": 1, "missing image": 2, "undecodable image": 2, "empty answer": 1,
        "unknown label": 1, "malformed row": 3,
    }
    assert report.total == 10
    assert [(line, reason) for line, reason, _ in report.named] == [
        (2, "malformed json"), (3, "missing image"), (4, "missing image"), (5, "undecodable image"),
        (6, "undecodable image"),
    ][:NAMED_SKIPS]
    summary = report.summary()
    assert "skipped 10 rows" in summary and "line 3: missing image" in summary and "gone.png" in summary
    assert summary in caplog.text


def test_a_file_without_usable_rows_is_an_error(images):
    path = write_jsonl(images / "d.jsonl", ["not json", {"image": "text.png", "label": "red"}])
    with pytest.raises(DataError, match=r"no usable rows(.|\n)*1 malformed json"):
        read_jsonl(path, head="classify", labels=("red", "blue"))


def test_image_root_overrides_the_file_folder(images, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("rows")
    path = write_jsonl(elsewhere / "d.jsonl", [{"image": "red.png", "label": "red"}])
    (example,), _ = read_jsonl(path, head="lm", image_root=images)
    assert example.image == images / "red.png"


def test_split_is_seeded_disjoint_and_sized_by_fraction():
    examples = list(range(10))
    train, val = split_examples(examples, 0.3, seed=1)
    assert len(val) == 3 and sorted(train + val) == examples
    assert (train, val) == split_examples(examples, 0.3, seed=1)
    assert split_examples(examples, 0.3, seed=2) != (train, val)
    assert [len(part) for part in split_examples(examples, 0.01, seed=0)] == [9, 1]
    assert [len(part) for part in split_examples(examples, 1.0, seed=0)] == [1, 9]
    with pytest.raises(DataError):
        split_examples([1], 0.5, seed=0)


def test_read_rgb_fits_files_and_arrays_to_a_square(images):
    fitted = read_rgb(images / "red.png", 8)  # 20 x 10 -> shortest edge 8, centre crop
    assert fitted.shape == (8, 8, 3) and fitted.dtype == np.uint8
    assert (fitted == (255, 0, 0)).all()
    grey = np.zeros((4, 6, 3), dtype=np.uint8)
    assert read_rgb(grey, 2).shape == (2, 2, 3)
    same = np.ones((5, 5, 3), dtype=np.uint8)
    assert read_rgb(same, 5) is same
