"""Interop with HF PEFT: adapters saved by PEFT load here with PEFT's logits, and ours load in PEFT.

References: tests/golden/peft_lora*/ (PEFT save_pretrained, random non-zero A/B) with the PEFT logits beside
them, and tests/golden/jax_saved_lora/ (saved here) with the logits PEFT gives for it (make_golden.py --saved-adapter).
"""

import json

import numpy as np
import pytest
from conftest import base_params
from jax_saved_lora import ADAPTER_DIR, CONFIG, PEFT_OUTPUTS, adapted_model, golden_inputs, logits
from safetensors.numpy import load_file

from valora_jax.adapters import load_adapter, merge, save_adapter, unmerge
from valora_jax.loading import load_pretrained


def max_rel_err(got, want, mask):
    real = mask.astype(bool)
    return float(np.abs(got - want)[real].max() / np.abs(want[real]).max())


@pytest.mark.parametrize("name", ["peft_lora", "peft_lora_vision"])
def test_peft_adapter_logits_match_peft(golden_dir, name, tmp_path):
    model, _ = load_pretrained(golden_dir / "llava_mha")
    base = base_params(model)
    config = load_adapter(model, golden_dir / name)
    ref = load_file(str(golden_dir / f"{name}.outputs.safetensors"))
    mask = ref["attention_mask"]
    assert max_rel_err(logits(model, ref), ref["logits"], mask) <= 1e-4
    merge(model)
    assert max_rel_err(logits(model, ref), ref["merged_logits"], mask) <= 1e-4
    unmerge(model)
    assert max(np.abs(base_params(model)[k] - base[k]).max() for k in base) <= 1e-6

    # saving it back writes PEFT's own tensors unchanged, with the same per-module ranks
    save_adapter(model, tmp_path)
    theirs, ours = load_file(str(golden_dir / name / "adapter_model.safetensors")), load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    peft_config = json.loads((golden_dir / name / "adapter_config.json").read_text())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["peft_type"]) == (peft_config["r"], peft_config["lora_alpha"], "LORA")
    assert config.rank == peft_config["r"]


def test_vision_adapter_rank_pattern_is_applied(golden_dir):
    model, _ = load_pretrained(golden_dir / "llava_mha")
    load_adapter(model, golden_dir / "peft_lora_vision")
    layers = model.language_model.layers
    assert layers[1].self_attn.v_proj.adapter.rank == 3 and layers[0].self_attn.v_proj.adapter.rank == 2
    assert layers[1].self_attn.v_proj.adapter.scaling == pytest.approx(4 / 3)
    assert model.vision_tower.layers[0].self_attn.out_proj.adapter is not None
    assert layers[0].self_attn.k_proj.adapter is None


def test_committed_jax_saved_adapter_is_what_save_adapter_writes(tmp_path):
    """The adapter PEFT's logits were recorded for is still what save_adapter produces (keys, shapes, values,
    config), and the JAX model it was saved from gives PEFT's logits, adapted and merged."""
    model = adapted_model()
    save_adapter(model, tmp_path, base_model="llava_mha")
    committed, today = load_file(str(ADAPTER_DIR / "adapter_model.safetensors")), load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(today) == sorted(committed)
    for key in committed:
        assert today[key].shape == committed[key].shape, key
        np.testing.assert_array_equal(today[key], committed[key])
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    peft = load_file(str(PEFT_OUTPUTS))
    assert max_rel_err(logits(model, peft), peft["logits"], peft["attention_mask"]) <= 1e-4
    merge(model)
    assert max_rel_err(logits(model, peft), peft["merged_logits"], peft["attention_mask"]) <= 1e-4
    assert CONFIG.rank_for("language_model.layers.0.mlp.down_proj") == 5


def test_committed_jax_saved_adapter_loads_back(golden_dir):
    model, _ = load_pretrained(golden_dir / "llava_mha")
    load_adapter(model, ADAPTER_DIR)
    peft = load_file(str(PEFT_OUTPUTS))
    assert max_rel_err(logits(model, golden_inputs()), peft["logits"], peft["attention_mask"]) <= 1e-4
    assert model.vision_tower.layers[1].mlp.fc1.adapter.scaling == pytest.approx(2.0 / 3)
