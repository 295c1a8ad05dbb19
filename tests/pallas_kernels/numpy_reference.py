"""Independent float64 numpy reference, written from the formula token by token."""
import numpy as np


def as_f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def lora_delta_f64(x, a_pool, b_pool, slot_ids, ranks, scales) -> np.ndarray:
    x, a_pool, b_pool = as_f64(x), as_f64(a_pool), as_f64(b_pool)
    slot_ids, ranks, scales = np.asarray(slot_ids), np.asarray(ranks), as_f64(scales)
    delta = np.zeros((x.shape[0], b_pool.shape[2]))
    for t, slot in enumerate(slot_ids):
        if not 0 <= slot < a_pool.shape[0]:  # -1, or any id outside the pool: no adapter
            continue
        r = ranks[slot]
        delta[t] = scales[slot] * ((x[t] @ a_pool[slot, :, :r]) @ b_pool[slot, :r, :])
    return delta


def relative_error(actual, expected: np.ndarray) -> float:
    actual = as_f64(actual)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))
