"""Greedy fusion with rollback, driven by hand-written score tables instead of training."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.fusion import FusedAdapter, Rollback, fuse_tasks, fusion_order


@dataclasses.dataclass(frozen=True)
class FakeTask:
    name: str
    head: str = "classify"
    requirement: float = 0.9


class ScoreTable:
    """train_and_eval from a table {"space separated task names": {name: score}}; records every call."""

    def __init__(self, table):
        self.table = {frozenset(group.split()): scores for group, scores in table.items()}
        self.calls = []

    def __call__(self, group):
        names = tuple(task.name for task in group)
        self.calls.append(names)
        return self.table[frozenset(names)]


TASKS = [FakeTask("a"), FakeTask("b"), FakeTask("c"), FakeTask("d")]


def test_rollback_closes_the_adapter_with_its_last_accepted_scores():
    table = ScoreTable({
        "a": {"a": 0.95},
        "a b": {"a": 0.93, "b": 0.92},
        "a b c": {"a": 0.91, "b": 0.85, "c": 0.95},  # b drops below 0.9: roll c back
        "c": {"c": 0.96},
        "c d": {"c": 0.94, "d": 0.91},
    })
    result = fuse_tasks(TASKS, table, order=["a", "b", "c", "d"])
    assert result.adapters == (
        FusedAdapter("adapter_0", ("a", "b"), {"a": 0.93, "b": 0.92}, True),
        FusedAdapter("adapter_1", ("c", "d"), {"c": 0.94, "d": 0.91}, True),
    )
    assert result.rollbacks == (Rollback("adapter_0", "c", {"a": 0.91, "b": 0.85, "c": 0.95}, ("b",)),)
    assert result.cannot_meet == {}
    # the closed adapter's training is reused, never repeated
    assert table.calls == [("a",), ("a", "b"), ("a", "b", "c"), ("c",), ("c", "d")]
    assert result.adapter_of("d").name == "adapter_1"


def test_all_tasks_fuse_into_one_adapter_when_nothing_misses():
    table = ScoreTable({"a": {"a": 1.0}, "a b": {"a": 0.9, "b": 0.9}, "a b c": {"a": 0.9, "b": 0.95, "c": 0.99},
                        "a b c d": {"a": 0.97, "b": 0.96, "c": 0.95, "d": 0.94}})
    result = fuse_tasks(TASKS, table, order=["a", "b", "c", "d"])
    assert [a.tasks for a in result.adapters] == [("a", "b", "c", "d")]
    assert result.adapters[0].scores == {"a": 0.97, "b": 0.96, "c": 0.95, "d": 0.94}
    assert result.rollbacks == () and len(table.calls) == 4


def test_a_task_that_fails_alone_gets_a_failing_adapter_and_its_best_score():
    table = ScoreTable({
        "a": {"a": 0.95},
        "a x": {"a": 0.94, "x": 0.80},  # x misses: rollback
        "x": {"x": 0.70},  # x misses even alone; its best was 0.80 with a
        "b": {"b": 0.92},  # b is not added to x's adapter: it opens a new one
    })
    tasks = [FakeTask("a"), FakeTask("x"), FakeTask("b")]
    result = fuse_tasks(tasks, table, order=["a", "x", "b"])
    assert result.adapters == (
        FusedAdapter("adapter_0", ("a",), {"a": 0.95}, True),
        FusedAdapter("adapter_1", ("x",), {"x": 0.70}, False),
        FusedAdapter("adapter_2", ("b",), {"b": 0.92}, True),
    )
    assert result.cannot_meet == {"x": 0.80}
    assert result.rollbacks == (Rollback("adapter_0", "x", {"a": 0.94, "x": 0.80}, ("x",)),)
    assert table.calls == [("a",), ("a", "x"), ("x",), ("b",)]


def test_a_failing_first_task_does_not_absorb_the_next():
    table = ScoreTable({"x": {"x": 0.5}, "a": {"a": 0.95}})
    result = fuse_tasks([FakeTask("x"), FakeTask("a")], table, order=["x", "a"])
    assert [(a.tasks, a.meets_requirements) for a in result.adapters] == [(("x",), False), (("a",), True)]
    assert result.cannot_meet == {"x": 0.5} and table.calls == [("x",), ("a",)]


def test_requirements_are_per_task_and_inclusive():
    tasks = [FakeTask("a", requirement=0.9), FakeTask("b", "lm", requirement=0.7)]
    table = ScoreTable({"a": {"a": 0.9}, "a b": {"a": 0.9, "b": 0.7}})
    result = fuse_tasks(tasks, table, order=["a", "b"])
    assert [a.tasks for a in result.adapters] == [("a", "b")]


def test_default_order_groups_heads_then_strictest_first():
    tasks = [FakeTask("loc", "lm", 0.7), FakeTask("shape", "classify", 0.9), FakeTask("digits", "classify", 0.95),
             FakeTask("count", "lm", 0.8), FakeTask("colour", "classify", 0.9)]
    assert [t.name for t in fusion_order(tasks)] == ["digits", "shape", "colour", "count", "loc"]
    groups = ["digits", "digits shape", "digits shape colour", "digits shape colour count",
              "digits shape colour count loc"]
    table = ScoreTable({group: {name: 1.0 for name in group.split()} for group in groups})
    assert fuse_tasks(tasks, table).order == ("digits", "shape", "colour", "count", "loc")


def test_bad_order_and_missing_scores_are_errors():
    with pytest.raises(ValueError, match="every task exactly once"):
        fuse_tasks(TASKS, ScoreTable({}), order=["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        fuse_tasks([FakeTask("a"), FakeTask("a")], ScoreTable({}))
    with pytest.raises(KeyError, match="'b'"):
        fuse_tasks(TASKS[:2], ScoreTable({"a": {"a": 1.0}, "a b": {"a": 1.0}}), order=["a", "b"])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_invariants_on_random_score_tables(data):
    """Every task lands in exactly one adapter, in the given order; accepted adapters meet every requirement."""
    n = data.draw(st.integers(1, 6))
    tasks = [FakeTask(f"t{i}", requirement=data.draw(st.sampled_from([0.5, 0.7, 0.9]))) for i in range(n)]
    scores = {}

    def train_and_eval(group):
        key = tuple(task.name for task in group)
        if key not in scores:
            scores[key] = {task.name: data.draw(st.sampled_from([0.4, 0.6, 0.8, 1.0])) for task in group}
        return scores[key]

    result = fuse_tasks(tasks, train_and_eval, order=[t.name for t in tasks])
    assert [name for adapter in result.adapters for name in adapter.tasks] == [t.name for t in tasks]
    requirement = {t.name: t.requirement for t in tasks}
    for adapter in result.adapters:
        meets = all(adapter.scores[name] >= requirement[name] for name in adapter.tasks)
        assert adapter.meets_requirements == meets
        assert meets or len(adapter.tasks) == 1
        assert adapter.scores == scores[adapter.tasks]
    assert set(result.cannot_meet) == {a.tasks[0] for a in result.adapters if not a.meets_requirements}
    # one training per task plus one per rollback: nothing is trained twice
    assert len(scores) == n + len(result.rollbacks)
