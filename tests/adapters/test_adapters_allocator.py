"""SNELLA's bi-level allocator against the float64 transcription of the authors' `sparse_allocator.py`
(`snella_reference.Allocator`) and by hand: cubic budget, re-sharing schedule, per-matrix scores and
shares, EMA updates, on non-square matrices."""

import jax.numpy as jnp
import numpy as np
import pytest
import snella_reference as ref
from conftest import small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, SnellaConfig, attach, update_sparsity
from valora_jax.adapters.allocator import kept_fraction, reallocates, share_budget, snella_modules


def test_cubic_schedule_by_hand():
    cfg = SnellaConfig(init_ratio=0.2, target_ratio=0.8, total_steps=10, warmup_steps=2, final_steps=2)
    # kept fraction: 0.8 until step 2, 0.2 + 0.6 (1 - (t - 2) / 6)^3 until step 8, then 0.2
    for step, want in [(0, 0.8), (2, 0.8), (5, 0.2 + 0.6 * 0.5 ** 3), (7, 0.2 + 0.6 * (1 / 6) ** 3), (8, 0.2), (50, 0.2)]:
        assert float(kept_fraction(step, cfg)) == pytest.approx(want, rel=1e-6)


def test_reallocation_schedule_by_hand_and_as_the_released_code():
    cfg = SnellaConfig(total_steps=20, warmup_steps=2, final_steps=4, mask_interval=3)
    # never while step <= 2; every 3rd step while decaying; every step past 20 - 4
    want = [3, 6, 9, 12, 15, 17, 18, 19, 20, 21]
    assert [s for s in range(22) if reallocates(s, cfg)] == want
    released = ref.Allocator({"m": (2, 3)}, 0.1, 0.5, init_warmup=2, final_warmup=4, mask_interval=3,
                             beta1=0.85, beta2=0.85, total_step=20)
    assert [s for s in range(22) if released.schedule_threshold(s)[1]] == want


def test_default_interval_is_one_epoch_of_a_hundred():
    assert SnellaConfig(total_steps=1000).interval == 10
    assert SnellaConfig(total_steps=150).interval == 1
    assert SnellaConfig(total_steps=150, mask_interval=7).interval == 7
    with pytest.raises(ValueError, match="mask_interval"):
        SnellaConfig(mask_interval=0)
    with pytest.raises(ValueError, match="drop_path"):
        SnellaConfig(drop_path=1.0)


@pytest.mark.parametrize("scores, sizes, budget, want", [
    ([1, 1, 2], [10, 10, 100], 40, [10, 10, 20]),   # proportional, nothing capped
    ([1, 1, 2], [10, 10, 100], 100, [10, 10, 80]),  # 25, 25, 50 -> two capped at 10, the rest goes to the third
    ([4, 1, 1], [5, 30, 30], 35, [5, 15, 15]),      # 23, 5, 5 -> capped at 5, the other 20 split evenly
    ([0, 0, 0], [10, 30, 60], 50, [10, 20, 20]),    # no scores: equal shares (16 each), capped, the rest evenly
    ([1, 1, 1], [100, 100, 100], 100, [33, 33, 33]),  # whole entries, rounded down
])
def test_share_budget_by_hand(scores, sizes, budget, want):
    got = share_budget(jnp.asarray(scores, jnp.float32), jnp.asarray(sizes, jnp.float32), jnp.float32(budget))
    np.testing.assert_array_equal(np.asarray(got), want)
    shares = np.asarray(scores) / sum(scores) if sum(scores) else np.full(3, 1 / 3)  # as mask_to_target_ratio
    np.testing.assert_array_equal(ref.param_alloc(shares, budget, np.asarray(sizes, np.float64)), want)


@pytest.mark.parametrize("seed", range(4))
def test_share_budget_matches_the_released_code(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, 12).astype(np.float64) * rng.integers(1, 40, 12)  # d_in * d_out of 12 matrices
    scores = rng.exponential(size=12) ** 3  # skewed, so several matrices hit their size
    budget = float(np.floor(rng.uniform(0.3, 0.9) * sizes.sum()))
    got = np.asarray(share_budget(jnp.asarray(scores, jnp.float32), jnp.asarray(sizes, jnp.float32),
                                  jnp.float32(budget)))
    want = ref.param_alloc(scores / scores.sum(), budget, sizes)
    assert (want == sizes).sum() >= 2, "the case caps some matrices"
    np.testing.assert_allclose(got, want, atol=1)


