"""The adapter trainer on a real (tiny) LLaVA: a short training learns what the base model cannot, resume after
a kill, non-finite loss, 8-device data parallel, warm start from a saved adapter.

References are independent runs of the same training: an uninterrupted run for resume, a single-device
run for data parallel. The model is the golden tiny HF LLaVA (tests/golden/llava_mha), loaded once.
"""

import dataclasses
import logging

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import train.trainer as trainer
from tests.train.conftest import marked_image
from train.encoding import Encoder
from train.evaluate import Evaluator
from train.report import MetricsLog
from train.run import load_base
from train.tasks import Example, Task
from valora_jax.adapters import AdapterConfig, AdapterParam, detach, save_adapter
from valora_jax.adapters.heads import ClassifyHeads

pytestmark = pytest.mark.xdist_group("train_llava_mha")

ADAPTER = AdapterConfig(kind="lora", rank=4, alpha=8.0, towers=("language_model", "vision_tower", "multi_modal_projector"),
                        targets=("q_proj", "v_proj", "fc1", "linear_1", "gate_proj"))


def brightness_tasks() -> list[Task]:
    """A classify task and an lm task over white/black images (label: is it white)."""
    def examples(n, offset):
        return [(marked_image(255 if (i + offset) % 2 else 0, 32), (i + offset) % 2) for i in range(n)]

    classify = Task("bright", "classify", "accuracy", 0.9, "is the image white ?",
                    [Example(im, ("no", "yes")[y], y) for im, y in examples(16, 0)],
                    [Example(im, ("no", "yes")[y], y) for im, y in examples(8, 1)], labels=("no", "yes"))
    lm = Task("white", "lm", "accuracy", 0.9, "what colour is the image ?",
              [Example(im, ("black", "white")[y]) for im, y in examples(16, 0)],
              [Example(im, ("black", "white")[y]) for im, y in examples(8, 1)])
    return [classify, lm]


@pytest.fixture(scope="module")
def setup(golden_dir):
    model, processor = load_base(str(golden_dir / "llava_mha"))
    tasks = brightness_tasks()
    encoder = Encoder.for_model(model, processor, 32).fitted(tasks)
    return model, tasks, encoder


def run_training(setup, directory, *, steps=6, checkpoint_every=2, batch_size=8, data_parallel=1, resume=False):
    """(losses, adapter and head weights as numpy) of one training; the model is left without adapter."""
    model, tasks, encoder = setup
    learner = trainer.new_learner(model, tasks, ADAPTER, seed=0)
    config = trainer.TrainConfig(steps=steps, batch_size=batch_size, lr=1e-2, warmup=2,
                                 checkpoint_every=checkpoint_every, data_parallel=data_parallel)
    try:
        losses = trainer.train_adapter(learner, tasks, encoder, config,
                                       checkpoint_dir=directory / "ckpt", metrics=MetricsLog(directory / "m.jsonl"),
                                       name="test", resume=resume)
        weights = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(learner, AdapterParam)))
    finally:
        detach(model)
    return losses, weights


def interrupt_after(monkeypatch, calls: int, make_failure):
    """Make the train step fail on call number `calls` (1-based) with what `make_failure(result)` does."""
    real_step, count = trainer.train_step, [0]

    def step(*args):
        count[0] += 1
        result = real_step(*args)
        return make_failure(result) if count[0] == calls else result

    monkeypatch.setattr(trainer, "train_step", step)


def test_a_short_training_answers_what_the_base_model_cannot(setup, tmp_path):
    """30 steps teach both tasks (about 15 suffice): a wrong loss, label or score would not get there."""
    model, tasks, encoder = setup
    evaluator = Evaluator(encoder, batch_size=8)
    base = evaluator.scores(tasks, model)
    learner = trainer.new_learner(model, tasks, ADAPTER, seed=0)
    config = trainer.TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup=2, checkpoint_every=100)
    try:
        trainer.train_adapter(learner, tasks, encoder, config, checkpoint_dir=tmp_path / "ckpt",
                              metrics=MetricsLog(tmp_path / "m.jsonl"), name="learn")
        learner.eval()
        adapted = evaluator.scores(tasks, model, learner)
    finally:
        detach(model)
    assert base == {"bright": 0.0, "white": 0.0}  # the base model answers neither "yes"/"no" nor the colour
    assert adapted["bright"] >= 7 / 8 and adapted["white"] >= 7 / 8, adapted


