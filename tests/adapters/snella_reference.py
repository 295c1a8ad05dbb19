"""SNELLA as the authors' released code computes it, transcribed to float64 numpy for the tests.

Source: github ssfgunner/SNELL, `model/vision_transformer_timm.py` (class `SNELLA`: factor init, mixed
kernel, `sparsify`) and `sparse_allocator.py` (class `Allocator`), read at commit e9d5185. Their layout is
kept: factors are (heads, d, r / heads) tensors `In_Qs` / `Out_Qs`, dW is (d_in, d_out) and the layer
computes x @ dW. Torch's autograd is written out by hand where a test needs a gradient.
"""

from __future__ import annotations

import math

import numpy as np


def as_heads(factor: np.ndarray, heads: int) -> np.ndarray:
    """Our (d, r) factor as their (heads, d, r / heads) tensor: chunk p of the rank is head p."""
    d, r = factor.shape
    return factor.reshape(d, heads, r // heads).transpose(1, 0, 2).astype(np.float64)


def kaiming_uniform_bound(shape: tuple[int, ...], a: float = math.sqrt(5)) -> float:
    """torch.nn.init.kaiming_uniform_(a=a, mode='fan_in')'s bound for a tensor of `shape`."""
    receptive = math.prod(shape[2:])
    fan_in = shape[1] * receptive
    gain = math.sqrt(2.0 / (1 + a * a))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def init_bounds(d_in: int, d_out: int, rank: int, heads: int) -> tuple[float, float]:
    """Bounds of `In_Qs` (heads, d_in, rank / heads) and `Out_Qs` (heads, d_out, rank / heads)."""
    return (kaiming_uniform_bound((heads, d_in, rank // heads)),
            kaiming_uniform_bound((heads, d_out, rank // heads)))


def path_integrals(in_qs, out_qs, alpha, gamma, beta, scale=0.1):
    """SNELLA.pathIntegrals: sum_h c_h cdist(In_Qs[h], Out_Qs[h]) with c_h = scale * (-1)^h, then
    dist + alpha * softmax(dist / gamma, dim=-1) + beta."""
    heads = in_qs.shape[0]
    coeff = scale * np.asarray([(-1.0) ** h for h in range(heads)])[:, None, None]
    dist = np.sqrt(((in_qs[:, :, None, :] - out_qs[:, None, :, :]) ** 2).sum(-1))
    dist = (coeff * dist).sum(0)
    z = dist / gamma
    soft = np.exp(z - z.max(-1, keepdims=True))
    return dist + alpha * soft / soft.sum(-1, keepdims=True) + beta


def sparsify(weight: np.ndarray, init_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """SNELLA.sparsify: thres = quantile(|W| detached, init_thres) (torch's linear interpolation, as
    numpy's); n_sub = F.threshold(|W|, thres, 0) (|W| where |W| > thres, else 0), detached; W * n_sub.

    Returns (sparsified W, n_sub): n_sub is d(out)/d(W) elementwise, the multiplier being detached.
    """
    weight_abs = np.abs(weight)
    thres = np.quantile(weight_abs.ravel(), init_thres)
    n_sub = np.where(weight_abs > thres, weight_abs, 0.0)
    return weight * n_sub, n_sub


class Allocator:
    """sparse_allocator.Allocator with metric 'ipt', over matrices given as name -> (d_in, d_out).

    Their `update_ipt` reads module.In_Qs / Out_Qs and their .grad; here the values and gradients are
    passed in, per matrix, as (In_Qs, In_Qs grad, Out_Qs, Out_Qs grad) in any layout (scores are means).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], init_thres, target_ratio, init_warmup, final_warmup,
                 mask_interval, beta1, beta2, total_step):
        self.initial_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.beta1, self.beta2, self.total_step = beta1, beta2, total_step
        self.name_list = list(shapes)
        self.max_alloc_list = [d_in * d_out for d_in, d_out in shapes.values()]
        self.init_nonzero_param = sum((1 - init_thres) * n for n in self.max_alloc_list)
        self.target_nonzero_param = sum((1 - target_ratio) * n for n in self.max_alloc_list)
        self.thres = dict.fromkeys(shapes, init_thres)  # each module's init_thres
        self.sizes = dict(zip(self.name_list, self.max_alloc_list))
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}

    def schedule_threshold(self, step):
        if step <= self.initial_warmup:
            return self.init_nonzero_param, False
        if step > self.total_step - self.final_warmup:
            return self.target_nonzero_param, True
        mul_coeff = 1 - (step - self.initial_warmup) / (self.total_step - self.final_warmup - self.initial_warmup)
        curr_volume = self.target_nonzero_param + (self.init_nonzero_param - self.target_nonzero_param) * mul_coeff ** 3
        return int(curr_volume), step % self.mask_interval == 0

    def update_ipt(self, values_and_grads: dict[str, tuple[np.ndarray, ...]]):
        """Once per training step. Their code maps NaN sensitivities to 0 (torch.isnan)."""
        for name, (in_qs, in_grad, out_qs, out_grad) in values_and_grads.items():
            for key, p, g in ((f"{name}.In_Qs", in_qs, in_grad), (f"{name}.Out_Qs", out_qs, out_grad)):
                ipt = np.abs(np.asarray(p, np.float64) * np.asarray(g, np.float64))
                ipt = np.where(np.isnan(ipt), 0.0, ipt)
                avg = self.beta1 * self.exp_avg_ipt.get(key, 0.0) + (1 - self.beta1) * ipt
                self.exp_avg_ipt[key] = avg
                unc = self.exp_avg_unc.get(key, 0.0)
                self.exp_avg_unc[key] = self.beta2 * unc + (1 - self.beta2) * np.abs(ipt - avg)

    def scores(self) -> np.ndarray:
        """Per matrix: mean(In_Qs's ipt * unc) + mean(Out_Qs's ipt * unc) (mask_to_target_ratio)."""
        return np.asarray([sum((self.exp_avg_ipt[f"{n}.{q}"] * self.exp_avg_unc[f"{n}.{q}"]).mean()
                               for q in ("In_Qs", "Out_Qs")) for n in self.name_list])

    def mask_to_target_ratio(self, curr_volume, scores=None):
        scores = self.scores() if scores is None else np.asarray(scores, np.float64)
        if scores.sum() == 0:
            # Their code sets `scores = 1 / n`, a Python float, which their param_alloc cannot .squeeze();
            # equal shares are what it means.
            scores = np.full(len(scores), 1 / len(scores))
        else:
            scores = scores / scores.sum()
        alloc = param_alloc(scores, curr_volume, np.asarray(self.max_alloc_list, np.float64))
        for name, volume in zip(self.name_list, alloc):
            self.thres[name] = min(max(1 - float(volume / self.sizes[name]), 0), 1)
        return alloc

    def update(self, global_step):
        curr_volume, mask_ind = self.schedule_threshold(global_step)
        if mask_ind:
            self.mask_to_target_ratio(curr_volume)


def param_alloc(scores, curr_volume, max_alloc_volumes):
    """Allocator.param_alloc: int(volume * score) capped at the size, then the remainder handed to the
    matrices with room in proportion to their scores (capped at the room) until none is left; int() at the
    end. torch.min(float sizes, int volumes) promotes the running volumes to float, as here."""
    alloc = np.minimum(max_alloc_volumes, np.trunc(curr_volume * scores))
    delta = curr_volume - alloc.sum()
    for _ in range(10 * len(scores)):  # their `while alloc_delta > 0`; a bound instead of a hang
        if not delta > 0:
            break
        remain = max_alloc_volumes - alloc
        idx = np.nonzero(remain)[0]
        alloc[idx] += np.minimum(delta * scores[idx] / scores[idx].sum(), remain[idx])
        delta = curr_volume - alloc.sum()
    return np.trunc(alloc)
