"""save_adapter / load_adapter round trips and the errors of files that do not fit the model."""

import json

import numpy as np
import pytest
from conftest import randomize_adapter, small_inputs, small_model
from flax import nnx
from safetensors.numpy import load_file, save_file

from valora_jax.adapters import AdapterConfig, attach, extract, load_adapter, save_adapter
from valora_jax.adapters.attach import adapter_sites

CONFIGS = {
    "lora": AdapterConfig(kind="lora", rank=4, alpha=8, rank_pattern={"down_proj": 2}, towers=("language_model", "vision_tower")),
    "serial_lora": AdapterConfig(kind="serial_lora", rank=3, alpha=6, towers=("language_model", "vision_tower")),
    "snella": AdapterConfig(kind="snella", rank=4, targets=("q_proj", "up_proj")),
}


def saved(kind, directory):
    model = small_model(seed=1)
    attach(model, CONFIGS[kind], nnx.Rngs(0))
    model.eval()  # as a loaded adapter starts (SNELLA's dropout and drop-path off)
    randomize_adapter(model, seed=3)
    if kind == "snella":  # allocator state must travel with the adapter
        snella = model.language_model.layers[0].self_attn.q_proj.adapter
        snella.sparsity.set_value(np.float32(0.42))
        snella.sensitivity_A.set_value(np.full(snella.A.shape, 0.5, np.float32))
    save_adapter(model, directory)
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_round_trip(kind, tmp_path):
    model = saved(kind, tmp_path)
    fresh = small_model(seed=1)
    assert load_adapter(fresh, tmp_path).kind == kind
    inputs = small_inputs()
    np.testing.assert_array_equal(np.asarray(fresh(*inputs)), np.asarray(model(*inputs)))
    want, got = extract(model), extract(fresh)
    assert sorted(got) == sorted(want)
    for path in want:
        for name in want[path]:
            np.testing.assert_array_equal(np.asarray(got[path][name]), np.asarray(want[path][name]), err_msg=f"{path}.{name}")


def assert_nothing_attached(model):
    assert list(adapter_sites(model)) == [] and getattr(model, "adapter_config", None) is None


def edit_config(directory, **fields):
    """Overwrite fields of a saved adapter_config.json, as a hand-edited or mismatched file would."""
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_shape_mismatch_names_the_tensor(tmp_path):
    saved("lora", tmp_path)
    edit_config(tmp_path, r=5)  # every module without an override now expects rank 5
    model = small_model()
    with pytest.raises(ValueError, match=r"lora_A\.weight' has shape \(4, "):
        load_adapter(model, tmp_path)
    assert_nothing_attached(model)


def test_unknown_module_names_the_tensor(tmp_path):
    saved("lora", tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.self_attn", "layers.7.self_attn"): v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = small_model()
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\..*which this model does not have"):
        load_adapter(model, tmp_path)
    assert_nothing_attached(model)


def test_other_model_shapes_name_the_tensor(tmp_path):
    saved("serial_lora", tmp_path)
    other = small_model(num_key_value_heads=2)  # same shapes for serial LoRA: it loads
    load_adapter(other, tmp_path)
    edit_config(tmp_path, rank=2)
    model = small_model()
    with pytest.raises(ValueError, match=r"qkv_input_adapter\.A' has shape \(32, 3\), the model expects \(32, 2\)"):
        load_adapter(model, tmp_path)
    assert_nothing_attached(model)


def test_kind_mismatch_names_the_tensor(tmp_path):
    saved("snella", tmp_path)
    edit_config(tmp_path, kind="lora")
    model = small_model()
    with pytest.raises(ValueError, match=r"tensor 'language_model\.layers\.0\.mlp\.up_proj\.adapter\.B' has shape \(64, 4\), the model expects \(4, 64\)"):
        load_adapter(model, tmp_path)
    assert_nothing_attached(model)


def test_missing_tensor_and_attached_model(tmp_path):
    saved("snella", tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["language_model.layers.1.mlp.up_proj.adapter.uncertainty_B"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = small_model()
    with pytest.raises(ValueError, match=r"'language_model\.layers\.1\.mlp\.up_proj\.adapter\.uncertainty_B' is missing"):
        load_adapter(model, tmp_path)
    assert_nothing_attached(model)
    attach(model, CONFIGS["lora"], nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has an adapter"):
        load_adapter(model, tmp_path)


def test_format_versions(tmp_path):
    """Files carry format version 2. Version 1 (no field): Serial LoRA loads unchanged; SNELLA, trained for
    another sparsifier, is refused with the reason; newer versions are refused."""
    saved("serial_lora", tmp_path / "serial")
    saved("snella", tmp_path / "snella")
    for directory in (tmp_path / "serial", tmp_path / "snella"):
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["adapter_format_version"] == 2
        del config["adapter_format_version"]
        (directory / "adapter_config.json").write_text(json.dumps(config))
    load_adapter(small_model(seed=1), tmp_path / "serial")
    model = small_model()
    with pytest.raises(ValueError, match=r"SNELLA adapter of format version 1.*max\(\|dW\| - \|tau\|, 0\).*Retrain"):
        load_adapter(model, tmp_path / "snella")
    assert_nothing_attached(model)
    edit_config(tmp_path / "serial", adapter_format_version=3)
    with pytest.raises(ValueError, match=r"adapter_format_version 3 is not one this valora_jax reads \(1 to 2\)"):
        load_adapter(model, tmp_path / "serial")
