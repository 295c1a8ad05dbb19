"""Real data from JSONL: LLaVA conversation rows and image + label rows, with bad rows skipped.

Accepted rows (one JSON object a line; blank lines are ignored):
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nwhat is it ?"},
                                          {"from": "gpt", "value": "a cat"}]}
    {"image": "a.jpg", "label": "cat"}
A conversation row gives its own prompt (the first human turn, `<image>` removed) and answer (the
gpt turn after it); later turns are ignored. A label row uses the task's prompt and the label as
answer. For a classify task the answer must name one of the task's labels, ignoring case and
punctuation (`train.tasks.label_index`); the example's answer is then that label as the task spells
it. Real data is messy, so a bad row is skipped rather than fatal: each skip is counted by reason and
the first few are named with their line number. A file with no usable row is an error.
Images are decoded once here to find undecodable ones, then again when the pipeline reads them,
so that a large data set never has to sit in memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections import Counter

import numpy as np
from PIL import Image
from tqdm import tqdm

from train.tasks import Example, label_index

logger = logging.getLogger(__name__)

NAMED_SKIPS = 5  # how many skipped rows a report names


class DataError(ValueError):
    """A data file that gives no usable example."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class SkipReport:
    """Skipped rows of one file: a count per reason and the first NAMED_SKIPS with line and detail."""

    path: pathlib.Path
    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    named: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    def add(self, line: int, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.named) < NAMED_SKIPS:
            self.named.append((line, reason, detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return f"{self.path}: no rows skipped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        lines = [f"{self.path}: skipped {self.total} rows ({reasons})"]
        lines += [f"  line {line}: {reason}: {detail}" for line, reason, detail in self.named]
        return "\n".join(lines)


def read_jsonl(
    path: str | pathlib.Path,
    *,
    head: str,
    labels: tuple[str, ...] = (),
    image_root: str | pathlib.Path | None = None,
) -> tuple[list[Example], SkipReport]:
    """Usable examples of a JSONL file and the report of the skipped rows.

    Image paths resolve against `image_root` (default: the file's folder). For a classify head
    every answer must be one of `labels`; its index becomes the example's label.
    """
    path = pathlib.Path(path)
    root = pathlib.Path(image_root) if image_root is not None else path.parent
    report = SkipReport(path)
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(tqdm(lines, desc=f"reading {path.name}", unit=" rows", leave=False), 1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_row(line, head=head, labels=labels, root=root))
            except _Skip as skip:
                report.add(number, skip.reason, skip.detail)
    if report.total:
        logger.warning(report.summary())
    if not examples:
        raise DataError(f"{path}: no usable rows\n{report.summary()}")
    return examples, report


def _parse_row(line: str, *, head: str, labels: tuple[str, ...], root: pathlib.Path) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise _Skip("malformed json", str(error)) from None
    if not isinstance(row, dict):
        raise _Skip("malformed row", "not a JSON object")
    if "conversations" in row:
        prompt, answer = _first_exchange(row["conversations"])
    elif "label" in row:
        prompt, answer = None, str(row["label"]).strip()
    else:
        raise _Skip("malformed row", "neither 'conversations' nor 'label'")
    if not answer:
        raise _Skip("empty answer", "the answer is empty")
    label = -1
    if head == "classify":
        label = label_index(labels, answer)
        if label < 0:
            raise _Skip("unknown label", repr(answer))
        answer = labels[label]
    return Example(_checked_image(row.get("image"), root), answer, label, prompt)


def _first_exchange(conversations) -> tuple[str, str]:
    """Prompt and answer of the first human turn followed by a gpt turn."""
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise _Skip("malformed row", "'conversations' is not a list of turns")
    for turn, reply in zip(conversations, conversations[1:]):
        if turn.get("from") == "human" and reply.get("from") == "gpt":
            prompt = " ".join(str(turn.get("value", "")).replace("<image>", " ").split())
            return prompt, str(reply.get("value", "")).strip()
    raise _Skip("malformed row", "no human turn followed by a gpt turn")


def _checked_image(name, root: pathlib.Path) -> pathlib.Path:
    if not isinstance(name, str) or not name:
        raise _Skip("missing image", "no 'image' path")
    path = root / name
    if not path.is_file():
        raise _Skip("missing image", str(path))
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise _Skip("undecodable image", f"{path}: {error}") from None
    return path


def split_examples(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded random (train, val) split; both sides get at least one example."""
    if len(examples) < 2:
        raise DataError(f"{len(examples)} usable example(s) cannot be split into train and val")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(max(1, round(val_fraction * len(examples))), len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]
