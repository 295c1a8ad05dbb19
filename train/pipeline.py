"""grain input pipelines: a seeded, sharded, resumable stream of batches over the union of tasks.

One adapter trains on the union of its tasks' train splits, so batches mix tasks in proportion to
their sizes. Order of operations: concatenate the tasks, shuffle with the seed, repeat (grain
reshuffles each epoch), cut into global batches, and give each host its slice of every global batch
(host i of n: rows i*B/n to (i+1)*B/n of each batch of B). So the global batches, and with them the
loss curve, are the same whatever the number of hosts; a host loads only its own rows. Batches can
straddle an epoch boundary; a step count, not an epoch, is the unit of training.

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


def host_batches(stream: grain.MapDataset, batch_size: int, options: grain.sharding.ShardOptions) -> grain.MapDataset:
    """This host's slice of every global batch of `batch_size` rows of `stream` (whole batches only): host i of n
    takes rows i*b to (i+1)*b of each, b = batch_size / n, so the hosts' slices in order make the global batch."""
    if batch_size % options.shard_count:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {options.shard_count} hosts reading it")
    local = batch_size // options.shard_count
    whole = len(stream) - len(stream) % batch_size
    sliced = stream.slice(slice(0, whole)).batch(local, drop_remainder=True, batch_fn=collate)
    return sliced.slice(slice(options.shard_index, None, options.shard_count))


def train_dataset(
    tasks: Sequence[Task],
    *,
    batch_size: int,
    seed: int,
    image_size: int,
    num_epochs: int | None = None,
    sharding: grain.sharding.ShardOptions | None = None,
) -> grain.MapDataset:
    """This host's part of shuffled global batches of `batch_size` over the union of the tasks' train splits;
    `num_epochs=None` repeats forever.

    `sharding` defaults to this JAX process's part (`ShardByJaxProcess`).
    """
    union = grain.MapDataset.concatenate(
        [_split_dataset(task, i, "train", image_size) for i, task in enumerate(tasks)]
    )
    stream = union.shuffle(seed=seed).repeat(num_epochs)
    return host_batches(stream, batch_size, sharding or grain.sharding.ShardByJaxProcess())


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
