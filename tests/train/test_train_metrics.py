import pytest

from train.metrics import accuracy, box_hit_rate, box_iou, normalize_answer, parse_box


@pytest.mark.parametrize(
    "text, box",
    [
        ("12 40 30 58", (12, 40, 30, 58)),
        (" 12  40 30 58 . ", (12, 40, 30, 58)),
        ("0 0 1 1", (0, 0, 1, 1)),
        ("12 40 30", None),
        ("12 40 30 58 60", None),
        ("the box is 12 40 30 58", None),
        ("a b c d", None),
        ("30 40 12 58", None),  # x1 < x0
        ("12 40 30 40", None),  # empty height
        ("-1 2 3 4", None),
        ("1.5 2 3 4", None),
        ("", None),
    ],
)
def test_parse_box(text, box):
    assert parse_box(text) == box


@pytest.mark.parametrize(
    "a, b, iou",
    [
        ((0, 0, 4, 4), (0, 0, 4, 4), 1.0),
        ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),  # overlap 1, union 4 + 4 - 1
        ((0, 0, 4, 4), (0, 0, 2, 2), 4 / 16),
        ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),  # touching edges
        ((0, 0, 2, 2), (5, 5, 6, 6), 0.0),
    ],
)
def test_box_iou(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_box_hit_rate_counts_iou_of_exactly_half_and_scores_malformed_text_zero():
    targets = ["0 0 4 4"] * 4
    predictions = ["0 0 4 2", "0 0 4 1", "nonsense", "0 0 4 4"]  # IoU 0.5, 0.25, malformed, 1
    assert box_hit_rate(predictions, targets) == pytest.approx(2 / 4)


def test_box_hit_rate_rejects_a_target_that_is_not_a_box():
    with pytest.raises(ValueError, match="not a box"):
        box_hit_rate(["0 0 1 1"], ["red"])


def test_accuracy_normalises_text_and_compares_labels():
    assert normalize_answer(" Red.  Square ") == "red square"
    assert accuracy(["Red.", "blue", "3"], ["red", "green", "3"]) == pytest.approx(2 / 3)
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == pytest.approx(0.5)


def test_accuracy_of_nothing_and_of_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


def test_task_score_uses_val_labels_or_answers(make_task):
    classify = make_task("c", n_val=4)  # val labels: 0 1 0 1
    assert classify.score([0, 1, 1, 1]) == pytest.approx(3 / 4)
    lm = make_task("t", head="lm", n_train=1, n_val=2)  # val answers: "answer 1", "answer 2"
    assert lm.score(["Answer 1.", "answer 3"]) == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(head="regress"), "head"),
        (dict(metric="bleu"), "metric"),
        (dict(metric="iou@0.5"), "classify head"),
        (dict(requirement=1.5), "requirement"),
    ],
)
def test_task_rejects_inconsistent_definitions(make_task, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_task("bad", **kwargs)
