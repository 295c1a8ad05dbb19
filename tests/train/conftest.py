"""Shared helpers for the train/ tests: small in-memory tasks whose pixels identify each example."""

import textwrap

import numpy as np
import pytest

from train.tasks import Example, Task


def marked_image(value: int, size: int = 8) -> np.ndarray:
    """An image filled with `value`, so a batch element can be traced back to its example."""
    return np.full((size, size, 3), value, dtype=np.uint8)


@pytest.fixture
def make_task():
    def make(name, *, head="classify", n_train=4, n_val=2, first_id=0, requirement=0.9, metric="accuracy"):
        labels = ("no", "yes") if head == "classify" else ()

        def example(i):
            answer = labels[i % 2] if labels else f"answer {i}"
            return Example(marked_image(first_id + i), answer, i % 2 if labels else -1)

        return Task(
            name=name, head=head, metric=metric, requirement=requirement, prompt=f"what is {name} ?",
            train=[example(i) for i in range(n_train)],
            val=[example(n_train + i) for i in range(n_val)],
            labels=labels,
        )

    return make


@pytest.fixture
def two_tasks(tmp_path):
    """A task file of two small embedded tasks: colour's requirement is always met, so fusion tries colour +
    location next."""
    path = tmp_path / "tasks.yaml"
    path.write_text(textwrap.dedent("""
        tasks:
          - source: embedded/colour
            requirement: 0.0
            n_train: 8
            n_val: 4
          - source: embedded/location
            requirement: 0.7
            n_train: 8
            n_val: 4
    """))
    return path
