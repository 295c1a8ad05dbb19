"""The loader refuses bad checkpoints with errors that name the tensor, file or architecture."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from valora_jax import load_pretrained


@pytest.fixture
def checkpoint(tmp_path, golden_dir):
    """A writable copy of the single-file golden model: (dir, its tensors)."""
    target = tmp_path / "model"
    shutil.copytree(golden_dir / "llava_mha", target)
    return target, load_file(target / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    path, tensors = checkpoint
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*language_model\.layers\.1\.mlp\.up_proj\.kernel"):
        load_pretrained(path)


def test_unexpected_tensor_is_named(checkpoint):
    path, tensors = checkpoint
    tensors["language_model.model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected.*q_norm"):
        load_pretrained(path)


def test_shape_mismatch_is_named(checkpoint):
    path, tensors = checkpoint
    name = "multi_modal_projector.linear_2.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"multi_modal_projector\.linear_2\.weight.*shape"):
        load_pretrained(path)


def test_unsupported_architecture_is_named(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["model_type"], config["architectures"] = "llava_next", ["LlavaNextForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture.*llava_next"):
        load_pretrained(path)


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path, golden_dir):
    target = tmp_path / "legacy"
    shutil.copytree(golden_dir / "llava_gqa_legacy", target)
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_pretrained(target)


def test_bfloat16_load_keeps_values(golden_dir):
    import jax.numpy as jnp

    model, _ = load_pretrained(golden_dir / "llava_mha", dtype=jnp.bfloat16)
    kernel = model.language_model.layers[0].self_attn.q_proj.kernel[...]
    ref = load_file(golden_dir / "llava_mha" / "model.safetensors")["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(kernel, np.float32), ref.T, rtol=1e-2)
