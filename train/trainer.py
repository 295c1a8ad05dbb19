"""Train one adapter (and its classify heads) on the union of some tasks: jitted step, checkpoints, resume.

Only adapter variables train: the optimizer is `nnx.Optimizer(learner, adamw, wrt=AdapterParam)` and the
step (train.step) differentiates with respect to `AdapterParam` alone.

Every `checkpoint_every` steps an Orbax checkpoint holds the adapter, heads and optimizer state and the
grain iterator's position. With `resume`, training continues from the latest one; data order, optimizer
state and step count are restored, so the end result equals an uninterrupted run. A non-finite loss
raises `NonFiniteLossError` before anything is saved from that step on, so the last checkpoint stays good.

A training starts from a fresh adapter, or (`new_learner(..., warm_start=dir)`, how fusion grows an
adapter) from a saved adapter and the heads saved with it, attached in the same graph as a fresh one.

Data parallel: with `data_parallel = N` the batch is split over a ('data', 'model') mesh of N x 1
devices and the base and adapter are replicated; the jitted step is the same program, XLA inserts the
gradient all-reduce, so the loss curve equals the single-device one up to float reassociation. Over
many processes (train.distributed) the mesh takes N / processes devices from each, every process reads
its rows of each global batch (train.pipeline) and the step is still that one program; every process
takes part in each checkpoint (Orbax writes the replicated state once, grain each process's position).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from collections.abc import Sequence

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from train.encoding import Encoder, model_inputs
from valora_jax.adapters.heads import WEIGHTS_FILE, ClassifyHeads
from train.distributed import is_primary
from train.pipeline import make_iterator, train_dataset
from train.report import MetricsLog
from train.step import TRAINED, Learner, train_step
from train.tasks import Task
from valora_jax.adapters import (
    AdapterConfig,
    AdapterParam,
    AdapterState,
    attach,
    detach,
    load_adapter,
)
from valora_jax.sharding import make_mesh, shard_model

logger = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between metrics.jsonl records (and host syncs of the loss)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    data_parallel: int = 1

    def __post_init__(self):
        at_least_one = {"steps": self.steps, "batch_size": self.batch_size,
                        "checkpoint_every": self.checkpoint_every, "data_parallel": self.data_parallel}
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup and weight_decay must be >= 0, got {self.warmup}, {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (None: no clipping), got {self.max_grad_norm}")

    def schedule(self) -> optax.Schedule:
        """Linear warmup to `lr`, then cosine decay to zero at `steps`."""
        return optax.warmup_cosine_decay_schedule(0.0, self.lr, self.warmup, max(self.steps, self.warmup + 1))

    @functools.cache
    def transform(self) -> optax.GradientTransformation:
        """AdamW on the schedule, after clipping the gradient's global norm to `max_grad_norm` (None: no
        clipping); one object per config, because the optimizer is static in the jitted step (a new
        transform per adapter would compile the step again).

        Clipping (transformers' Trainer clips at 1.0 too) keeps one bad batch at peak learning rate from
        throwing a run off: without it, in a 170-step run of the embedded default, the count training
        jumped from loss 0.23 to 3.1 at step 80 and ended at 0.44 accuracy (0.98 in the 150-step run).
        """
        adamw = optax.adamw(self.schedule(), weight_decay=self.weight_decay)
        if self.max_grad_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)


def head_indices(tasks: Sequence[Task], heads: ClassifyHeads | None) -> np.ndarray:
    """Task index -> the task's head among `heads` (-1 for lm tasks)."""
    names = heads.tasks if heads is not None else ()
    return np.array([names.index(t.name) if t.head == "classify" else -1 for t in tasks], np.int32)


def model_batch(batch: dict, encoder: Encoder, task_heads: np.ndarray, model: nnx.Module) -> dict:
    """The arrays `model`'s step needs from a pipeline batch of tasks whose head positions are `task_heads`."""
    head_index = task_heads[batch["task"]]
    arrays = model_inputs(model, encoder.encode(batch, lm_rows=head_index < 0))
    arrays.update(label=np.maximum(batch["label"], 0).astype(np.int32), head_index=head_index)
    return arrays


def row_spec(name: str, array) -> PartitionSpec:
    """How a batch array splits over 'data': by its row axis (M-RoPE positions (3, rows, seq): the second)."""
    return PartitionSpec(None, "data") if name == "position_ids" and np.ndim(array) == 3 else PartitionSpec("data")


def saved_state(learner: Learner, optimizer: nnx.Optimizer) -> nnx.State:
    """What a checkpoint holds: adapter and head variables, and the optimizer (not the frozen base)."""
    return nnx.State({"adapter": nnx.state(learner, nnx.Any(AdapterParam, AdapterState)),
                      "optimizer": nnx.state(optimizer, nnx.OptState)})


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory.resolve(), item_names=("state", "data"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


class _Batches:
    """Pipeline batches as model arrays placed on the mesh (the row axis split over 'data'; Qwen-VL's vision
    inputs by their groups, an image per row)."""

    def __init__(self, tasks: Sequence[Task], task_heads: np.ndarray, encoder: Encoder, config: TrainConfig, mesh,
                 model: nnx.Module):
        dataset = train_dataset(tasks, batch_size=config.batch_size, seed=config.seed, image_size=encoder.image_size)
        self.iterator = make_iterator(dataset)
        self.encoder, self.task_heads, self.model, self.mesh = encoder, task_heads, model, mesh

    def __next__(self) -> dict:
        arrays = model_batch(next(self.iterator), self.encoder, self.task_heads, self.model)
        place = lambda spec: lambda v: jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), v)  # noqa: E731
        return {k: jax.tree.map(place(row_spec(k, v)), v) for k, v in arrays.items()}


