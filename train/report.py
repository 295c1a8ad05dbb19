"""What `python -m train` leaves behind: report.json, report.md, accuracy.png and metrics.jsonl.

The report answers: which adapter serves each task, how much it gained over the base model, whether
it meets its requirement, and how many of its data rows were skipped (per reason; train.data).
metrics.jsonl is appended during training (one JSON object a line), so a crashed or resumed run keeps
its history and any tool can tail it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from train.fusion import FusionResult
from train.run_folder import write_json
from train.tasks import Task


@dataclasses.dataclass(frozen=True)
class TaskRow:
    name: str
    metric: str
    requirement: float
    base_score: float
    adapter_score: float
    adapter: str
    met: bool
    skipped_rows: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> rows skipped

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_rows.values())


@dataclasses.dataclass(frozen=True)
class AdapterRow:
    name: str
    tasks: tuple[str, ...]
    kind: str
    rank: int
    trainable_parameters: int


@dataclasses.dataclass(frozen=True)
class Report:
    tasks: tuple[TaskRow, ...]
    adapters: tuple[AdapterRow, ...]
    cannot_meet: dict[str, float]  # task -> best score reached in any training

    @property
    def summary(self) -> str:
        met = sum(row.met for row in self.tasks)
        n = len(self.tasks)
        line = f"{n} tasks in {len(self.adapters)} adapters; {met} of {n} meet their requirement"
        if self.cannot_meet:
            line += "; cannot meet even alone: " + ", ".join(
                f"{name} (best {score:.3f})" for name, score in self.cannot_meet.items()
            )
        return line

    def to_json(self) -> dict:
        return {
            "summary": self.summary,
            "tasks": [dataclasses.asdict(row) for row in self.tasks],
            "adapters": [dataclasses.asdict(row) for row in self.adapters],
            "cannot_meet": [{"name": name, "best_score": score} for name, score in self.cannot_meet.items()],
        }


def build_report(
    tasks: Sequence[Task],
    base_scores: Mapping[str, float],
    fusion: FusionResult,
    *,
    kind: str,
    rank: int,
    trainable_parameters: Mapping[str, int],
) -> Report:
    """Join tasks, base-model scores, the fusion result and each adapter's parameter count."""
    rows = []
    for task in tasks:
        adapter = fusion.adapter_of(task.name)
        score = adapter.scores[task.name]
        rows.append(
            TaskRow(task.name, task.metric, task.requirement, float(base_scores[task.name]), score,
                    adapter.name, score >= task.requirement, dict(task.skipped))
        )
    adapters = tuple(
        AdapterRow(a.name, a.tasks, kind, rank, int(trainable_parameters[a.name])) for a in fusion.adapters
    )
    return Report(tuple(rows), adapters, dict(fusion.cannot_meet))


_COLUMNS = ("task", "metric", "requirement", "base", "adapter score", "adapter", "met", "skipped rows")


def _cells(row: TaskRow) -> tuple[str, ...]:
    return (row.name, row.metric, f"{row.requirement:.2f}", f"{row.base_score:.3f}", f"{row.adapter_score:.3f}",
            row.adapter, "yes" if row.met else "no", str(row.skipped_total))


def markdown(report: Report) -> str:
    """The task table as Markdown, the adapters, the skipped rows by reason, then the summary line."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.tasks]
    adapters = [f"- {a.name} ({a.kind}, rank {a.rank}, {a.trainable_parameters:,} trainable parameters): "
                f"{', '.join(a.tasks)}" for a in report.adapters]
    skipped = [f"- {row.name}: skipped " + ", ".join(f"{n} {reason}" for reason, n in row.skipped_rows.items())
               for row in report.tasks if row.skipped_total]
    if skipped:
        skipped = ["Data rows skipped:", "", *skipped, ""]
    return "\n".join(["# Adapter report", "", *lines, "", *adapters, "", *skipped, report.summary, ""])


def plot_accuracy(report: Report, path: str | pathlib.Path) -> None:
    """Grouped bars, base vs adapter score per task, with each task's requirement as a dashed line."""
    figure = Figure(figsize=(max(6.0, 1.4 * len(report.tasks)), 4.0), layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(report.tasks))
    width = 0.38
    axes.bar([x - width / 2 for x in positions], [r.base_score for r in report.tasks], width, label="base model")
    axes.bar([x + width / 2 for x in positions], [r.adapter_score for r in report.tasks], width, label="adapter")
    for x, row in zip(positions, report.tasks):
        axes.hlines(row.requirement, x - width, x + width, colors="black", linestyles="dashed",
                    label="requirement" if x == 0 else None)
    axes.set_xticks(list(positions), [f"{r.name}\n{r.adapter}" for r in report.tasks])
    axes.set_ylim(0, 1.2)  # headroom above 1 for the legend, so it never hides a bar
    axes.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_ylabel("score")
    axes.set_title("Base model vs adapter per task")
    axes.legend(loc="upper left", ncols=3)
    figure.savefig(path, dpi=100)


def write_report(report: Report, out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """report.json, report.md and accuracy.png in `out_dir`; returns their paths by kind."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "accuracy.png"}
    write_json(paths["json"], report.to_json())
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    plot_accuracy(report, paths["plot"])
    return paths


def print_report(report: Report, console: Console | None = None) -> None:
    table = Table(*_COLUMNS, title="Adapter report", caption=report.summary)
    for row in report.tasks:
        table.add_row(*_cells(row), style=None if row.met else "red")
    (console or Console()).print(table)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(
        self,
        *,
        step: int,
        adapter: str,
        loss: float,
        lr: float,
        examples_per_s: float,
        eval_scores: Mapping[str, float] | None = None,
    ) -> None:
        record = {"step": int(step), "adapter": adapter, "loss": float(loss), "lr": float(lr),
                  "examples_per_s": float(examples_per_s)}
        if eval_scores:
            record["eval"] = {name: float(score) for name, score in eval_scores.items()}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
