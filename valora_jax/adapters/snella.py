"""SNELLA: a kernelised, sparsified full-rank update dW_s = sparsify(k(A, B)) added to a projection.

Behaviour follows the authors' released code (github ssfgunner/SNELL, `model/vision_transformer_timm.py`
class `SNELLA`, `sparse_allocator.py`); where their paper's equations read differently, the code wins.

Kernel (METHODS.md section 3), in this project's (d_in, d_out) layout: A (d_in, r), B (d_out, r), the rank
split into P equal chunks (their (P, d, r / P) factor tensors), K_ij = sum_p c_p ||A_i,p - B_j,p||_2
(c = (+0.1, -0.1) by default), and SNELLA's mixed kernel dW = K + alpha * softmax(K / gamma, over the
output index j) + beta with learnable scalars alpha, gamma, beta (init 1, 1, 0). Distances use
|a|^2 + |b|^2 - 2 a.b (no (d_in, d_out, r) temporary), clamped at 1e-12 before the square root so the
gradient stays finite where a chunk of A_i equals B_j.

Initialisation: both factors uniform(+-1/sqrt(d * r / P)), d = d_in for A and d_out for B: what torch's
`kaiming_uniform_(a=sqrt(5))` draws on their (P, d, r / P) tensors, whose fan-in is d * r / P.

Sparsifier, as the released code computes it: tau = the `sparsity`-quantile of |dW| (linear interpolation,
as numpy and torch; found by bisection, not a sort: `magnitude_quantile`), and
dW_s = dW * stop_gradient(|dW| * [|dW| > tau]): a kept entry is multiplied by its own (detached)
magnitude, so it becomes sign(dW) dW^2 and its gradient is the upstream gradient times |dW|. The paper's
Eq. 5 reads dW * max(|dW| - |tau|, 0) instead; that is not what the authors train.

Training regularisers of their scripts: dropout on the adapter input and drop-path (a whole sample's
delta dropped, the others scaled by 1 / keep) on its output, rates from `SnellaConfig` (0.1 each). Their
ViT shares one input-dropout mask between q, k and v and has none on the attention output projection;
here every adapted projection draws its own mask.

Memory: the delta x @ dW_s runs under `jax.checkpoint`, so only (the dropped-out) x and the factors are
kept for the backward pass and dW (d_in x d_out) is recomputed there instead of stored.

The allocator state (per-parameter sensitivity and uncertainty EMAs of A and B, the matrix's quantile
level `sparsity`) lives here as `AdapterState`; `valora_jax.adapters.allocator` updates it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from valora_jax.adapters.lora import input_dropout, kaiming_uniform
from valora_jax.adapters.variables import AdapterParam, AdapterState
from valora_jax.layers import Linear

DISTANCE_FLOOR = 1e-12


def piecewise_linear_kernel(a: jax.Array, b: jax.Array, coefficients: tuple[float, ...]) -> jax.Array:
    """K (d_in, d_out): K_ij = sum_p c_p ||a_i,p - b_j,p||_2 over len(coefficients) equal rank chunks."""
    out = 0.0
    for c, a_p, b_p in zip(coefficients, jnp.split(a, len(coefficients), axis=1),
                           jnp.split(b, len(coefficients), axis=1), strict=True):
        squared = jnp.sum(a_p * a_p, 1)[:, None] + jnp.sum(b_p * b_p, 1)[None, :] - 2.0 * (a_p @ b_p.T)
        out = out + c * jnp.sqrt(jnp.maximum(squared, DISTANCE_FLOOR))
    return out


def mixed_kernel(a, b, alpha, gamma, beta, coefficients: tuple[float, ...]) -> jax.Array:
    """SNELLA's dW = K + alpha * softmax(K / gamma, output axis) + beta."""
    k = piecewise_linear_kernel(a, b, coefficients)
    return k + alpha * jax.nn.softmax(k / gamma, axis=1) + beta


