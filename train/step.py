"""The adapter training step: loss over mixed lm / classify batches, jitted update of adapter variables only.

Loss, per row then averaged over the batch: cross-entropy of the answer tokens (prompt and padding
masked) for lm rows, cross-entropy of the label under the row's head for classify rows, so a batch may
mix tasks of both kinds. The gradient is taken with respect to `AdapterParam` alone, so the frozen base
costs no gradient or optimizer memory. Kept apart from the training loop (no data pipeline imports) so
benchmarks can time exactly this step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from valora_jax.adapters.heads import ClassifyHeads
from valora_jax.adapters import AdapterParam, AdapterState, update_sparsity


class Learner(nnx.Module):
    """The adapted model and, when the tasks include classify tasks, their heads: what the optimizer sees."""

    def __init__(self, model: nnx.Module, heads: ClassifyHeads | None):
        self.model = model
        self.heads = heads


def loss_fn(learner: Learner, batch: dict, answer_window: int) -> jax.Array:
    """Mean over rows of the answer-token CE (lm rows) or the head CE (classify rows)."""
    model = learner.model
    hidden, _ = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                    batch["position_ids"])
    # Answers are left-padded to the end of each row, so only the last `answer_window` positions are scored.
    logits = model.logits(hidden[:, -answer_window - 1:-1])
    targets = batch["input_ids"][:, -answer_window:]
    target_mask = batch["target_mask"][:, -answer_window:].astype(jnp.float32)
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    row_loss = jnp.sum(token_ce * target_mask, axis=1) / jnp.maximum(jnp.sum(target_mask, axis=1), 1.0)
    if learner.heads is not None:
        head_logits = learner.heads(hidden[:, -1], batch["head_index"])
        head_ce = optax.softmax_cross_entropy_with_integer_labels(head_logits, batch["label"])
        row_loss = jnp.where(batch["head_index"] >= 0, head_ce, row_loss)
    return jnp.mean(row_loss)


# What a step changes: adapter, heads, optimizer, and the adapter dropout streams' counters (so each step
# draws new masks; left in the frozen part, every step would replay the first step's masks).
TRAINED = nnx.Any(AdapterParam, AdapterState, nnx.OptState, nnx.RngCount)


@functools.partial(jax.jit, static_argnums=(0, 4, 5), donate_argnums=1)
def train_step(graphdef, trained, frozen, batch, answer_window: int, sparsify: bool):
    """One optimizer step on the adapter variables; returns the new `trained` state and the step's loss.

    Only `trained` is donated: the frozen base stays valid whatever happens to a step.
    """
    learner, optimizer = nnx.merge(graphdef, trained, frozen)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))
    loss, grads = grad_fn(learner, batch, answer_window)
    optimizer.update(learner, grads)
    if sparsify:
        update_sparsity(learner.model, grads["model"], optimizer.step[...])
    return nnx.state((learner, optimizer), TRAINED), loss