def test_update_sparsity_matches_the_released_allocator():
    """16 steps of random gradients (one with NaNs) on six non-square and square matrices: the EMAs, the
    steps that re-share, and every matrix's level after every step (its share of the budget, which follows
    the per-matrix scores), within one entry."""
    cfg = SnellaConfig(init_ratio=0.1, target_ratio=0.7, total_steps=16, warmup_steps=2, final_steps=3,
                       mask_interval=3)
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=4, targets=("q_proj", "up_proj", "down_proj"), snella=cfg),
           nnx.Rngs(0))
    modules = snella_modules(model)
    names = [".".join(map(str, path)) for path, _ in modules]
    assert {(m.A.shape[0], m.B.shape[0]) for _, m in modules} == {(32, 32), (32, 64), (64, 32)}
    released = ref.Allocator({n: (m.A.shape[0], m.B.shape[0]) for n, (_, m) in zip(names, modules)},
                             cfg.init_ratio, cfg.target_ratio, init_warmup=2, final_warmup=3, mask_interval=3,
                             beta1=cfg.beta1, beta2=cfg.beta2, total_step=cfg.total_steps)
    shapes = {tuple(p): v.shape for p, v in nnx.to_flat_state(nnx.state(model, AdapterParam))}
    rng = np.random.default_rng(0)
    changed = []
    allocate = nnx.jit(update_sparsity)
    for step in range(1, 17):
        flat = {p: rng.standard_normal(shape).astype(np.float32) for p, shape in shapes.items()}
        if step == 5:  # NaN gradients count as zero sensitivity
            flat[(*modules[1][0], "B")][:3] = np.nan
        grads = nnx.map_state(lambda p, v: v.replace(jnp.asarray(flat[tuple(p)])), nnx.state(model, AdapterParam))
        released.update_ipt({n: (np.asarray(m.A[...]), flat[(*p, "A")], np.asarray(m.B[...]), flat[(*p, "B")])
                             for n, (p, m) in zip(names, modules)})
        before = [float(m.sparsity[...]) for _, m in modules]
        allocate(model, grads, jnp.int32(step))
        released.update(step)
        after = [float(m.sparsity[...]) for _, m in modules]
        if after != before:
            changed.append(step)
        for name, (_, m) in zip(names, modules):
            np.testing.assert_allclose(np.asarray(m.sensitivity_B[...]), released.exp_avg_ipt[f"{name}.Out_Qs"],
                                       rtol=1e-5, atol=1e-9)
            np.testing.assert_allclose(np.asarray(m.uncertainty_A[...]), released.exp_avg_unc[f"{name}.In_Qs"],
                                       rtol=1e-4, atol=1e-9)
            size = m.num_entries
            assert abs(float(m.sparsity[...]) - released.thres[name]) * size <= 1.01, (step, name)
    assert changed == [3, 6, 9, 12, 14, 15, 16]
    levels = [float(m.sparsity[...]) for _, m in modules]
    assert len(set(levels)) > 1, "matrices with different scores get different levels"
    kept = sum((1 - lv) * m.num_entries for lv, (_, m) in zip(levels, modules))
    assert abs(kept - (1 - cfg.target_ratio) * sum(m.num_entries for _, m in modules)) <= len(modules)


def test_score_is_the_sum_of_the_factor_means():
    """mean over A plus mean over B (not one mean over both: they differ for non-square matrices)."""
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=2, targets=("down_proj",)), nnx.Rngs(0))
    snella = model.language_model.layers[0].mlp.down_proj.adapter  # A (64, 2), B (32, 2)
    grad_a, grad_b = jnp.full(snella.A.shape, 2.0), jnp.full(snella.B.shape, 3.0)
    snella.A.set_value(jnp.ones(snella.A.shape))
    snella.B.set_value(jnp.ones(snella.B.shape))
    score = float(snella.update_scores(grad_a, grad_b, 0.5, 0.5))
    # I = 2 (A) and 3 (B); Ibar = I / 2; U = 0.5 |I - I / 2| = I / 4; score = I^2 / 8 per factor
    assert score == pytest.approx(4 / 8 + 9 / 8)


def test_non_finite_sensitivities_count_as_zero():
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=2, targets=("down_proj",)), nnx.Rngs(0))
    snella = model.language_model.layers[0].mlp.down_proj.adapter
    grad_a = jnp.asarray(np.where(np.arange(128).reshape(64, 2) % 3, np.inf, np.nan), jnp.float32)
    score = snella.update_scores(grad_a, jnp.zeros(snella.B.shape), 0.85, 0.85)
    assert float(score) == 0.0
    assert not np.asarray(snella.sensitivity_A[...]).any() and not np.asarray(snella.uncertainty_A[...]).any()
