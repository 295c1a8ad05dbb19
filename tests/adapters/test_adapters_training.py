"""All three kinds train under jax.jit with gradients restricted to AdapterParam (20 optax steps, tiny task).

Dropout (an RNG stream under jit) is exercised by the Serial LoRA run only: each dropout site adds seconds
of XLA compile time on CPU (SNELLA's dropout and drop-path are checked in test_adapters_snella.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import base_params, small_inputs, small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, SnellaConfig, attach, update_sparsity
from valora_jax.adapters.allocator import snella_modules

TOWERS = ("language_model", "vision_tower")
CONFIGS = {
    "lora": AdapterConfig(kind="lora", rank=4, alpha=8, towers=TOWERS,
                          targets=("q_proj", "v_proj", "o_proj", "fc1", "down_proj")),
    "serial_lora": AdapterConfig(kind="serial_lora", rank=4, alpha=8, dropout=0.1, towers=TOWERS),
    "snella": AdapterConfig(kind="snella", rank=4, towers=TOWERS, targets=("q_proj", "v_proj", "fc1", "down_proj"),
                            snella=SnellaConfig(init_ratio=0.2, target_ratio=0.6, total_steps=20, dropout=0.0,
                                                drop_path=0.0)),
}


def token_loss(model, ids, pixels, mask):
    """Next-token cross entropy over the real text positions (the tiny task: memorise two sequences)."""
    logits = model(ids, pixels, mask)[:, :-1]
    targets, weights = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights) / jnp.sum(weights)


@nnx.jit
def train_step(model, optimizer, ids, pixels, mask):
    loss, grads = nnx.value_and_grad(token_loss, argnums=nnx.DiffState(0, AdapterParam))(model, ids, pixels, mask)
    optimizer.update(model, grads)
    if model.adapter_config.kind == "snella":
        update_sparsity(model, grads, optimizer.step[...])
    return loss, grads


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_twenty_steps_train_only_the_adapter(kind):
    model = small_model(seed=4)
    attach(model, CONFIGS[kind], nnx.Rngs(params=1, dropout=2))
    base_before = base_params(model)
    adapter_before = jax.tree.map(np.asarray, nnx.state(model, AdapterParam))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=AdapterParam)
    ids, pixels, mask = small_inputs(seed=5)
    losses, grad_seen = [], None
    for _ in range(20):
        loss, grads = train_step(model, optimizer, ids, pixels, mask)
        losses.append(float(loss))
        magnitude = jax.tree.map(lambda g: np.abs(np.asarray(g)), grads)
        grad_seen = magnitude if grad_seen is None else jax.tree.map(np.maximum, grad_seen, magnitude)

    assert losses[-1] < losses[0] - 0.15, losses  # near-uniform base logits: 0.15 nats is a clear fall
    base_after = base_params(model)
    assert all(np.array_equal(base_after[k], base_before[k]) for k in base_before), "base weights changed"
    grad_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(grad_seen)}
    adapter_paths = {p for p, _ in jax.tree_util.tree_leaves_with_path(adapter_before)}
    assert grad_paths == adapter_paths, "gradients cover exactly the adapter parameters"
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grad_seen) if not g.any()]
    assert not dead, f"no gradient reached {dead}"
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), adapter_before,
                         nnx.state(model, AdapterParam))
    assert all(jax.tree.leaves(moved)), "every adapter parameter was updated"
    if kind == "snella":
        kept = [(1 - float(m.sparsity[...])) * m.num_entries for _, m in snella_modules(model)]
        total = sum(m.num_entries for _, m in snella_modules(model))
        # the budget reached its target at the last step (whole entries per matrix, rounded down)
        assert abs(sum(kept) - (1 - 0.6) * total) <= len(kept) + 1, (sum(kept), total)
        assert len({float(m.sparsity[...]) for _, m in snella_modules(model)}) > 1, "shares follow the scores"
