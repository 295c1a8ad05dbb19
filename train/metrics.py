"""Task metrics: exact-match accuracy and box hit rate (IoU >= 0.5) on text answers.

A model's text answer is compared after `normalize_answer`, so "Red." and "red" agree. Box answers
are four integers "x0 y0 x1 y1"; anything else (missing numbers, extra numbers, an empty or inverted
box) parses to None and scores 0 rather than raising, because a generating model can emit anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Box = tuple[int, int, int, int]

_PUNCTUATION = re.compile(r"[.,?!:;]")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def parse_box(text: str) -> Box | None:
    """The box in a text answer, or None when it is not exactly four integers with x0 < x1, y0 < y1."""
    words = normalize_answer(text).split()
    if len(words) != 4 or not all(word.isascii() and word.isdigit() for word in words):
        return None
    x0, y0, x1, y1 = (int(word) for word in words)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes given as edges (x0, y0, x1, y1)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(width, 0) * max(height, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def accuracy(predictions: Sequence[int | str], targets: Sequence[int | str]) -> float:
    """Share of exact matches; text is compared after `normalize_answer`."""

    def canonical(value: int | str) -> int | str:
        return normalize_answer(value) if isinstance(value, str) else int(value)

    return _mean([canonical(p) == canonical(t) for p, t in zip(predictions, targets, strict=True)])


def box_hit_rate(predictions: Sequence[str], targets: Sequence[str], threshold: float = 0.5) -> float:
    """Share of text answers whose box overlaps the target box with IoU >= threshold."""
    hits = []
    for prediction, target in zip(predictions, targets, strict=True):
        predicted, true = parse_box(prediction), parse_box(target)
        if true is None:
            raise ValueError(f"target answer {target!r} is not a box")
        hits.append(predicted is not None and box_iou(predicted, true) >= threshold)
    return _mean(hits)


def _mean(flags: Sequence[bool]) -> float:
    if not flags:
        raise ValueError("no predictions to score")
    return sum(flags) / len(flags)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "iou@0.5": box_hit_rate,
}
