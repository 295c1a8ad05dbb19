"""The YAML task file of `python -m train --tasks FILE`, validated before any data is read.

    tasks:
      - source: embedded/shape        # a task of the embedded suite (train.embedded.EMBEDDED)
        name: shape                   # optional, default: the embedded kind
        requirement: 0.9              # optional, default: the embedded task's
        n_train: 1024                 # optional
        n_val: 100                    # optional
      - source: jsonl                 # real data (train.data)
        name: birds
        path: data/birds.jsonl
        image_root: data/images       # optional, default: the JSONL file's folder
        head: classify                # classify | lm
        metric: accuracy              # accuracy | iou@0.5 (lm only); default accuracy
        requirement: 0.9
        prompt: what bird is this ?   # for label rows; conversation rows carry their own
        labels: [sparrow, robin]      # classify only; rows match them ignoring case and punctuation
        val_fraction: 0.2             # or val_path: a separate JSONL file; default 0.2

Relative paths resolve against the YAML file's folder, so a task file can travel with its data.
Every error names the file, the task and the field, because a typo found after minutes of
training is expensive.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections import Counter

import yaml

from train.data import read_jsonl, split_examples
from train.embedded import DEFAULT_N_TRAIN, DEFAULT_N_VAL, EMBEDDED, embedded_task
from train.metrics import METRICS, normalize_answer
from train.tasks import HEADS, Task

DEFAULT_TASKS_FILE = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tasks" / "default.yaml"
DEFAULT_VAL_FRACTION = 0.2
EMBEDDED_PREFIX = "embedded/"


class TaskConfigError(ValueError):
    """A task file that cannot describe a task suite."""


@dataclasses.dataclass(frozen=True)
class EmbeddedTaskSpec:
    name: str
    kind: str
    requirement: float | None
    n_train: int
    n_val: int


@dataclasses.dataclass(frozen=True)
class JsonlTaskSpec:
    name: str
    path: pathlib.Path
    image_root: pathlib.Path | None
    head: str
    metric: str
    requirement: float
    prompt: str
    labels: tuple[str, ...]
    val_fraction: float | None
    val_path: pathlib.Path | None


TaskSpec = EmbeddedTaskSpec | JsonlTaskSpec

_EMBEDDED_KEYS = {"source", "name", "requirement", "n_train", "n_val"}
_JSONL_KEYS = {
    "source", "name", "path", "image_root", "head", "metric", "requirement", "prompt", "labels",
    "val_fraction", "val_path",
}


class _Fields:
    """Typed reads of one task's mapping; every failure names file, task and field."""

    def __init__(self, file: pathlib.Path, index: int, entry: dict):
        self.file, self.index, self.entry = file, index, entry
        self.name = entry.get("name") if isinstance(entry.get("name"), str) else None

    def error(self, field: str | None, problem: str) -> TaskConfigError:
        task = f"task {self.index}" + (f" ({self.name!r})" if self.name else "")
        where = f", field {field!r}" if field else ""
        return TaskConfigError(f"{self.file}: {task}{where}: {problem}")

    def check_keys(self, allowed: set[str], source: str) -> None:
        unknown = sorted(set(self.entry) - allowed)
        if unknown:
            raise self.error(unknown[0], f"unknown for source {source!r}; allowed: {', '.join(sorted(allowed))}")

    def get(self, field: str, kind: type | tuple[type, ...], default=dataclasses.MISSING):
        if field not in self.entry:
            if default is dataclasses.MISSING:
                raise self.error(field, "missing")
            return default
        value = self.entry[field]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(field, f"expected {expected}, got {value!r}")
        return value

    def text(self, field: str, default=dataclasses.MISSING) -> str:
        value = self.get(field, str, default)
        if isinstance(value, str) and not value.strip():
            raise self.error(field, "empty")
        return value

    def choice(self, field: str, options, default=dataclasses.MISSING) -> str:
        value = self.text(field, default)
        if value not in options:
            raise self.error(field, f"{value!r} is not one of {', '.join(options)}")
        return value

    def fraction(self, field: str, low_open: bool, default=dataclasses.MISSING) -> float | None:
        value = self.get(field, (int, float), default)
        if value is not None and not ((0 < value if low_open else 0 <= value) and value <= 1):
            raise self.error(field, f"{value} is outside {'(0' if low_open else '[0'}, 1]")
        return None if value is None else float(value)

    def count(self, field: str, default: int) -> int:
        value = self.get(field, int, default)
        if value < 1:
            raise self.error(field, f"must be positive, got {value}")
        return value

    def path(self, field: str, default=dataclasses.MISSING) -> pathlib.Path | None:
        value = self.text(field, default)
        return None if value is None else (self.file.parent / value).resolve()