def magnitude_quantile(dw: jax.Array, level: jax.Array) -> jax.Array:
    """The `level`-quantile of |dW| by numpy's linear method, found without sorting.

    A sort (jnp.quantile's) would put a sorted copy of every dense dW among a training step's temporaries
    (above LoRA's and full fine-tuning's peak at 7B widths). Non-negative floats order as their integer bit
    patterns, so the k-th smallest |dW| is found exactly by bisection on the pattern: one count(|dW| <= mid)
    pass per bit, nothing held beyond dW where the comparison fuses into the reduction (GPU; XLA:CPU
    materialises each pass's mask, so its compiled analysis does not shrink). The (k+1)-th is the k-th again under ties, else the smallest
    value above it. Position arithmetic is jnp.quantile's (in `level`'s dtype); the interpolation is
    numpy's, so tau never leaves [k-th, (k+1)-th] and equals a tied value exactly.
    """
    level = jnp.asarray(level)
    n = dw.size
    position = level * (jnp.asarray(n, level.dtype) - 1)
    high_weight = position - jnp.floor(position)
    low = jnp.clip(jnp.floor(position), 0, n - 1).astype(jnp.int32)
    high = jnp.clip(jnp.ceil(position), 0, n - 1).astype(jnp.int32)

    # Searched as patterns, compared as floats: the loop then reads dW itself, with no |dW| or integer copy.
    int_dtype = jnp.dtype(f"int{8 * dw.dtype.itemsize}")
    as_float = lambda pattern: jax.lax.bitcast_convert_type(pattern, dw.dtype)
    count_at_most = lambda value: jnp.sum((dw <= value) & (dw >= -value), dtype=jnp.int32)

    def halve(_, bounds):  # invariant: the k-th smallest |dW|'s pattern lies in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = count_at_most(as_float(mid)) > low
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    infinity = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, dw.dtype), int_dtype)
    kth, _ = jax.lax.fori_loop(0, 8 * dw.dtype.itemsize - 1, halve, (jnp.zeros((), int_dtype), infinity))
    low_value = as_float(kth)
    magnitude = jnp.abs(dw)
    above = jnp.min(jnp.where(magnitude > low_value, magnitude, jnp.inf))
    high_value = jnp.where(count_at_most(low_value) > high, low_value, above)
    low_value, high_value = low_value.astype(level.dtype), high_value.astype(level.dtype)
    step = high_value - low_value  # numpy's lerp: exact at both ends, so ties give exactly the tied value
    tau = jnp.where(high_weight >= 0.5, high_value - step * (1 - high_weight), low_value + step * high_weight)
    return tau.astype(dw.dtype)


def sparsify(dw: jax.Array, level: jax.Array) -> jax.Array:
    """dW * stop_gradient(|dW| * [|dW| > tau]), tau the `level`-quantile of |dW| (the released code's rule)."""
    magnitude = jax.lax.stop_gradient(jnp.abs(dw))
    tau = magnitude_quantile(jax.lax.stop_gradient(dw), level)
    return dw * jnp.where(magnitude > tau, magnitude, 0.0)


def sparse_delta_weight(a, b, alpha, gamma, beta, level, coefficients: tuple[float, ...]) -> jax.Array:
    return sparsify(mixed_kernel(a, b, alpha, gamma, beta, coefficients), level)


def _apply_delta(x, a, b, alpha, gamma, beta, level, *, coefficients):
    return x @ sparse_delta_weight(a, b, alpha, gamma, beta, level, coefficients).astype(x.dtype)


