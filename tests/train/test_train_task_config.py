import json
import textwrap

import numpy as np
import pytest
from PIL import Image

from train.embedded import DEFAULT_N_TRAIN, DEFAULT_N_VAL, EMBEDDED, embedded_task
from train.task_config import (
    DEFAULT_TASKS_FILE, EmbeddedTaskSpec, JsonlTaskSpec, TaskConfigError, build_task, load_task_specs, load_tasks,
)


def write_yaml(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_default_file_describes_the_embedded_suite():
    specs = load_task_specs(DEFAULT_TASKS_FILE)
    assert specs == [
        EmbeddedTaskSpec(kind, kind, EMBEDDED[kind].requirement, DEFAULT_N_TRAIN, DEFAULT_N_VAL) for kind in EMBEDDED
    ]


def test_embedded_spec_builds_the_same_task_as_embedded_task(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", """
        tasks:
          - source: embedded/location
            name: where
            requirement: 0.8
            n_train: 3
            n_val: 2
    """)
    (task,) = load_tasks(path, image_size=32, seed=5)
    reference = embedded_task("location", image_size=32, seed=5, n_train=3, n_val=2)
    assert (task.name, task.requirement, task.head, task.metric) == ("where", 0.8, "lm", "iou@0.5")
    assert [e.answer for e in task.train] == [e.answer for e in reference.train]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(task.val, reference.val))


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / "data" / "img" / f"{i}.png")
    rows = [{"image": f"img/{i}.png", "label": "odd" if i % 2 else "even"} for i in range(10)]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "data" / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]))
    return tmp_path


def test_jsonl_task_paths_resolve_against_the_yaml_folder(data_dir):
    path = write_yaml(data_dir / "tasks.yaml", """
        tasks:
          - source: jsonl
            name: parity
            path: data/train.jsonl
            head: classify
            requirement: 0.9
            prompt: is it odd or even ?
            labels: [even, odd]
            val_fraction: 0.3
    """)
    (spec,) = load_task_specs(path)
    assert spec == JsonlTaskSpec(
        "parity", (data_dir / "data" / "train.jsonl").resolve(), None, "classify", "accuracy", 0.9,
        "is it odd or even ?", ("even", "odd"), 0.3, None,
    )
    task = build_task(spec, seed=0)
    assert (len(task.train), len(task.val)) == (7, 3)
    assert {e.answer: e.label for e in task.train + task.val} == {"even": 0, "odd": 1}


def test_separate_val_file_and_image_root(data_dir):
    path = write_yaml(data_dir / "tasks.yaml", """
        tasks:
          - source: jsonl
            name: parity
            path: data/train.jsonl
            val_path: data/val.jsonl
            image_root: data
            head: lm
            metric: accuracy
            requirement: 0.5
            prompt: is it odd or even ?
    """)
    (task,) = load_tasks(path)
    assert (len(task.train), len(task.val)) == (10, 3)
    assert task.val[0].image == (data_dir / "data" / "img" / "0.png").resolve()
    assert task.skipped == {}


def test_skipped_rows_of_both_files_are_counted_on_the_task(data_dir):
    with (data_dir / "data" / "train.jsonl").open("a") as file:
        file.write('\n{"image": "img/absent.png", "label": "odd"}\n{"image": "img/1.png", "label": "three"}')
    with (data_dir / "data" / "val.jsonl").open("a") as file:
        file.write('\n{"image": "img/gone.png", "label": "even"}\nnot json')
    path = write_yaml(data_dir / "tasks.yaml", """
        tasks:
          - source: jsonl
            name: parity
            path: data/train.jsonl
            val_path: data/val.jsonl
            head: classify
            requirement: 0.5
            prompt: is it odd or even ?
            labels: [Even, Odd]
    """)
    (task,) = load_tasks(path)
    assert task.skipped == {"missing image": 2, "unknown label": 1, "malformed json": 1}
    assert (len(task.train), len(task.val)) == (10, 3)
    # rows spell the labels "even" / "odd": they match ignoring case, and take the task's spelling
    assert {e.answer: e.label for e in task.train} == {"Even": 0, "Odd": 1}


JSONL_TASK = """
tasks:
  - source: jsonl
    name: parity
    path: data.jsonl
    head: classify
    requirement: 0.9
    prompt: odd or even ?
    labels: [even, odd]
"""


@pytest.mark.parametrize(
    "edit, field, problem",
    [
        (("requirement: 0.9", "requirement: 0.9\n    colour: red"), "colour", "unknown"),
        (("    requirement: 0.9\n", ""), "requirement", "missing"),
        (("requirement: 0.9", "requirement: 1.5"), "requirement", "outside"),
        (("requirement: 0.9", "requirement: high"), "requirement", "expected int or float"),
        (("head: classify", "head: regress"), "head", "not one of"),
        (("head: classify", "head: classify\n    metric: iou@0.5"), "metric", "accuracy"),
        (("    labels: [even, odd]\n", ""), "labels", "missing"),
        (("labels: [even, odd]", "labels: [even]"), "labels", "at least two"),
        (("labels: [even, odd]", "labels: [even, even]"), "labels", "repeat"),
        (("labels: [even, odd]", "labels: [even, Even.]"), "labels", "ignoring case and punctuation"),
        (("labels: [even, odd]", "labels: [even, '?']"), "labels", "only of punctuation"),
        (("head: classify", "head: lm"), "labels", "classify only"),
        (("prompt: odd or even ?", "prompt: ''"), "prompt", "empty"),
        (("requirement: 0.9", "requirement: 0.9\n    val_fraction: 0\n    val_path: v.jsonl"), "val_path", "either"),
        (("requirement: 0.9", "requirement: 0.9\n    val_fraction: 0"), "val_fraction", "outside"),
        (("source: jsonl", "source: csv"), "source", "neither"),
    ],
)
def test_errors_name_the_file_the_task_and_the_field(tmp_path, edit, field, problem):
    old, new = edit
    path = write_yaml(tmp_path / "bad.yaml", JSONL_TASK.replace(old, new))
    with pytest.raises(TaskConfigError) as error:
        load_task_specs(path)
    message = str(error.value)
    assert str(path) in message and "task 0 ('parity')" in message
    assert f"field {field!r}" in message and problem in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ("tasks:\n  - source: embedded/weather\n", "unknown embedded task 'weather'"),
        ("tasks:\n  - source: embedded/shape\n    n_train: 0\n", "must be positive"),
        ("tasks:\n  - source: embedded/shape\n    head: lm\n", "field 'head': unknown"),
        ("tasks:\n  - source: embedded/shape\n  - source: embedded/shape\n", "repeated: shape"),
        ("tasks: []\n", "non-empty list"),
        ("model: tiny\ntasks:\n  - source: embedded/shape\n", "exactly one key"),
        ("tasks:\n  - just a string\n", "task 0: expected a mapping"),
        ("tasks:\n  - {source: embedded/shape\n", "cannot read"),
    ],
)
def test_file_and_embedded_errors(tmp_path, text, problem):
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(TaskConfigError, match=str(path)) as error:
        load_task_specs(path)
    assert problem in str(error.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(TaskConfigError, match="cannot read"):
        load_task_specs(tmp_path / "absent.yaml")