def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(setup, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="train.trainer")
    full_losses, full = run_training(setup, tmp_path / "full")

    def kill(_):
        raise KeyboardInterrupt("killed")

    interrupt_after(monkeypatch, 5, kill)  # checkpoints at steps 2 and 4; step 5 dies
    with pytest.raises(KeyboardInterrupt):
        run_training(setup, tmp_path / "resumed")
    monkeypatch.undo()
    resumed_losses, resumed = run_training(setup, tmp_path / "resumed", resume=True)
    assert "test: resuming from step 4 of 6" in caplog.text

    assert resumed_losses == pytest.approx(full_losses[4:], abs=1e-6)  # steps 5..6 see the same batches
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), resumed, full)
    assert np.abs(full["heads"]["kernel"]).sum() > 0 and full_losses[-1] < full_losses[0]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    interrupt_after(monkeypatch, 5, lambda result: (result[0], result[1] * np.nan))
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 5.*last good checkpoint is step 4"):
        run_training(setup, tmp_path, steps=8, checkpoint_every=4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.all_steps() == [4]


def test_eight_device_data_parallel_matches_one_device(setup, tmp_path):
    assert len(jax.devices()) >= 8
    one, one_weights = run_training(setup, tmp_path / "one", steps=4, checkpoint_every=100)
    eight, eight_weights = run_training(setup, tmp_path / "eight", steps=4, checkpoint_every=100, data_parallel=8)
    np.testing.assert_allclose(eight, one, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), eight_weights, one_weights)


def test_warm_start_begins_from_the_saved_adapter_and_heads(setup, tmp_path):
    """A fused group's training starts where its accepted group's ended: the adapter and that group's heads."""
    model, tasks, encoder = setup
    suite = [*tasks, dataclasses.replace(tasks[0], name="dim")]  # a second classify task, never trained here
    config = trainer.TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup=1, checkpoint_every=100)
    learner = trainer.new_learner(model, suite, ADAPTER, seed=0)
    try:
        trainer.train_adapter(learner, tasks, encoder, config, checkpoint_dir=tmp_path / "ckpt",
                              metrics=MetricsLog(tmp_path / "m.jsonl"), name="first")
        save_adapter(model, tmp_path / "adapter")
        learner.heads.save(tmp_path / "adapter", ["bright"])
        trained = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(learner, AdapterParam)))
        fresh_graph = nnx.graphdef(learner)
    finally:
        detach(model)

    warm = trainer.new_learner(model, suite, ADAPTER, seed=1, warm_start=tmp_path / "adapter")
    try:
        started = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(warm, AdapterParam)))
        fresh_dim = np.asarray(warm.heads.kernel[...][:, 2:])
        assert nnx.graphdef(warm) == fresh_graph  # the same graph as a fresh adapter: no second compile
    finally:
        detach(model)
    b_factors = [layer["B"] for layer in jax.tree.leaves(trained["model"], is_leaf=lambda x: "B" in x)]
    assert any(np.any(b) for b in b_factors)  # trained: B starts at zero, so a fresh adapter would not match
    jax.tree.map(np.testing.assert_array_equal, started["model"], trained["model"])
    np.testing.assert_array_equal(started["heads"]["kernel"][:, :2], trained["heads"]["kernel"][:, :2])
    np.testing.assert_array_equal(started["heads"]["bias"][:2], trained["heads"]["bias"][:2])
    assert not np.allclose(fresh_dim, trained["heads"]["kernel"][:, 2:])  # "dim" was not saved: a fresh head


def test_restoring_heads_with_other_labels_is_an_error(setup, tmp_path):
    model, _, _ = setup
    heads = ClassifyHeads(model.config.text.hidden_size, {"bright": ("no", "yes")}, rngs=nnx.Rngs(0))
    heads.save(tmp_path)
    other = ClassifyHeads(model.config.text.hidden_size, {"bright": ("yes", "no", "maybe")}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head 'bright' has labels"):
        other.restore(tmp_path)


def test_gradients_are_clipped_to_the_global_norm_before_adamw():
    grads = {"a": np.full((4,), 5.0, np.float32)}  # global norm 10
    clipped, unclipped = (trainer.TrainConfig(max_grad_norm=norm).transform() for norm in (1.0, None))
    first_moment = [optax.tree_utils.tree_get(t.update(grads, t.init(grads), grads)[1], "mu")["a"]
                    for t in (clipped, unclipped)]
    beta1 = 0.9  # optax.adamw's default: mu = (1 - beta1) * g after one step
    np.testing.assert_allclose(first_moment[0], (1 - beta1) * grads["a"] / 10, rtol=1e-6)
    np.testing.assert_allclose(first_moment[1], (1 - beta1) * grads["a"], rtol=1e-6)
