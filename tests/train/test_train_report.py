import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from train.fusion import FusedAdapter, FusionResult
from train.report import MetricsLog, build_report, markdown, print_report, write_report


@pytest.fixture
def report(make_task):
    digits = dataclasses.replace(make_task("digits", requirement=0.9), skipped={"missing image": 2, "unknown label": 1})
    tasks = [make_task("shape", requirement=0.9), digits, make_task("location", head="lm", requirement=0.7)]
    fusion = FusionResult(
        order=("shape", "digits", "location"),
        adapters=(
            FusedAdapter("adapter_0", ("shape", "digits"), {"shape": 0.95, "digits": 0.91}, True),
            FusedAdapter("adapter_1", ("location",), {"location": 0.55}, False),
        ),
        rollbacks=(),
        cannot_meet={"location": 0.6},
    )
    return build_report(
        tasks, {"shape": 0.2, "digits": 0.1, "location": 0.0}, fusion,
        kind="lora", rank=8, trainable_parameters={"adapter_0": 1234, "adapter_1": 567},
    )


def test_rows_join_base_scores_adapter_scores_and_requirements(report):
    rows = {row.name: row for row in report.tasks}
    assert (rows["shape"].base_score, rows["shape"].adapter_score, rows["shape"].adapter) == (0.2, 0.95, "adapter_0")
    assert [rows[n].met for n in ("shape", "digits", "location")] == [True, True, False]
    assert report.summary == ("3 tasks in 2 adapters; 2 of 3 meet their requirement; "
                              "cannot meet even alone: location (best 0.600)")


def test_files_are_written_with_the_documented_schema(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    document = json.loads(paths["json"].read_text())
    assert [set(row) for row in document["tasks"]] == [
        {"name", "metric", "requirement", "base_score", "adapter_score", "adapter", "met", "skipped_rows"}] * 3
    assert document["tasks"][2] == {"name": "location", "metric": "accuracy", "requirement": 0.7, "base_score": 0.0,
                                    "adapter_score": 0.55, "adapter": "adapter_1", "met": False, "skipped_rows": {}}
    assert document["tasks"][1]["skipped_rows"] == {"missing image": 2, "unknown label": 1}
    assert document["adapters"] == [
        {"name": "adapter_0", "tasks": ["shape", "digits"], "kind": "lora", "rank": 8, "trainable_parameters": 1234},
        {"name": "adapter_1", "tasks": ["location"], "kind": "lora", "rank": 8, "trainable_parameters": 567},
    ]
    assert document["cannot_meet"] == [{"name": "location", "best_score": 0.6}]
    assert document["summary"] == report.summary

    text = paths["markdown"].read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| shape", "| digits", "| location"]
    assert "| location | accuracy | 0.70 | 0.000 | 0.550 | adapter_1 | no | 0 |" in rows
    assert "| digits | accuracy | 0.90 | 0.100 | 0.910 | adapter_0 | yes | 3 |" in rows
    assert "- digits: skipped 2 missing image, 1 unknown label" in text.splitlines()
    assert report.summary in text and text == markdown(report)

    with Image.open(paths["plot"]) as image:
        image.verify()
    with Image.open(paths["plot"]) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height == 400
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # not blank


def test_terminal_table_lists_every_task(report):
    console = Console(record=True, width=120)
    print_report(report, console)
    output = console.export_text()
    for name in ("shape", "digits", "location", "adapter_1", "cannot meet even alone"):
        assert name in output


def test_metrics_log_appends_one_json_object_per_line(tmp_path):
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.append(step=1, adapter="adapter_0", loss=np.float32(2.5), lr=1e-3, examples_per_s=40.0)
    log.append(step=2, adapter="adapter_0", loss=2.0, lr=5e-4, examples_per_s=41.5, eval_scores={"shape": 0.75})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "adapter": "adapter_0", "loss": 2.5, "lr": 1e-3, "examples_per_s": 40.0},
        {"step": 2, "adapter": "adapter_0", "loss": 2.0, "lr": 5e-4, "examples_per_s": 41.5, "eval": {"shape": 0.75}},
    ]
    MetricsLog(tmp_path / "run" / "metrics.jsonl").append(step=3, adapter="adapter_1", loss=1, lr=0, examples_per_s=1)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
