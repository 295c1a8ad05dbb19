"""Adapters on Qwen2.5-VL's vision encoder and decoder, by transformers' module names: Serial LoRA (whose
vision blocks compute q, k, v with one fused `qkv`) merges to the adapted logits and unmerges to the base
weights; LoRA trains under jit. (LoRA's merge on Qwen-VL: the PEFT golden test; SNELLA attaches to `Linear`
as LoRA does, and its merge is tested on LLaVA.)"""

import jax
import numpy as np
import optax
import pytest
from conftest import base_params, randomize_adapter
from flax import nnx
from safetensors.numpy import load_file

from valora_jax import load_pretrained
from valora_jax.adapters import AdapterConfig, AdapterParam, attach, merge, unmerge

TOWERS = ("language_model", "visual")
LORA = AdapterConfig(kind="lora", rank=2, alpha=4, towers=TOWERS,
                     targets=("qkv", "proj", "up_proj", "q_proj", "v_proj", "o_proj", "down_proj"))
SERIAL_LORA = AdapterConfig(kind="serial_lora", rank=2, alpha=2, towers=TOWERS, targets=("attn", "self_attn"))


@pytest.fixture(scope="module")
def golden(golden_dir):
    ref = load_file(golden_dir / "qwen2_5_vl.outputs.safetensors")
    model, _ = load_pretrained(golden_dir / "qwen2_5_vl")
    vision, positions = model.generation_inputs(ref["input_ids"], ref["attention_mask"], ref["pixel_values"],
                                                ref["image_grid_thw"])
    return golden_dir / "qwen2_5_vl", (ref["input_ids"], vision, ref["attention_mask"], positions)


@nnx.jit
def forward(model, ids, vision, mask, positions):
    return model.logits(model.hidden_states(ids, vision, mask, positions)[0])


def rel_err(a, b, mask):
    keep = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(a) - np.asarray(b))[keep].max() / np.abs(np.asarray(b))[keep].max())


def test_serial_lora_merge_unmerge(golden):
    path, inputs = golden
    mask = inputs[2]
    model, _ = load_pretrained(path)
    base = base_params(model)
    base_logits = forward(model, *inputs)
    attach(model, SERIAL_LORA, nnx.Rngs(1))
    assert model.visual.blocks[0].attn.qkv_input_adapter is not None
    assert model.language_model.layers[1].self_attn.qkv_input_adapter is not None
    randomize_adapter(model, seed=2)
    adapted = forward(model, *inputs)
    assert rel_err(adapted, base_logits, mask) > 1e-2
    merge(model)
    assert rel_err(forward(model, *inputs), adapted, mask) <= 1e-5
    unmerge(model)
    assert max(np.abs(base_params(model)[k] - base[k]).max() for k in base) <= 1e-6


def test_lora_trains_only_the_adapter(golden):
    path, (ids, vision, mask, positions) = golden
    model, _ = load_pretrained(path)
    attach(model, LORA, nnx.Rngs(1))
    assert model.visual.blocks[0].attn.qkv.adapter is not None
    base = base_params(model)
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=AdapterParam)

    def loss_fn(model):
        logits = model.logits(model.hidden_states(ids, vision, mask, positions)[0])[:, :-1]
        weights = (mask[:, 1:] * mask[:, :-1]).astype(np.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
        return (losses * weights).sum() / weights.sum()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.15, losses
    assert all(np.array_equal(base_params(model)[k], base[k]) for k in base), "base weights changed"
    grads = jax.tree.leaves(nnx.state(model, AdapterParam))
    assert grads and all(np.abs(np.asarray(g)).sum() > 0 for g in grads)


def test_adapter_pool_serves_a_mixed_batch_through_both_towers(golden, golden_dir, tmp_path):
    """Qwen2.5-VL's vision tower and decoder take the pool's per-row selection (the second row's two images
    through its adapter): a LoRA and a Serial LoRA on both towers equal each attached alone, unmerged and in
    mixture mode with either merged; PEFT's LoRA on both towers beside a base row gives PEFT's logits."""
    from valora_jax.adapters import save_adapter
    from valora_jax.adapters.pool import AdapterPool

    path, inputs = golden
    mask = inputs[2]
    alone = {}
    for seed, (name, config) in enumerate((("lora", LORA), ("serial", SERIAL_LORA))):
        model, _ = load_pretrained(path)
        attach(model, config, nnx.Rngs(seed))
        randomize_adapter(model, seed=10 + seed)
        save_adapter(model, tmp_path / name)
        alone[name] = np.asarray(forward(model, *inputs))
    model, _ = load_pretrained(path)
    alone[None] = np.asarray(forward(model, *inputs))
    pool = AdapterPool(model, slots=3, max_rank=4)
    for name in ("lora", "serial"):
        pool.load(name, tmp_path / name)
    pool.load("peft", golden_dir / "peft_lora_qwen2_5_vl")
    assert any(site.startswith("visual.") for site in pool._host["peft"].linear)

    @nnx.jit
    def pooled(model, ids, vision, mask, positions, adapters):
        return model.logits(model.hidden_states(ids, vision, mask, positions, adapters=adapters)[0])

    def check(rows, merged=None):
        pool.unmerge()
        if merged is not None:
            pool.merge(merged)
        got = np.asarray(pooled(model, *inputs, pool.select(rows)))
        for row, name in enumerate(rows):
            keep = np.asarray(mask)[row:row + 1]
            assert rel_err(got[row:row + 1], alone[name][row:row + 1], keep) <= 1e-5, (rows, merged, row)

    check(["lora", "serial"])
    check(["serial", "lora"], merged="lora")
    check(["lora", None], merged="serial")
    pool.unmerge()
    want = load_file(golden_dir / "peft_lora_qwen2_5_vl.outputs.safetensors")["logits"]
    got = np.asarray(pooled(model, *inputs, pool.select(["peft", None])))
    assert rel_err(got[:1], want[:1], np.asarray(mask)[:1]) <= 1e-4
    assert rel_err(got[1:], alone[None][1:], np.asarray(mask)[1:]) <= 1e-5


def test_peft_lora_saves_as_peft_wrote_it(golden_dir, tmp_path):
    """PEFT's LoRA on both towers, loaded and saved again: the same tensor names (transformers 5's module
    names) and values, and a config PEFT reads with the same rank, alpha and modules."""
    import json

    from valora_jax.adapters import load_adapter, save_adapter

    model, _ = load_pretrained(golden_dir / "qwen2_5_vl")
    load_adapter(model, golden_dir / "peft_lora_qwen2_5_vl")
    save_adapter(model, tmp_path / "again", base_model="qwen2_5_vl")
    want = load_file(golden_dir / "peft_lora_qwen2_5_vl" / "adapter_model.safetensors")
    got = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and any(".visual.blocks." in k for k in got)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4)
