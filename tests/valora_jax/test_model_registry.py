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


_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656}
# config.json of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct as published (transformers 4.x style:
# flat text fields, `rope_scaling` of type "mrope", vision `in_chans`); shapes only matter here.
PUBLISHED_CONFIGS = {
    "qwen2-vl-2b": {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", **_IDS,
        "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768,
        "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **_IDS,
        "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000,
        "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_config_json_parses_to_the_preset(tmp_path, name):
    from valora_jax.loading import load_config

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS[name]))
    family, cfg = load_config(tmp_path)
    assert family.architectures == tuple(PUBLISHED_CONFIGS[name]["architectures"])
    assert cfg == preset(name)
