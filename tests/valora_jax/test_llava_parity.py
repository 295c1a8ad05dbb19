"""Parity with transformers' LlavaForConditionalGeneration (PyTorch, float32) through the golden files.

Two tiny checkpoints: `llava_mha` (transformers-5 layout, multi-head attention, feature layer -2, CLS
dropped, with processor files) and `llava_gqa_legacy` (llava-hf published layout in two shards,
grouped-query attention, llama3 RoPE, tied embeddings, feature layer -1, CLS kept, no processor).
"""

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from valora_jax import load_pretrained
from valora_jax.generation import Generator

MODELS = ["llava_mha", "llava_gqa_legacy"]


@nnx.jit
def forward(model, input_ids, pixel_values, attention_mask, position_ids=None):
    return model(input_ids, pixel_values, attention_mask, position_ids=position_ids)


def rel_err(got, ref, mask):
    """max |got - ref| / max |ref| over the real (unpadded) positions."""
    keep = mask.astype(bool)
    return np.abs(np.asarray(got)[keep] - ref[keep]).max() / np.abs(ref[keep]).max()


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, golden_dir):
    name = request.param
    if name == "llava_gqa_legacy":
        with pytest.warns(UserWarning, match="no processor files"):
            model, processor = load_pretrained(golden_dir / name)
    else:
        model, processor = load_pretrained(golden_dir / name)
    return name, model, processor, load_file(golden_dir / f"{name}.outputs.safetensors")


def test_logits_match_transformers(loaded):
    _, model, _, ref = loaded
    got = forward(model, ref["input_ids"], ref["pixel_values"], ref["attention_mask"], ref["position_ids"])
    assert got.shape == ref["logits"].shape
    assert rel_err(got, ref["logits"], ref["attention_mask"]) <= 1e-4


def test_default_positions_match_transformers_forward(loaded):
    _, model, _, ref = loaded
    got = forward(model, ref["input_ids"], ref["pixel_values"], ref["attention_mask"])
    assert rel_err(got, ref["logits_default_positions"], ref["attention_mask"]) <= 1e-4


def test_image_features_match(loaded):
    _, model, _, ref = loaded
    got = np.asarray(nnx.jit(lambda m, x: m.image_features(x))(model, ref["pixel_values"]))
    np.testing.assert_allclose(got, ref["image_features"], rtol=0, atol=1e-4 * np.abs(ref["image_features"]).max())


def test_unbatched_prompt_matches(loaded):
    _, model, _, ref = loaded
    got = forward(model, ref["single_input_ids"], ref["single_pixel_values"], ref["single_attention_mask"])
    assert rel_err(got, ref["single_logits"], ref["single_attention_mask"]) <= 1e-4


def test_greedy_generation_matches_transformers_generate(loaded):
    _, model, _, ref = loaded
    gen = Generator(model, max_len=96)
    tokens = gen.generate(ref["input_ids"], ref["pixel_values"], ref["attention_mask"], max_new_tokens=16,
                          eos_token_id=-1)
    np.testing.assert_array_equal(tokens, ref["generated_ids"])
    single = gen.generate(ref["single_input_ids"], ref["single_pixel_values"], max_new_tokens=16, eos_token_id=-1)
    np.testing.assert_array_equal(single, ref["single_generated_ids"])


def test_processor_loaded_from_files_reproduces_inputs(golden_dir):
    import json

    from safetensors import safe_open

    _, processor = load_pretrained(golden_dir / "llava_mha")
    path = golden_dir / "llava_mha.outputs.safetensors"
    ref = load_file(path)
    with safe_open(path, "np") as f:
        prompts = json.loads(json.loads(f.metadata()["info"])["prompts"])  # a JSON list inside the JSON
    out = processor(images=list(ref["images"]), text=prompts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
    np.testing.assert_allclose(out["pixel_values"], ref["pixel_values"], atol=1e-6)
