"""grain input pipelines: a seeded, sharded, resumable stream of batches over the union of tasks.

One adapter trains on the union of its tasks' train splits, so batches mix tasks in proportion to
their sizes. Order of operations: concatenate the tasks, take this host's shard (a strided slice
with the same length on every host), shuffle with the seed, repeat (grain reshuffles each epoch),
batch. Batches can straddle an epoch boundary; a step count, not an epoch, is the unit of training.

A batch (from `collate`):
    image   uint8 (B, S, S, 3)
    prompt  list[str]  the question, without the chat template or the `<image>` token
    answer  list[str]  the target text (the label name for classify tasks)
    label   int32 (B,) label index, -1 for lm tasks
    task    int32 (B,) index into the task list the pipeline was built from

The iterator's position is `iterator.get_state()`, a small JSON-able dict; `save_iterator_state`
and `restore_iterator_state` keep it next to a checkpoint so a resumed run sees the same batches.
Inside an Orbax checkpoint, save it as an item with `grain.checkpoint.CheckpointSave(iterator)` and
restore into a fresh iterator over the same dataset with `grain.checkpoint.CheckpointRestore(iterator)`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import grain
import numpy as np

from train.images import read_rgb
from train.tasks import Task


def _split_dataset(task: Task, task_index: int, split: str, image_size: int) -> grain.MapDataset:
    def element(example) -> dict:
        return {
            "image": read_rgb(example.image, image_size),
            "prompt": task.prompt_of(example),
            "answer": example.answer,
            "label": np.int32(example.label),
            "task": np.int32(task_index),
        }

    return grain.MapDataset.source(getattr(task, split)).map(element)


def collate(elements: Sequence[dict]) -> dict:
    """Stack arrays; keep texts as lists of str (what an HF processor takes)."""
    return {
        "image": np.stack([e["image"] for e in elements]),
        "prompt": [e["prompt"] for e in elements],
        "answer": [e["answer"] for e in elements],
        "label": np.array([e["label"] for e in elements], dtype=np.int32),
        "task": np.array([e["task"] for e in elements], dtype=np.int32),
    }


def shard(dataset: grain.MapDataset, options: grain.sharding.ShardOptions) -> grain.MapDataset:
    """Every `shard_count`-th element from `shard_index`; with drop_remainder all shards are equally long."""
    end = len(dataset)
    if options.drop_remainder:
        end -= end % options.shard_count
    return dataset.slice(slice(options.shard_index, end, options.shard_count))


def train_dataset(
    tasks: Sequence[Task],
    *,
    batch_size: int,
    seed: int,
    image_size: int,
    num_epochs: int | None = None,
    sharding: grain.sharding.ShardOptions | None = None,
) -> grain.MapDataset:
    """Shuffled batches over the union of the tasks' train splits; `num_epochs=None` repeats forever.

    `sharding` defaults to this JAX process's shard (`ShardByJaxProcess`).
    """
    union = grain.MapDataset.concatenate(
        [_split_dataset(task, i, "train", image_size) for i, task in enumerate(tasks)]
    )
    sharding = sharding or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    shuffled = shard(union, sharding).shuffle(seed=seed).repeat(num_epochs)
    return shuffled.batch(batch_size, drop_remainder=True, batch_fn=collate)


def eval_dataset(task: Task, task_index: int, *, batch_size: int, image_size: int) -> grain.MapDataset:
    """The task's val split in order, every example once (the last batch may be short)."""
    return _split_dataset(task, task_index, "val", image_size).batch(batch_size, batch_fn=collate)


def make_iterator(dataset: grain.MapDataset, *, threads: int = 2, prefetch: int = 8) -> grain.DatasetIterator:
    """A checkpointable iterator that prepares batches on background threads."""
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def save_iterator_state(iterator: grain.DatasetIterator, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(iterator.get_state()), encoding="utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, path: str | pathlib.Path) -> None:
    """Move a fresh iterator over the same dataset to the saved position."""
    iterator.set_state(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
