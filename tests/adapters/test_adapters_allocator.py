"""SNELLA's bi-level allocator: cubic budget schedule, score-proportional shares, EMA updates (numpy / by hand)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, SnellaConfig, attach, update_sparsity
from valora_jax.adapters.allocator import kept_fraction, share_budget, snella_modules


def test_cubic_schedule_by_hand():
    cfg = SnellaConfig(init_ratio=0.2, target_ratio=0.8, total_steps=10, warmup_steps=2, final_steps=2)
    # kept fraction: 0.8 until step 2, 0.2 + 0.6 (1 - (t - 2) / 6)^3 until step 8, then 0.2
    for step, want in [(0, 0.8), (2, 0.8), (5, 0.2 + 0.6 * 0.5 ** 3), (7, 0.2 + 0.6 * (1 / 6) ** 3), (8, 0.2), (50, 0.2)]:
        assert float(kept_fraction(step, cfg)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("scores, sizes, budget, want", [
    ([1, 1, 2], [10, 10, 100], 40, [10, 10, 20]),   # proportional, nothing capped
    ([1, 1, 2], [10, 10, 100], 100, [10, 10, 80]),  # 25, 25, 50 -> two capped at 10, the rest goes to the third
    ([4, 1, 1], [5, 30, 30], 35, [5, 15, 15]),      # cap then split evenly
    ([0, 0, 0], [10, 30, 60], 50, [5, 15, 30]),     # no scores yet: the global fraction everywhere
])
def test_share_budget_by_hand(scores, sizes, budget, want):
    got = share_budget(jnp.asarray(scores, jnp.float32), jnp.asarray(sizes, jnp.float32), jnp.float32(budget))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def numpy_water_fill(scores, sizes, budget):
    """min(size, c * score) summing to budget, c found by bisection (float64)."""
    lo, hi = 0.0, float(sizes.max() / scores.min())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(sizes, mid * scores).sum() < budget else (lo, mid)
    return np.minimum(sizes, lo * scores)


def numpy_scores(theta, grad, sens, unc, beta1, beta2):
    current = np.abs(theta * grad)
    sens = beta1 * sens + (1 - beta1) * current
    unc = beta2 * unc + (1 - beta2) * np.abs(current - sens)
    return sens, unc


def test_update_sparsity_against_numpy():
    cfg = SnellaConfig(init_ratio=0.1, target_ratio=0.7, total_steps=20)
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=2, targets=("q_proj", "down_proj"), snella=cfg), nnx.Rngs(0))
    modules = snella_modules(model)
    assert len(modules) == 4
    rng = np.random.default_rng(0)
    ema = {path: {n: (np.zeros(getattr(m, n).shape), np.zeros(getattr(m, n).shape)) for n in ("A", "B")}
           for path, m in modules}
    for step in (3, 4):
        grads = nnx.map_state(lambda _, v: v.replace(jnp.asarray(rng.standard_normal(v.shape), jnp.float32)),
                              nnx.state(model, AdapterParam))
        flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
        mean_scores = []
        for path, m in modules:
            parts = []
            for n in ("A", "B"):
                sens, unc = numpy_scores(np.asarray(getattr(m, n)[...], np.float64), flat[(*path, n)], *ema[path][n],
                                         0.85, 0.85)
                ema[path][n] = (sens, unc)
                parts.append((sens * unc).ravel())
            mean_scores.append(np.concatenate(parts).mean())
        update_sparsity(model, grads, step)
        sizes = np.asarray([m.A.shape[0] * m.B.shape[0] for _, m in modules], np.float64)
        kept_total = (0.3 + 0.6 * (1 - step / 20) ** 3) * sizes.sum()
        kept = numpy_water_fill(np.asarray(mean_scores), sizes, kept_total)
        for (path, m), k, size in zip(modules, kept, sizes):
            np.testing.assert_allclose(np.asarray(m.sensitivity_A[...]), ema[path]["A"][0], rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(np.asarray(m.uncertainty_B[...]), ema[path]["B"][1], rtol=1e-4, atol=1e-9)
            assert float(m.sparsity[...]) == pytest.approx(1 - k / size, rel=1e-4)
    levels = [float(m.sparsity[...]) for _, m in modules]
    assert len(set(levels)) > 1, "matrices with different scores get different levels"
