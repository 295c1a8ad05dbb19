"""Classify heads: one linear map per classify task, from the last token's final hidden state to its labels.

A closed-set task answers in one forward pass instead of decoding (METHODS.md 1a). The heads of an
adapter's tasks share one (hidden, total labels) matrix so a mixed batch is one matmul with static
shapes; each row reads only its own task's columns. The weights are `AdapterParam`, so the optimizer
that trains the adapter trains them too, and they are saved beside it as `head.safetensors` (one
`<task>.kernel` (hidden, labels) and `<task>.bias` per task) plus `head.json` (the label names).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from valora_jax.adapters.variables import AdapterParam

WEIGHTS_FILE = "head.safetensors"
LABELS_FILE = "head.json"
MASKED_LOGIT = -1e9
INIT_STD = 0.02


class ClassifyHeads(nnx.Module):
    """`heads(hidden_last (b, d), head_index (b,))` -> logits (b, most labels); columns past a task's labels
    are MASKED_LOGIT. `head_index` is the row's position in `label_sets` (any value for rows with no head)."""

    def __init__(self, hidden_size: int, label_sets: Mapping[str, tuple[str, ...]], *, rngs: nnx.Rngs):
        if not label_sets:
            raise ValueError("ClassifyHeads needs at least one classify task")
        # Static metadata of the jitted graph, so hashable: (task, labels) pairs.
        self.label_sets = tuple((name, tuple(labels)) for name, labels in label_sets.items())
        counts = [len(labels) for _, labels in self.label_sets]
        total = sum(counts)
        self.kernel = AdapterParam(INIT_STD * jax.random.normal(rngs.params(), (hidden_size, total), jnp.float32))
        self.bias = AdapterParam(jnp.zeros((total,), jnp.float32))
        self.offsets = tuple(int(o) for o in np.cumsum([0] + counts[:-1]))
        self.counts = tuple(counts)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.label_sets)

    def parameter_count(self, tasks: Sequence[str]) -> int:
        """Trainable parameters of the heads of `tasks` (kernel columns and biases)."""
        hidden = self.kernel.shape[0]
        return sum((hidden + 1) * count for name, count in zip(self.tasks, self.counts) if name in tasks)

    def __call__(self, hidden_last: jax.Array, head_index: jax.Array) -> jax.Array:
        scores = hidden_last.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
        width = max(self.counts)
        head_index = jnp.clip(head_index, 0, len(self.counts) - 1)
        columns = jnp.asarray(self.offsets)[head_index][:, None] + jnp.arange(width)[None, :]
        valid = jnp.arange(width)[None, :] < jnp.asarray(self.counts)[head_index][:, None]
        gathered = jnp.take_along_axis(scores, jnp.minimum(columns, scores.shape[1] - 1), axis=1)
        return jnp.where(valid, gathered, MASKED_LOGIT)

    def restore(self, directory: str | pathlib.Path) -> None:
        """Copy the heads saved in `directory` (by `save`) into the columns of the same tasks.

        Heads of tasks not saved there keep their values. A saved task must exist here with the same labels.
        """
        saved = load_heads(directory)
        own = dict(self.label_sets)
        kernel, bias = self.kernel[...], self.bias[...]
        for name, labels in saved.label_sets:
            if own.get(name) != labels:
                raise ValueError(f"{directory}: head {name!r} has labels {list(labels)}; expected {own.get(name)}")
            at, count = self.offsets[self.tasks.index(name)], self.counts[self.tasks.index(name)]
            source = saved.offsets[saved.tasks.index(name)]
            kernel = kernel.at[:, at:at + count].set(saved.kernel[...][:, source:source + count])
            bias = bias.at[at:at + count].set(saved.bias[...][source:source + count])
        self.kernel.set_value(kernel)
        self.bias.set_value(bias)

    def save(self, directory: str | pathlib.Path, tasks: Sequence[str] | None = None) -> None:
        """Write the heads of `tasks` (default: all)."""
        tasks = self.tasks if tasks is None else tuple(tasks)
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        kernel, bias = np.asarray(self.kernel[...]), np.asarray(self.bias[...])
        tensors = {}
        for name, offset, count in zip(self.tasks, self.offsets, self.counts):
            if name not in tasks:
                continue
            tensors[f"{name}.kernel"] = np.ascontiguousarray(kernel[:, offset:offset + count])
            tensors[f"{name}.bias"] = np.ascontiguousarray(bias[offset:offset + count])
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / LABELS_FILE).write_text(json.dumps({"labels": {n: list(ls) for n, ls in self.label_sets if n in tasks}}, indent=2) + "\n")


def load_heads(directory: str | pathlib.Path) -> ClassifyHeads:
    """The heads saved in `directory` by `ClassifyHeads.save`."""
    directory = pathlib.Path(directory)
    label_sets = json.loads((directory / LABELS_FILE).read_text())["labels"]
    tensors = load_file(str(directory / WEIGHTS_FILE))
    hidden_size = tensors[f"{next(iter(label_sets))}.kernel"].shape[0]
    heads = ClassifyHeads(hidden_size, label_sets, rngs=nnx.Rngs(0))
    heads.kernel.set_value(jnp.concatenate([tensors[f"{n}.kernel"] for n in label_sets], axis=1))
    heads.bias.set_value(jnp.concatenate([tensors[f"{n}.bias"] for n in label_sets]))
    return heads