def load_task_specs(path: str | pathlib.Path, text: str | None = None) -> list[TaskSpec]:
    """Parse and validate a task file without reading any data.

    `text` is the file's content when it comes from elsewhere (a run folder's record, for --resume);
    relative paths still resolve against `path`'s folder.
    """
    file = pathlib.Path(path)
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8") if text is None else text)
    except (OSError, yaml.YAMLError) as error:
        raise TaskConfigError(f"{file}: cannot read task file: {error}") from None
    if not isinstance(document, dict) or set(document) != {"tasks"}:
        raise TaskConfigError(f"{file}: expected a mapping with exactly one key, 'tasks'")
    entries = document["tasks"]
    if not isinstance(entries, list) or not entries:
        raise TaskConfigError(f"{file}: 'tasks' must be a non-empty list")
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TaskConfigError(f"{file}: task {index}: expected a mapping, got {entry!r}")
        specs.append(_parse_task(_Fields(file, index, entry)))
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskConfigError(f"{file}: task names must be unique; repeated: {', '.join(duplicates)}")
    return specs


def _parse_task(fields: _Fields) -> TaskSpec:
    source = fields.text("source")
    if source.startswith(EMBEDDED_PREFIX):
        fields.check_keys(_EMBEDDED_KEYS, source)
        kind = source.removeprefix(EMBEDDED_PREFIX)
        if kind not in EMBEDDED:
            raise fields.error("source", f"unknown embedded task {kind!r}; known: {', '.join(EMBEDDED)}")
        return EmbeddedTaskSpec(
            name=fields.text("name", kind),
            kind=kind,
            requirement=fields.fraction("requirement", low_open=False, default=None),
            n_train=fields.count("n_train", DEFAULT_N_TRAIN),
            n_val=fields.count("n_val", DEFAULT_N_VAL),
        )
    if source != "jsonl":
        raise fields.error("source", f"{source!r} is neither 'jsonl' nor '{EMBEDDED_PREFIX}<name>'")
    fields.check_keys(_JSONL_KEYS, source)
    head = fields.choice("head", HEADS)
    metric = fields.choice("metric", tuple(METRICS), "accuracy")
    if head == "classify" and metric != "accuracy":
        raise fields.error("metric", "a classify head is scored by accuracy")
    labels = _labels(fields, head)
    if "val_path" in fields.entry and "val_fraction" in fields.entry:
        raise fields.error("val_path", "give either val_path or val_fraction, not both")
    val_path = fields.path("val_path", None)
    val_fraction = None if val_path else fields.fraction("val_fraction", low_open=True, default=DEFAULT_VAL_FRACTION)
    return JsonlTaskSpec(
        name=fields.text("name"),
        path=fields.path("path"),
        image_root=fields.path("image_root", None),
        head=head,
        metric=metric,
        requirement=fields.fraction("requirement", low_open=False),
        prompt=fields.text("prompt"),
        labels=labels,
        val_fraction=val_fraction,
        val_path=val_path,
    )


def _labels(fields: _Fields, head: str) -> tuple[str, ...]:
    if head == "lm":
        if "labels" in fields.entry:
            raise fields.error("labels", "labels apply to head: classify only")
        return ()
    labels = fields.get("labels", list)
    if len(labels) < 2 or not all(isinstance(x, (str, int)) and str(x).strip() for x in labels):
        raise fields.error("labels", "expected a list of at least two non-empty names")
    names = tuple(str(x).strip() for x in labels)
    if len({normalize_answer(name) for name in names}) != len(names):
        raise fields.error("labels", "names repeat (labels match ignoring case and punctuation)")
    if not all(normalize_answer(name) for name in names):
        raise fields.error("labels", "a name made only of punctuation can never match")
    return names


def build_task(spec: TaskSpec, *, image_size: int = 64, seed: int = 0) -> Task:
    """The task a spec describes, its data generated or read (bad JSONL rows skipped and logged)."""
    if isinstance(spec, EmbeddedTaskSpec):
        return embedded_task(
            spec.kind, name=spec.name, image_size=image_size, seed=seed,
            n_train=spec.n_train, n_val=spec.n_val, requirement=spec.requirement,
        )
    read = dict(head=spec.head, labels=spec.labels, image_root=spec.image_root)
    examples, skips = read_jsonl(spec.path, **read)
    skipped = Counter(skips.counts)
    if spec.val_path is None:
        train, val = split_examples(examples, spec.val_fraction, seed)
    else:
        val, val_skips = read_jsonl(spec.val_path, **read)
        train = examples
        skipped.update(val_skips.counts)
    return Task(spec.name, spec.head, spec.metric, spec.requirement, spec.prompt, train, val, spec.labels,
                skipped=dict(skipped))


def load_tasks(path: str | pathlib.Path = DEFAULT_TASKS_FILE, *, image_size: int = 64, seed: int = 0) -> list[Task]:
    """Every task of a task file, ready to train."""
    return [build_task(spec, image_size=image_size, seed=seed) for spec in load_task_specs(path)]
