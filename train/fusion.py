"""VaLoRA's accuracy-aware knowledge fusion: pack tasks into as few adapters as their requirements allow.

Greedy with rollback (METHODS.md 1a): walk the tasks in order; add the next one to the open
adapter and train on the union; if every task of the union meets its requirement, keep it; otherwise
roll the addition back (the open adapter keeps the result of its last accepted training, which is
reused, not retrained), close it, and open a new adapter with that task alone.

A task that misses its requirement even alone keeps its own adapter, closed at once and marked as
failing: it is still the best adapter that task has, and the rollback rule would reject any
addition to it anyway (the failing task would be in the union), so trying costs training for
nothing. It is listed in `cannot_meet` with the best score it reached in any training.

Training is a callback, `train_and_eval(tasks) -> {task name: score}`, so this module knows nothing
about models and its logic is tested with score tables. A group of more than one task is always the
open adapter's accepted group plus the task being added, so the callback may start that training from
the accepted group's adapter (train.run does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

HEAD_ORDER = ("classify", "lm")


class FusableTask(Protocol):
    name: str
    head: str
    requirement: float


TrainAndEval = Callable[[tuple[FusableTask, ...]], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class FusedAdapter:
    """A closed adapter: its tasks in the order added and their scores from its last accepted training."""

    name: str
    tasks: tuple[str, ...]
    scores: dict[str, float]
    meets_requirements: bool


@dataclasses.dataclass(frozen=True)
class Rollback:
    """A rejected addition: `added` joined `adapter`'s tasks, and `missed` fell below their requirement."""

    adapter: str
    added: str
    scores: dict[str, float]
    missed: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FusionResult:
    order: tuple[str, ...]
    adapters: tuple[FusedAdapter, ...]
    rollbacks: tuple[Rollback, ...]
    cannot_meet: dict[str, float]  # task -> best score it reached in any training

    def adapter_of(self, task: str) -> FusedAdapter:
        return next(adapter for adapter in self.adapters if task in adapter.tasks)


def fusion_order(tasks: Sequence[FusableTask]) -> list[FusableTask]:
    """The default order: tasks with the same head adjacent, then the strictest requirement first.

    Tasks sharing a head share an output path (a label head, or text decoding), so they are the most
    likely to fuse without hurting each other; putting them next to each other means an adapter closes
    at a change of kind rather than between two similar tasks. Within a head, the strictest task
    opens the adapter while it has the most capacity left, and laxer tasks, which tolerate some
    interference, are added later. Ties keep the given order, so the result is deterministic.
    """
    rank = {head: i for i, head in enumerate(HEAD_ORDER)}
    return sorted(tasks, key=lambda task: (rank.get(task.head, len(rank)), -task.requirement))


def fuse_tasks(
    tasks: Sequence[FusableTask],
    train_and_eval: TrainAndEval,
    order: Sequence[str] | None = None,
) -> FusionResult:
    """Greedy fusion with rollback; `order` (task names, all of them) overrides `fusion_order`."""
    by_name = {task.name: task for task in tasks}
    if len(by_name) != len(tasks):
        raise ValueError("task names must be unique")
    if order is None:
        ordered = fusion_order(tasks)
    elif sorted(order) != sorted(by_name):
        raise ValueError(f"order {list(order)} must name every task exactly once: {sorted(by_name)}")
    else:
        ordered = [by_name[name] for name in order]

    best: dict[str, float] = {}

    def run(group: tuple[FusableTask, ...]) -> tuple[dict[str, float], tuple[str, ...]]:
        """Train on `group`; return the scores and the tasks that miss their requirement."""
        reported = train_and_eval(group)
        absent = [task.name for task in group if task.name not in reported]
        if absent:
            raise KeyError(f"train_and_eval returned no score for {absent}")
        scores = {task.name: float(reported[task.name]) for task in group}
        for name, score in scores.items():
            best[name] = max(best.get(name, score), score)
        return scores, tuple(task.name for task in group if scores[task.name] < task.requirement)

    adapters: list[FusedAdapter] = []
    rollbacks: list[Rollback] = []
    failing: list[str] = []
    open_group: tuple[FusableTask, ...] = ()
    open_scores: dict[str, float] = {}

    def close(meets_requirements: bool) -> None:
        names = tuple(task.name for task in open_group)
        adapters.append(FusedAdapter(f"adapter_{len(adapters)}", names, open_scores, meets_requirements))

    for task in ordered:
        if open_group:
            scores, missed = run(open_group + (task,))
            if not missed:
                open_group, open_scores = open_group + (task,), scores
                continue
            rollbacks.append(Rollback(f"adapter_{len(adapters)}", task.name, scores, missed))
            close(meets_requirements=True)
        open_group = (task,)
        open_scores, missed = run(open_group)
        if missed:
            failing.append(task.name)
            close(meets_requirements=False)
            open_group = ()
    if open_group:
        close(meets_requirements=True)
    return FusionResult(
        order=tuple(task.name for task in ordered),
        adapters=tuple(adapters),
        rollbacks=tuple(rollbacks),
        cannot_meet={name: best[name] for name in failing},
    )
