"""A vision task as the trainer sees it: data, output head, metric and accuracy requirement.

`head` says how the adapter answers: "classify" puts a small trainable head on the last token's
hidden state (one forward pass over a closed label set), "lm" decodes the answer text.

Label names match as the text metric compares answers (`train.metrics.normalize_answer`: case,
punctuation and spacing ignored), so a data row labelled "Red." and a decoded "red" both mean the
label `red`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from train.images import ImageSource
from train.metrics import METRICS, normalize_answer

HEADS = ("classify", "lm")


def label_index(labels: Sequence[str], text: str) -> int:
    """Index of the label `text` names (compared after `normalize_answer`), -1 when it names none."""
    wanted = normalize_answer(text)
    return next((i for i, label in enumerate(labels) if normalize_answer(label) == wanted), -1)


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One image with its answer; `label` indexes the task's labels (-1 for lm tasks).

    `image` is an array for generated data and a file path for real data (decoded when the
    pipeline reads it). `prompt` is set only where each row carries its own question (LLaVA
    conversations); otherwise the task's prompt applies.
    """

    image: ImageSource
    answer: str
    label: int = -1
    prompt: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    name: str
    head: str
    metric: str
    requirement: float
    prompt: str
    train: Sequence[Example]
    val: Sequence[Example]
    labels: tuple[str, ...] = ()
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)  # data rows skipped, count per reason

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"task {self.name!r}: head {self.head!r} is not one of {HEADS}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} is not one of {tuple(METRICS)}")
        if self.head == "classify" and (self.metric != "accuracy" or len(self.labels) < 2):
            raise ValueError(f"task {self.name!r}: a classify head needs metric accuracy and at least two labels")
        if len({normalize_answer(label) for label in self.labels}) != len(self.labels):
            raise ValueError(f"task {self.name!r}: labels {list(self.labels)} repeat (ignoring case and punctuation)")
        if self.head == "lm" and self.labels:
            raise ValueError(f"task {self.name!r}: labels apply to classify heads only")
        if not 0.0 <= self.requirement <= 1.0:
            raise ValueError(f"task {self.name!r}: requirement {self.requirement} is outside [0, 1]")
        if not self.train or not self.val:
            raise ValueError(f"task {self.name!r}: needs at least one train and one val example")

    def prompt_of(self, example: Example) -> str:
        return self.prompt if example.prompt is None else example.prompt

    def score(self, predictions: Sequence[int | str]) -> float:
        """The task's metric over its val split: label indices for classify heads, answer texts for lm."""
        targets = [ex.label if self.head == "classify" else ex.answer for ex in self.val]
        return METRICS[self.metric](predictions, targets)
