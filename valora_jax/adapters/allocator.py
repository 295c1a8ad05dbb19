"""SNELLA's bi-level sparsity allocator: a global budget of non-zero dW entries, shared across matrices.

Follows the authors' released `sparse_allocator.py`. Called once per training step after the optimizer
update (inside the jitted step is fine): `update_sparsity(model, grads, step)`, `step` counting the steps
taken so far (their epoch counter, one schedule position per call).

- Scores, every step: each matrix's sensitivity / uncertainty EMAs advance (see `Snella.update_scores`);
  its score is mean(A's scores) + mean(B's scores).
- Budget: the kept count of all dW entries follows a cubic schedule from (1 - init_ratio) to
  (1 - target_ratio) of their total (`kept_fraction`), rounded down while it decays.
- Re-sharing (`reallocates`): only after `warmup_steps`, then once every `SnellaConfig.interval` steps,
  and every step past `total_steps - final_steps`; in between, and throughout the warm-up, every matrix
  keeps its quantile level (at first `init_ratio`).
- Across matrices (`share_budget`): the budget is shared in proportion to the scores, each share capped
  at its matrix's size, what capped matrices cannot take handed to the others in proportion to their
  scores, and each share rounded down. All-zero scores count as equal scores.
- Inside a matrix: entries compete by magnitude through the quantile threshold; the matrix's quantile
  level becomes 1 - kept / size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.adapters.config import SnellaConfig
from valora_jax.adapters.snella import Snella


def kept_fraction(step: jax.Array | int, cfg: SnellaConfig) -> jax.Array:
    """Fraction of all dW entries kept at `step` (cubic decay of the budget)."""
    start, end = 1.0 - cfg.init_ratio, 1.0 - cfg.target_ratio
    span = cfg.total_steps - cfg.warmup_steps - cfg.final_steps
    progress = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.warmup_steps) / span, 0.0, 1.0)
    return end + (start - end) * (1.0 - progress) ** 3


def reallocates(step: jax.Array | int, cfg: SnellaConfig) -> jax.Array:
    """Whether the budget is re-shared at `step`: past the warm-up, on the interval or in the final phase."""
    step = jnp.asarray(step, jnp.int32)
    final = step > cfg.total_steps - cfg.final_steps
    return (step > cfg.warmup_steps) & (final | (step % cfg.interval == 0))


def step_budget(step: jax.Array | int, cfg: SnellaConfig, total: jax.Array) -> jax.Array:
    """Kept entries at `step` out of `total`: the cubic schedule, rounded down while it decays."""
    budget = kept_fraction(step, cfg) * total
    decaying = jnp.asarray(step) <= cfg.total_steps - cfg.final_steps
    return jnp.where(decaying, jnp.floor(budget), budget)


def share_budget(scores: jax.Array, sizes: jax.Array, budget: jax.Array) -> jax.Array:
    """Kept entries per matrix (whole numbers): proportional to `scores`, capped at `sizes`, summing to
    `budget` up to the rounding (equal scores when all are zero).

    First floor(budget * share) capped at the size, then rounds that hand what is left to the matrices
    below their size in proportion to their scores (each capped at its room); each round fills at least
    one matrix or places everything, so as many rounds as matrices suffice.
    """
    scores, sizes = scores.astype(jnp.float32), sizes.astype(jnp.float32)
    scores = jnp.where(jnp.sum(scores) > 0, scores, jnp.ones_like(scores))
    shares = scores / jnp.sum(scores)
    kept = jnp.minimum(sizes, jnp.floor(budget * shares))

    def hand_out(_, kept):
        left = budget - jnp.sum(kept)
        room = sizes - kept
        weights = jnp.where(room > 0, shares, 0.0)
        total = jnp.sum(weights)
        extra = jnp.minimum(left * weights / jnp.where(total > 0, total, 1.0), room)
        return kept + jnp.where((left > 0) & (total > 0), extra, 0.0)

    return jnp.floor(jax.lax.fori_loop(0, scores.shape[0], hand_out, kept))


def snella_modules(model: nnx.Module) -> list[tuple[tuple, Snella]]:
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Snella)]


def update_sparsity(model: nnx.Module, grads: nnx.State, step: jax.Array | int) -> None:
    """Advance every SNELLA matrix's score EMAs with `grads` (an `AdapterParam` gradient state) and, when
    `reallocates(step)`, re-share the step's budget: sets each matrix's `sparsity` (quantile level) in place."""
    cfg: SnellaConfig = model.adapter_config.snella
    modules = snella_modules(model)
    if not modules:
        raise ValueError("the model has no SNELLA adapter attached")
    flat = {tuple(path): value for path, value in nnx.to_flat_state(grads)}
    scores = []
    for path, module in modules:
        grad_a, grad_b = (flat[(*path, name)] for name in ("A", "B"))
        scores.append(module.update_scores(jnp.asarray(grad_a[...]), jnp.asarray(grad_b[...]), cfg.beta1, cfg.beta2))
    sizes = jnp.asarray([m.num_entries for _, m in modules], jnp.float32)
    kept = share_budget(jnp.stack(scores), sizes, step_budget(step, cfg, jnp.sum(sizes)))
    now = reallocates(step, cfg)
    for (_, module), kept_m, size in zip(modules, kept, sizes, strict=True):
        level = jnp.clip(1.0 - kept_m / size, 0.0, 1.0)
        module.sparsity.set_value(jnp.where(now, level, module.sparsity[...]))
