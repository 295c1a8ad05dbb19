"""merge / unmerge exactness for every kind, on a small LLaVA with random non-zero adapter weights."""

import numpy as np
import pytest
from conftest import base_params, randomize_adapter, small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, attach, detach, merge, unmerge

TOWERS = ("language_model", "vision_tower", "multi_modal_projector")
KINDS = {
    "lora": AdapterConfig(kind="lora", rank=4, alpha=8, towers=TOWERS,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj",
                                   "down_proj", "fc1", "fc2", "linear_1", "linear_2")),
    "serial_lora": AdapterConfig(kind="serial_lora", rank=4, alpha=4, towers=TOWERS),
    "snella": AdapterConfig(kind="snella", rank=4, towers=TOWERS,
                            targets=("q_proj", "v_proj", "out_proj", "down_proj", "fc2", "linear_2")),
}


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merge_equals_adapted_and_unmerge_restores_base(kind, inputs):
    model = small_model(seed=3)
    base_before = base_params(model)
    base_logits = model(*inputs)
    attach(model, KINDS[kind], nnx.Rngs(1))
    model.eval()  # SNELLA's dropout and drop-path are training-time only; merging is for inference
    randomize_adapter(model, seed=2)
    adapted = model(*inputs)
    assert rel_err(adapted, base_logits) > 1e-2, "the adapter must change the logits for this test to mean anything"

    merge(model)
    merged_base = base_params(model)
    assert any(not np.array_equal(merged_base[k], base_before[k]) for k in base_before)
    assert rel_err(model(*inputs), adapted) <= 1e-5
    merge(model)  # idempotent: the delta is not added twice
    assert rel_err(model(*inputs), adapted) <= 1e-5

    unmerge(model)
    restored = base_params(model)
    assert max(np.abs(restored[k] - base_before[k]).max() for k in base_before) <= 1e-6
    assert rel_err(model(*inputs), adapted) <= 1e-5
    detach(model)
    assert rel_err(model(*inputs), base_logits) <= 2e-6  # float32 rounding of (W + dW) - dW, through the model


def test_detach_refuses_a_merged_adapter():
    model = small_model()
    attach(model, KINDS["lora"], nnx.Rngs(0))
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        detach(model)
