"""Serve what a run produced: its validation examples as an OpenAI Batch file, and the served answers' scores.

At the end of a run, `write_requests` puts under `<out>/served/`:
- `requests.jsonl`: one chat completion per validation example of every task (`python -m serve.batch`'s
  input), `body.model` = the adapter that holds the task; a classify task with a head asks it through
  the `classify` extension field, any other task decodes greedily up to the answers' token window;
- `targets.jsonl`: per request, its task and the expected answer;
- `lora_modules.txt`: `NAME=DIR` per adapter, the `--lora-modules` arguments.

`python -m train.served OUT` scores `<out>/served/responses.jsonl` (what serve.batch wrote) with each
task's metric and prints the scores beside the report's. They agree when serving answers as training's
evaluation did (same adapters, examples, prompts and greedy decoding); the command exits 1 otherwise.
The dependency runs through files only: train/ never imports serve/.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from train.images import read_rgb
from train.report import Report
from train.tasks import METRICS, Task, label_index

SERVED_DIR = "served"
REQUESTS, TARGETS, RESPONSES, LORA_MODULES = "requests.jsonl", "targets.jsonl", "responses.jsonl", "lora_modules.txt"


def data_url(image: np.ndarray) -> str:
    """A PNG data URL (lossless, so the served pixels are training's)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_requests(out: pathlib.Path, tasks: Sequence[Task], report: Report, *, image_size: int,
                   max_tokens: int) -> pathlib.Path:
    """Write `<out>/served/` for the run's published adapters; returns that directory."""
    served = out / SERVED_DIR
    served.mkdir(parents=True, exist_ok=True)
    adapter_of = {row.name: row.adapter for row in report.tasks}
    requests, targets = [], []
    for task in tasks:
        for i, example in enumerate(task.val):
            custom_id = f"{task.name}-{i}"
            body = {"model": adapter_of[task.name], "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": data_url(read_rgb(example.image, image_size))}},
                        {"type": "text", "text": task.prompt_of(example)}]}]}
            if task.head == "classify":
                body["classify"] = task.name
            requests.append({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            targets.append({"custom_id": custom_id, "task": task.name, "metric": task.metric, "head": task.head,
                            "labels": list(task.labels),
                            "target": example.label if task.head == "classify" else example.answer})
    for name, rows in ((REQUESTS, requests), (TARGETS, targets)):
        (served / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    modules = [f"{row.name}={(out / 'adapters' / row.name).resolve()}" for row in report.adapters]
    (served / LORA_MODULES).write_text(" ".join(modules) + "\n", encoding="utf-8")
    return served


def served_scores(served: pathlib.Path) -> dict[str, float]:
    """Each task's metric over the served answers in `responses.jsonl` (a failed request scores as wrong)."""
    targets = [json.loads(line) for line in (served / TARGETS).read_text().splitlines()]
    answers = {}
    for line in (served / RESPONSES).read_text().splitlines():
        row = json.loads(line)
        body = (row.get("response") or {}).get("body") or {}
        choices = body.get("choices") or [{}]
        answers[row["custom_id"]] = ((choices[0].get("message") or {}).get("content") or "").strip()
    predictions: dict[str, list] = {}
    expected: dict[str, list] = {}
    for target in targets:
        answer = answers.get(target["custom_id"], "")
        prediction = label_index(target["labels"], answer) if target["head"] == "classify" else answer
        predictions.setdefault(target["task"], []).append(prediction)
        expected.setdefault(target["task"], []).append(target["target"])
    metric = {t["task"]: t["metric"] for t in targets}
    return {task: METRICS[metric[task]](predictions[task], expected[task]) for task in predictions}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.served", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=pathlib.Path, help="the run's --out folder")
    args = p.parse_args(argv)
    served = args.out / SERVED_DIR
    for name in (TARGETS, RESPONSES):
        if not (served / name).is_file():
            p.error(f"{served / name} does not exist: run the job, then python -m serve.batch "
                    f"-i {served / REQUESTS} -o {served / RESPONSES}")
    report = json.loads((args.out / "report.json").read_text())
    scores = served_scores(served)
    table = Table(title="served answers (serve.batch) against the training report")
    for column in ("task", "adapter", "report score", "served score", "agree"):
        table.add_column(column)
    agree = True
    for row in report["tasks"]:
        same = abs(scores[row["name"]] - row["adapter_score"]) < 1e-9
        agree &= same
        table.add_row(row["name"], row["adapter"], f"{row['adapter_score']:.3f}", f"{scores[row['name']]:.3f}",
                      "yes" if same else "NO")
    Console().print(table)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
