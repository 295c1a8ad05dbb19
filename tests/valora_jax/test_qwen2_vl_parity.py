"""Parity with transformers' Qwen2-VL and Qwen2.5-VL (PyTorch, float32) through the golden files.

Two tiny checkpoints, both with spatial merge 2 and a batch of two left-padded prompts holding three
images of different sizes (one in the first prompt, two in the second): `qwen2_vl` (tied embeddings,
the published tensor layout `visual.*` / `model.*`) and `qwen2_5_vl` (untied, ragged edge windows with
a full-attention block, transformers 5's layout `model.visual.*` / `model.language_model.*`).
"""

import numpy as np
import pytest
from safetensors.numpy import load_file

from valora_jax import load_pretrained
from valora_jax.generation import Generator
from valora_jax.models.qwen2_vl.inputs import rope_positions, vision_inputs

MODELS = ["qwen2_vl", "qwen2_5_vl"]


def rel_err(got, ref, mask):
    """max |got - ref| / max |ref| over the real (unpadded) positions."""
    keep = mask.astype(bool)
    return np.abs(np.asarray(got)[keep] - ref[keep]).max() / np.abs(ref[keep]).max()


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, golden_dir):
    name = request.param
    model, processor = load_pretrained(golden_dir / name)
    return name, model, processor, load_file(golden_dir / f"{name}.outputs.safetensors")


def test_family_from_config(loaded):
    name, model, _, _ = loaded
    from valora_jax.models.registry import family_of

    assert model.config.version == name == family_of(model.config).name
    assert model.config.tie_word_embeddings == (name == "qwen2_vl") == (model.lm_head is None)


def test_mrope_positions_match_get_rope_index(loaded):
    _, model, _, ref = loaded
    got = rope_positions(model.config, ref["input_ids"], ref["attention_mask"], ref["image_grid_thw"])
    np.testing.assert_array_equal(got, ref["position_ids"])
    real = ref["attention_mask"].astype(bool)
    deltas = got.max(axis=(0, 2)) + 1 - real.sum(axis=1)
    np.testing.assert_array_equal(deltas, ref["rope_deltas"])


def test_image_features_match(loaded):
    _, model, _, ref = loaded
    vision, _ = model.generation_inputs(ref["input_ids"], ref["attention_mask"], ref["pixel_values"],
                                        ref["image_grid_thw"])
    got = np.asarray(model.visual(vision))[: len(ref["image_features"])]  # padding last
    np.testing.assert_allclose(got, ref["image_features"], rtol=0, atol=1e-4 * np.abs(ref["image_features"]).max())


def test_layouts_give_each_image_its_features(loaded):
    """A group per image: padded to shared buckets (3 images -> 4 groups of 64 patches) or exact (images of
    one size, training's layout), each image's features as transformers computes them."""
    _, model, _, ref = loaded
    grid, pixels = np.asarray(ref["image_grid_thw"]), np.asarray(ref["pixel_values"])
    padded = vision_inputs(model.config, pixels, grid, image_rows=[0, 1, 1])
    assert padded.pixel_values.shape[:2] == (4, 64) and padded.rows[:3, 0].tolist() == [0, 1, 1]
    n0 = int(grid[0].prod())
    twice = np.concatenate([pixels[:n0], pixels[:n0]]), np.concatenate([grid[:1], grid[:1]])
    exact = vision_inputs(model.config, *twice, image_rows=[0, 1], exact=True)
    assert exact.pixel_values.shape[:2] == (2, n0) and exact.order is None
    tokens = n0 // model.config.vision.merge_unit
    got = np.asarray(model.visual(exact))
    scale = np.abs(ref["image_features"]).max()
    np.testing.assert_allclose(got, np.concatenate([ref["image_features"][:tokens]] * 2), rtol=0, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="one size"):
        vision_inputs(model.config, pixels, grid, exact=True)


def test_logits_match_transformers(loaded):
    _, model, _, ref = loaded
    got = model(ref["input_ids"], ref["pixel_values"], ref["image_grid_thw"], ref["attention_mask"])
    assert got.shape == ref["logits"].shape
    assert rel_err(got, ref["logits"], ref["attention_mask"]) <= 1e-4


