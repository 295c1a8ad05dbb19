"""SNELLA's kernel, sparsifier, initialisation, dropout / drop-path and rematerialisation, against the
float64 numpy transcription of the authors' released code (`snella_reference`) and numpy written from
METHODS.md (the kernel with other chunk coefficients), on non-square matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import snella_reference as ref
from conftest import small_inputs, small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, SnellaConfig, attach
from valora_jax.adapters.snella import magnitude_quantile, mixed_kernel, piecewise_linear_kernel, sparsify

NO_DROPOUT = SnellaConfig(dropout=0.0, drop_path=0.0)


def numpy_kernel(a, b, coefficients):
    """K_ij = sum_p c_p ||a_i,p - b_j,p||_2, rank split into len(c) equal chunks; direct pairwise norms."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    chunk = a.shape[1] // len(coefficients)
    out = np.zeros((a.shape[0], b.shape[0]))
    for p, c in enumerate(coefficients):
        diff = a[:, None, p * chunk:(p + 1) * chunk] - b[None, :, p * chunk:(p + 1) * chunk]
        out += c * np.sqrt((diff ** 2).sum(-1))
    return out


def reference_delta(a, b, alpha, gamma, beta, level):
    """The released SNELLA's sparsified dW from our (d, r) factors."""
    weight = ref.path_integrals(ref.as_heads(a, 2), ref.as_heads(b, 2), alpha, gamma, beta)
    return ref.sparsify(weight, level)[0]


@pytest.fixture
def factors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((12, 6)).astype(np.float32), rng.standard_normal((9, 6)).astype(np.float32)


@pytest.mark.parametrize("coefficients", [(0.1, -0.1), (0.3, -0.2, 0.5)])
def test_piecewise_linear_kernel(factors, coefficients):
    a, b = factors
    got = np.asarray(piecewise_linear_kernel(jnp.asarray(a), jnp.asarray(b), coefficients))
    np.testing.assert_allclose(got, numpy_kernel(a, b, coefficients), rtol=1e-5, atol=1e-6)


def test_mixed_kernel_matches_the_released_code(factors):
    a, b = factors  # d_in 12, d_out 9: the softmax runs over the output axis
    got = np.asarray(mixed_kernel(jnp.asarray(a), jnp.asarray(b), 1.7, 0.05, -0.3, (0.1, -0.1)))
    want = ref.path_integrals(ref.as_heads(a, 2), ref.as_heads(b, 2), 1.7, 0.05, -0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", [0.0, 0.37, 0.9])
def test_sparsify_and_its_gradient_match_the_released_code(level):
    rng = np.random.default_rng(1)
    dw, upstream = rng.standard_normal((7, 11)).astype(np.float32), rng.standard_normal((7, 11)).astype(np.float32)
    got, vjp = jax.vjp(lambda w: sparsify(w, jnp.float32(level)), jnp.asarray(dw))
    want, multiplier = ref.sparsify(dw.astype(np.float64), level)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    # the multiplier |dW| [|dW| > tau] is detached: d(dW_s)/d(dW) is the multiplier itself
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(upstream))[0]), upstream * multiplier, rtol=1e-5, atol=1e-7)
    # the kept fraction is what the quantile level says (ties aside): 1 - level, within one entry
    assert abs((want != 0).sum() - (1 - level) * dw.size) <= 1


def test_sparsify_hand_values():
    dw = jnp.asarray([[-4.0, 1.0], [2.0, -3.0]])  # |dW| = 4, 1, 2, 3; median (linear) = 2.5
    np.testing.assert_array_equal(np.asarray(sparsify(dw, jnp.float32(0.5))), [[-16.0, 0.0], [0.0, -9.0]])
    grad = jax.grad(lambda w: jnp.sum(sparsify(w, jnp.float32(0.5))))(dw)
    np.testing.assert_array_equal(np.asarray(grad), [[4.0, 0.0], [0.0, 3.0]])


def quantile_cases():
    """5 x 13 matrices (n - 1 = 64, so level k / 64 is an exact position): distinct, tied and all-equal |dW|."""
    rng = np.random.default_rng(3)
    return {"distinct": rng.standard_normal((5, 13)), "ties": rng.integers(-3, 4, (5, 13)) * 0.25,
            "all equal": np.full((5, 13), -0.7),
            "zeros and one": np.where(np.arange(65).reshape(5, 13) == 37, -3e18, 0.0)}


@pytest.mark.parametrize("case", list(quantile_cases()))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_magnitude_quantile_is_the_exact_order_statistic(case, dtype):
    dw = jnp.asarray(quantile_cases()[case], dtype)
    ordered = np.sort(np.abs(np.asarray(dw, np.float32)).ravel())
    for k in (0, 1, 17, 32, 40, 63, 64):
        got = magnitude_quantile(dw, jnp.float32(k / 64))
        assert got.dtype == dtype and np.float32(got) == ordered[k], (k, got, ordered[k])


@pytest.mark.parametrize("case", list(quantile_cases()))
def test_magnitude_quantile_interpolates_as_numpy_and_keeps_numpys_set(case):
    dw = quantile_cases()[case].astype(np.float32)
    for level in np.random.default_rng(4).uniform(size=6).astype(np.float32):
        want = np.quantile(np.abs(dw).astype(np.float64), np.float64(level))
        np.testing.assert_allclose(float(magnitude_quantile(jnp.asarray(dw), level)), want, rtol=1e-6)
        kept = np.asarray(sparsify(jnp.asarray(dw), level)) != 0
        np.testing.assert_array_equal(kept, ref.sparsify(dw.astype(np.float64), level)[0] != 0)


