"""The family registry: config.json `architectures` picks the family, presets have the published shapes,
both Qwen-VL tensor layouts load to the same parameters, and the torch-free Qwen-VL processor gives what
transformers' processing gave the golden files."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from valora_jax import load_pretrained
from valora_jax.config import preset
from valora_jax.models.registry import build_model, supported_architectures

# Parameter counts of the published checkpoints (the model cards' totals; the vision encoder included).
PUBLISHED_PARAMS = {
    "qwen2-vl-2b": 2_208_985_600,
    "qwen2-vl-7b": 8_291_375_616,
    "qwen2.5-vl-3b": 3_754_622_976,
    "qwen2.5-vl-7b": 8_292_166_656,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_shapes_have_the_published_parameter_count(name):
    model = nnx.eval_shape(lambda: build_model(preset(name), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == PUBLISHED_PARAMS[name]


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, golden_dir):
    shutil.copytree(golden_dir / "qwen2_vl", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"], config["architectures"] = "qwen3_vl", ["Qwen3VLForConditionalGeneration"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*Qwen3VL") as err:
        load_pretrained(tmp_path / "m")
    for arch in ("LlavaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration"):
        assert arch in str(err.value) and arch in supported_architectures()


def published_to_v5(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    return "model.language_model." + key[len("model."):] if key.startswith("model.") else key


def v5_to_published(key: str) -> str:
    for prefix, repl in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if key.startswith(prefix):
            return repl + key[len(prefix):]
    return key


@pytest.mark.parametrize("name, rename", [("qwen2_vl", published_to_v5), ("qwen2_5_vl", v5_to_published)])
def test_the_other_tensor_layout_loads_the_same_parameters(tmp_path, golden_dir, name, rename):
    target = tmp_path / name
    shutil.copytree(golden_dir / name, target)
    tensors = load_file(target / "model.safetensors")
    renamed = {rename(k): v for k, v in tensors.items()}
    assert set(renamed) != set(tensors)
    save_file(renamed, target / "model.safetensors")
    want, _ = load_pretrained(golden_dir / name)
    got, _ = load_pretrained(target)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(want)), nnx.to_flat_state(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_processor_from_files_reproduces_the_golden_inputs(golden_dir):
    from safetensors import safe_open

    _, processor = load_pretrained(golden_dir / "qwen2_vl")
    with safe_open(str(golden_dir / "qwen2_vl.outputs.safetensors"), "np") as f:
        prompts = json.loads(json.loads(f.metadata()["info"])["prompts"])
    ref = load_file(golden_dir / "qwen2_vl.outputs.safetensors")
    images = [ref[f"image_{i}"] for i in range(3)]
    got = processor(prompts, images)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(got["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
