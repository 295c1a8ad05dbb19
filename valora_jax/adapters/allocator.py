"""SNELLA's bi-level sparsity allocator: a global budget of non-zero dW entries, shared across matrices.

Called once per training step after the optimizer update (inside the jitted step is fine):
`update_sparsity(model, grads, step)`.

- Budget: the kept fraction of all dW entries follows a cubic schedule from (1 - init_ratio) to
  (1 - target_ratio) (constant during `warmup_steps` and the last `final_steps`, as AdaLoRA's schedule).
- Across matrices: each matrix's kept count is proportional to its mean score (sensitivity EMA x
  uncertainty EMA, see `Snella.update_scores`), capped at its size; what a capped matrix cannot use goes
  to the others (water-filling), so the global budget is met exactly. Before any score is non-zero every
  matrix keeps the global fraction.
- Inside a matrix: entries compete by magnitude through the quantile threshold of Eq. 5; the matrix's
  quantile level becomes 1 - kept / size.
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


def share_budget(scores: jax.Array, sizes: jax.Array, budget: jax.Array) -> jax.Array:
    """Kept entries per matrix: proportional to `scores`, capped at `sizes`, summing to `budget`."""
    scores, sizes = scores.astype(jnp.float32), sizes.astype(jnp.float32)

    def fill(_, capped):
        free_budget = budget - jnp.sum(jnp.where(capped, sizes, 0.0))
        free_score = jnp.sum(jnp.where(capped, 0.0, scores))
        return capped | (free_budget * scores >= sizes * free_score)

    capped = jax.lax.fori_loop(0, scores.shape[0], fill, jnp.zeros(scores.shape, bool))
    free_budget = budget - jnp.sum(jnp.where(capped, sizes, 0.0))
    free_score = jnp.sum(jnp.where(capped, 0.0, scores))
    share = jnp.where(capped, sizes, free_budget * scores / jnp.maximum(free_score, jnp.finfo(jnp.float32).tiny))
    uniform = budget * sizes / jnp.sum(sizes)
    return jnp.where(jnp.sum(scores) > 0, share, uniform)


def snella_modules(model: nnx.Module) -> list[tuple[tuple, Snella]]:
    return [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, Snella)]


def update_sparsity(model: nnx.Module, grads: nnx.State, step: jax.Array | int) -> None:
    """Advance every SNELLA matrix's score EMAs with `grads` (an `AdapterParam` gradient state) and re-share
    the step's budget; sets each matrix's `sparsity` (quantile level) in place."""
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
    kept = share_budget(jnp.stack(scores), sizes, kept_fraction(step, cfg) * jnp.sum(sizes))
    for (_, module), kept_m, size in zip(modules, kept, sizes, strict=True):
        module.sparsity.set_value(jnp.clip(1.0 - kept_m / size, 0.0, 1.0))