def test_greedy_generation_matches_transformers_generate(loaded):
    name, model, _, ref = loaded
    gen = Generator(model, max_len=128, min_bucket=64)
    tokens = gen.generate(ref["input_ids"], ref["pixel_values"], ref["attention_mask"],
                          image_grid_thw=ref["image_grid_thw"], max_new_tokens=16, eos_token_id=-1)
    np.testing.assert_array_equal(tokens, ref["generated_ids"])
    if name != "qwen2_5_vl":
        return  # the unbatched prompt and the compile counts once (each costs two compiles)
    n0 = int(ref["image_grid_thw"][0].prod())
    single = gen.generate(ref["single_input_ids"], ref["pixel_values"][:n0], image_grid_thw=ref["image_grid_thw"][:1],
                          max_new_tokens=16, eos_token_id=-1)
    np.testing.assert_array_equal(single, ref["single_generated_ids"])
    # Another image size in the same patch bucket (36 patches of image 1 instead of image 0's 24, both in the
    # 64 bucket) and prompt bucket reuses the compiled prefill and decode loop.
    programs = gen.compiled_programs()
    image_pad = model.config.image_token_id
    ids = ref["single_input_ids"][0]
    first = int(np.argmax(ids == image_pad))
    n1 = int(ref["image_grid_thw"][1].prod()) // 4
    other = np.concatenate([ids[:first], np.full(n1, image_pad), ids[first:][ids[first:] != image_pad]])[None]
    patches = ref["pixel_values"][n0: n0 + int(ref["image_grid_thw"][1].prod())]
    gen.generate(other, patches, image_grid_thw=ref["image_grid_thw"][1:2], max_new_tokens=16, eos_token_id=-1)
    assert gen.compiled_programs() == programs


def test_peft_lora_on_vision_and_decoder_matches_peft(golden_dir):
    """PEFT LoRA (vision blocks' fused qkv, proj and gated MLP; decoder attention and gate_proj) on qwen2_5_vl:
    adapted logits as PEFT's, merged logits as PEFT's merge_and_unload, unmerge restores the
    base weights."""
    import jax
    from flax import nnx

    from valora_jax.adapters import AdapterParam, load_adapter, merge, unmerge

    model, _ = load_pretrained(golden_dir / "qwen2_5_vl")
    ref = load_file(golden_dir / "qwen2_5_vl.outputs.safetensors")
    want = load_file(golden_dir / "peft_lora_qwen2_5_vl.outputs.safetensors")
    base = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    config = load_adapter(model, golden_dir / "peft_lora_qwen2_5_vl")
    assert set(config.towers) == {"visual", "language_model"}
    assert model.visual.blocks[0].attn.qkv.adapter is not None
    assert model.visual.blocks[2].mlp.up_proj.adapter is not None
    args = (ref["input_ids"], ref["pixel_values"], ref["image_grid_thw"], ref["attention_mask"])
    assert rel_err(model(*args), want["logits"], ref["attention_mask"]) <= 1e-4
    merge(model)
    assert rel_err(model(*args), want["merged_logits"], ref["attention_mask"]) <= 1e-4
    unmerge(model)
    restored = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(AdapterParam))))
    for (path, a), (_, b) in zip(nnx.to_flat_state(base), nnx.to_flat_state(restored)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=str(path))


def test_mesh_of_8_devices_matches_one_device(golden_dir):
    """qwen2_5_vl loaded onto a 2-way data x 4-way tensor-parallel mesh: logits as on one device."""
    import jax
    from flax import nnx

    from valora_jax.sharding import make_mesh

    assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
    ref = load_file(golden_dir / "qwen2_5_vl.outputs.safetensors")
    mesh = make_mesh(data=2, model=4)
    single, _ = load_pretrained(golden_dir / "qwen2_5_vl")
    sharded, _ = load_pretrained(golden_dir / "qwen2_5_vl", mesh=mesh)
    assert sharded.visual.blocks[0].attn.qkv.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    vision, positions = single.generation_inputs(ref["input_ids"], ref["attention_mask"], ref["pixel_values"],
                                                 ref["image_grid_thw"])

    @nnx.jit
    def logits(model, ids, vision, mask, positions):
        return model.logits(model.hidden_states(ids, vision, mask, positions)[0])

    args = (ref["input_ids"], vision, ref["attention_mask"], positions)
    expected = np.asarray(logits(single, *args))
    with jax.set_mesh(mesh):
        got = logits(sharded, *args)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_inputs_that_do_not_fit_the_images_are_errors(loaded):
    _, model, _, ref = loaded
    ids, mask, pixels, grid = ref["input_ids"], ref["attention_mask"], ref["pixel_values"], ref["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw gives 23 image tokens"):
        model.generation_inputs(np.where(ids == model.config.image_token_id, 5, ids), mask, pixels, grid)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.generation_inputs(ids, mask, pixels[:-4], grid)
    with pytest.raises(ValueError, match="videos are not supported"):
        model.generation_inputs(np.where(ids == 9, model.config.video_token_id, ids), mask, pixels, grid)
    with pytest.raises(ValueError, match="go together"):
        model.generation_inputs(ids, mask, pixels, None)
    swapped = grid[[0, 2, 1]]  # same token total, but the second prompt's runs no longer fit their images
    with pytest.raises(ValueError, match="does not match the next image_grid_thw"):
        model.generation_inputs(ids, mask, pixels, swapped)
    vision, _ = model.generation_inputs(ids, mask, pixels, grid)
    with pytest.raises(ValueError, match="M-RoPE position_ids"):
        model.hidden_states(ids, vision, mask, position_ids=np.zeros(ids.shape, np.int32))