def new_learner(model: nnx.Module, suite: Sequence[Task], adapter: AdapterConfig, seed: int,
                warm_start: pathlib.Path | None = None) -> Learner:
    """Attach a fresh adapter, initialised from `seed`, with fresh heads for every classify task of the suite.

    With `warm_start` (a directory written by `save_adapter`, with the heads saved beside it) the adapter
    and the saved heads start from there instead; `adapter` must be the config it was trained with.

    Heads exist for the whole suite, not only the tasks being trained, so every group of a fusion run
    has the same graph and the train step compiles once; heads of absent tasks get no gradient and are
    not saved.
    """
    rngs = nnx.Rngs(seed)
    saved = None
    if warm_start is not None:
        load_adapter(model, warm_start)
        saved = nnx.state(model, nnx.Any(AdapterParam, AdapterState))
        detach(model)
    # Attached from `adapter` either way, so every training has the same graph and the step compiles once
    # (a loaded adapter carries the config as saved, with its targets spelt out, which is another graph).
    attach(model, adapter, rngs)
    if saved is not None:
        nnx.update(model, saved)
    label_sets = {t.name: t.labels for t in suite if t.head == "classify"}
    heads = ClassifyHeads(model.config.text.hidden_size, label_sets, rngs=rngs) if label_sets else None
    if warm_start is not None and heads is not None and (warm_start / WEIGHTS_FILE).is_file():
        heads.restore(warm_start)
    return Learner(model, heads)


def train_adapter(
    learner: Learner,
    tasks: Sequence[Task],
    encoder: Encoder,
    config: TrainConfig,
    *,
    checkpoint_dir: pathlib.Path,
    metrics: MetricsLog | None,
    name: str,
    resume: bool = False,
) -> list[float]:
    """Train `learner`'s adapter variables in place for `config.steps` steps; returns the loss per step run.

    `metrics` (None: not logged, as on all but the first process) gets a record every LOG_EVERY steps.
    """
    mesh = make_mesh(data=config.data_parallel)
    shard_model(learner, mesh)
    optimizer = nnx.Optimizer(learner, config.transform(), wrt=AdapterParam)
    # Its step counters start on one device and leave the step on the mesh; placed there from the start,
    # the step's input shardings never change, so it compiles once.
    shard_model(optimizer, mesh)
    batches = _Batches(tasks, head_indices(tasks, learner.heads), encoder, config, mesh, learner.model)
    sparsify = learner.model.adapter_config.kind == "snella"
    schedule = config.schedule()
    start = 0
    with _checkpoint_manager(checkpoint_dir) as manager:
        if resume and manager.latest_step() is not None:
            start = manager.latest_step()
            restored = manager.restore(start, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(saved_state(learner, optimizer)),
                data=grain.checkpoint.CheckpointRestore(batches.iterator)))
            nnx.update(learner, restored["state"]["adapter"])
            nnx.update(optimizer, restored["state"]["optimizer"])
            logger.info("%s: resuming from step %d of %d (checkpoint in %s)", name, start, config.steps, checkpoint_dir)
        graphdef, trained, frozen = nnx.split((learner, optimizer), TRAINED, ...)
        losses: list[float] = []
        pending: list[jax.Array] = []
        last_good = start if start else None
        progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=name, unit="step",
                        dynamic_ncols=True, leave=False, disable=not is_primary())
        tick = time.perf_counter()
        with jax.set_mesh(mesh):
            for step in progress:
                trained, loss = train_step(graphdef, trained, frozen, next(batches), encoder.answer_window, sparsify)
                pending.append(loss)
                done = step + 1
                if done % LOG_EVERY and done % config.checkpoint_every and done != config.steps:
                    continue
                values = [float(v) for v in pending]
                pending.clear()
                bad = next((i for i, v in enumerate(values) if not np.isfinite(v)), None)
                if bad is not None:
                    raise NonFiniteLossError(
                        f"{name}: loss is {values[bad]} at step {done - len(values) + bad + 1}; stopped. The last "
                        f"good checkpoint is " + (f"step {last_good} in {checkpoint_dir}" if last_good else "none")
                        + "; lower --lr or check the data, then rerun with --resume.")
                losses += values
                now = time.perf_counter()
                rate = len(values) * config.batch_size / (now - tick)
                tick = now
                progress.set_postfix(loss=f"{values[-1]:.4f}", ex_s=f"{rate:.0f}")
                if metrics is not None:
                    metrics.append(step=done, adapter=name, loss=values[-1], lr=float(schedule(done)),
                                   examples_per_s=rate)
                if done % config.checkpoint_every == 0 or done == config.steps:
                    nnx.update((learner, optimizer), trained)
                    manager.save(done, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(saved_state(learner, optimizer)),
                        data=grain.checkpoint.CheckpointSave(batches.iterator)))
                    manager.wait_until_finished()
                    last_good = done
        progress.close()
    nnx.update((learner, optimizer), trained)
    return losses