def test_sparsified_training_step_has_no_sort():
    """The threshold is found by counting, not sorting: a sort would hold a sorted copy of every dense dW."""
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=4, targets=("down_proj",), snella=NO_DROPOUT), nnx.Rngs(0))
    graphdef, trained, rest = nnx.split(model, AdapterParam, ...)

    def loss(trained):
        return jnp.mean(nnx.merge(graphdef, trained, rest)(*small_inputs()) ** 2)

    text = jax.jit(jax.grad(loss)).lower(trained).as_text()
    assert "stablehlo.sort" not in text
    assert "stablehlo.while" in text  # the bisection is there


def test_snella_layer_matches_the_released_code_and_keeps_no_dense_residual():
    """y = x @ dW_s with dW_s from the reference; the gradient pass stores no (d_in, d_out) array."""
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=4, targets=("down_proj",), snella=NO_DROPOUT), nnx.Rngs(0))
    linear = model.language_model.layers[0].mlp.down_proj  # 64 -> 32
    snella = linear.adapter
    snella.kernel_alpha.set_value(jnp.float32(1.3))
    snella.kernel_gamma.set_value(jnp.float32(0.02))
    snella.kernel_beta.set_value(jnp.float32(0.05))
    snella.sparsity.set_value(jnp.float32(0.6))
    x = np.random.default_rng(2).standard_normal((3, linear.in_features)).astype(np.float32)
    dw = reference_delta(np.asarray(snella.A[...]), np.asarray(snella.B[...]), 1.3, 0.02, 0.05, 0.6)
    np.testing.assert_allclose(np.asarray(snella(jnp.asarray(x))), x.astype(np.float64) @ dw, rtol=1e-4, atol=1e-6)

    graphdef, params, rest = nnx.split(snella, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    _, backward = jax.vjp(loss, params, jnp.asarray(x))  # its leaves are the residuals kept for the backward pass
    residual_shapes = [tuple(leaf.shape) for leaf in jax.tree.leaves(backward)]
    assert (linear.in_features, linear.out_features) not in residual_shapes, residual_shapes
    assert (3, linear.in_features) in residual_shapes  # the input is what is kept


def test_factor_init_bounds_match_the_released_code():
    """A and B uniform in +-1/sqrt(d * r / heads): kaiming_uniform_(a=sqrt(5)) on (heads, d, r / heads)."""
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=8, targets=("down_proj", "up_proj")), nnx.Rngs(0))
    for layer in model.language_model.layers:
        for linear in (layer.mlp.down_proj, layer.mlp.up_proj):  # 64 -> 32 and 32 -> 64
            bounds = ref.init_bounds(linear.in_features, linear.out_features, 8, 2)
            for factor, bound in zip((linear.adapter.A[...], linear.adapter.B[...]), bounds):
                values = np.abs(np.asarray(factor))
                assert values.max() <= bound and values.max() > 0.97 * bound, (values.max(), bound)
                assert np.mean(values) == pytest.approx(bound / 2, rel=0.1)  # uniform: E|u| = bound / 2


def dense_down_proj_adapter(snella_config):
    """The first down_proj's SNELLA (64 -> 32) under `snella_config`, at sparsity level 0."""
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=4, targets=("down_proj",), snella=snella_config), nnx.Rngs(0))
    snella = model.language_model.layers[0].mlp.down_proj.adapter
    snella.sparsity.set_value(jnp.float32(0.0))
    return snella


def test_dropout_on_the_input_and_drop_path_on_the_output():
    """Training: each input entry dropped (kept ones scaled by 1 / keep), each sample's delta dropped as a
    whole (kept ones scaled); a new draw every call; eval: neither."""
    # one non-zero input feature per token: dropout keeps each token's delta (x2) or zeroes it
    x = jnp.asarray(np.eye(64, dtype=np.float32)[np.arange(16 * 4) % 64].reshape(16, 4, 64) * 3.0)
    snella = dense_down_proj_adapter(SnellaConfig(dropout=0.5, drop_path=0.0))
    snella.eval()
    clean = np.asarray(snella(x))
    snella.train()
    first, second = np.asarray(snella(x)), np.asarray(snella(x))
    for got in (first, second):
        kept = np.abs(got).sum(-1) > 0
        np.testing.assert_allclose(got[kept], 2 * clean[kept], rtol=1e-5)
        assert 0.2 < kept.mean() < 0.8 and len(set(kept.sum(1))) > 1, "tokens are dropped one by one"
    assert not np.array_equal(first, second), "a new mask every call"

    snella = dense_down_proj_adapter(SnellaConfig(dropout=0.0, drop_path=0.5))
    got = np.asarray(snella(x))
    kept = np.abs(got).sum((1, 2)) > 0
    assert 0 < kept.sum() < 16, "some samples dropped"
    np.testing.assert_allclose(got[kept], 2 * clean[kept], rtol=1e-5)
    assert not got[~kept].any()
    snella.eval()
    np.testing.assert_array_equal(np.asarray(snella(x)), clean)


def test_snella_adapts_vision_and_language():
    model = small_model()
    attach(model, AdapterConfig(kind="snella", rank=2, towers=("vision_tower", "language_model"),
                                targets=("fc1", "gate_proj")), nnx.Rngs(0))
    assert model.vision_tower.layers[1].mlp.fc1.adapter is not None
    assert model.language_model.layers[1].mlp.gate_proj.adapter is not None
    assert np.isfinite(np.asarray(model(*small_inputs()))).all()