def factor_init(key: jax.Array, rows: int, rank: int, chunks: int, dtype) -> jax.Array:
    """A (rows, rank) factor drawn as the released code draws its (chunks, rows, rank / chunks) tensor:
    `kaiming_uniform_(a=sqrt(5))`, fan-in rows * rank / chunks; chunk p of our rank axis is their slice p."""
    sliced = kaiming_uniform(in_axis=1, out_axis=0)(key, (chunks, rows, rank // chunks), dtype)
    return sliced.transpose(1, 0, 2).reshape(rows, rank)


class Snella(nnx.Module):
    """The sparse kernelised update of one `Linear` (attached at `linear.adapter`)."""

    def __init__(self, linear: Linear, *, rank: int, coefficients: tuple[float, ...], sparsity: float,
                 dropout: float, drop_path: float, dtype, rngs: nnx.Rngs):
        axes = getattr(linear.kernel, "logical_axes", (None, None))
        d_in, d_out = linear.in_features, linear.out_features
        chunks = len(coefficients)
        self.A = AdapterParam(factor_init(rngs.params(), d_in, rank, chunks, dtype), logical_axes=(axes[0], None))
        self.B = AdapterParam(factor_init(rngs.params(), d_out, rank, chunks, dtype), logical_axes=(axes[1], None))
        self.kernel_alpha = AdapterParam(jnp.ones((), dtype))
        self.kernel_gamma = AdapterParam(jnp.ones((), dtype))
        self.kernel_beta = AdapterParam(jnp.zeros((), dtype))
        self.sparsity = AdapterState(jnp.asarray(sparsity, jnp.float32))
        self.sensitivity_A = AdapterState(jnp.zeros((d_in, rank), jnp.float32))
        self.sensitivity_B = AdapterState(jnp.zeros((d_out, rank), jnp.float32))
        self.uncertainty_A = AdapterState(jnp.zeros((d_in, rank), jnp.float32))
        self.uncertainty_B = AdapterState(jnp.zeros((d_out, rank), jnp.float32))
        self.coefficients = tuple(coefficients)
        self.dropout = input_dropout(dropout, rngs)
        # Drop-path draws one keep / drop per sample: dropout applied to a (batch, 1, ...) vector of ones.
        self.drop_path = input_dropout(drop_path, rngs)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def num_entries(self) -> int:
        """Entries of dW, the unit of the sparsity budget."""
        return self.A.shape[0] * self.B.shape[0]

    def _params(self):
        return (self.A[...], self.B[...], self.kernel_alpha[...], self.kernel_gamma[...], self.kernel_beta[...],
                self.sparsity[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.merged:
            return jnp.zeros((), x.dtype)
        h = x if self.dropout is None else self.dropout(x)
        apply = jax.checkpoint(functools.partial(_apply_delta, coefficients=self.coefficients))
        delta = apply(h, *self._params())
        if self.drop_path is None:
            return delta
        return delta * self.drop_path(jnp.ones((x.shape[0],) + (1,) * (x.ndim - 1), x.dtype))

    def delta_weight(self) -> jax.Array:
        """(d_in, d_out) float32 dW_s at the current sparsity level."""
        params = [p.astype(jnp.float32) for p in self._params()]
        return sparse_delta_weight(*params, self.coefficients)

    def merge_into(self, linear: Linear) -> None:
        linear.kernel.set_value((linear.kernel[...].astype(jnp.float32) + self.delta_weight()).astype(linear.kernel.dtype))

    def unmerge_from(self, linear: Linear) -> None:
        linear.kernel.set_value((linear.kernel[...].astype(jnp.float32) - self.delta_weight()).astype(linear.kernel.dtype))

    def update_scores(self, grad_a: jax.Array, grad_b: jax.Array, beta1: float, beta2: float) -> jax.Array:
        """Advance the sensitivity / uncertainty EMAs of A and B by one step; return the matrix's score.

        Sensitivity I = |theta * grad| (non-finite entries count as 0); Ibar <- beta1 Ibar + (1 - beta1) I;
        U <- beta2 U + (1 - beta2) |I - Ibar|; score = mean(Ibar * U over A) + mean(Ibar * U over B).
        """
        score = 0.0
        for theta, grad, sens, unc in ((self.A, grad_a, self.sensitivity_A, self.uncertainty_A),
                                       (self.B, grad_b, self.sensitivity_B, self.uncertainty_B)):
            current = jnp.abs(theta[...].astype(jnp.float32) * grad.astype(jnp.float32))
            current = jnp.where(jnp.isfinite(current), current, 0.0)
            sens.set_value(beta1 * sens[...] + (1.0 - beta1) * current)
            unc.set_value(beta2 * unc[...] + (1.0 - beta2) * jnp.abs(current - sens[...]))
            score = score + jnp.mean(sens[...] * unc[...])
        return score
