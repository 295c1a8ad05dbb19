"""Target selection, per-module overrides, Serial LoRA's parameter count and forward, LoRA dropout."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_model
from flax import nnx

from valora_jax.adapters import AdapterConfig, attach, count_trainable
from valora_jax.adapters.attach import adapter_sites


def test_selection_follows_peft_rules():
    config = AdapterConfig(targets=("q_proj", "mlp.down_proj"), rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
                           alpha_pattern={"down_proj": 4.0})
    assert config.selects("language_model.layers.0.self_attn.q_proj")
    assert config.selects("language_model.layers.3.mlp.down_proj")
    assert not config.selects("language_model.layers.0.self_attn.k_proj")
    assert not config.selects("vision_tower.layers.0.self_attn.q_proj")  # tower not selected
    assert not config.selects("language_model.layers.0.self_attn.xq_proj")  # suffix at a '.' boundary only
    assert config.rank_for("language_model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("language_model.layers.11.self_attn.q_proj") == 8
    assert config.scaling_for("language_model.layers.1.self_attn.q_proj") == 16.0 / 2
    assert config.scaling_for("language_model.layers.0.mlp.down_proj") == 4.0 / 8
    regex = AdapterConfig(targets=r"language_model\.layers\.0\..*_proj", towers=("language_model",))
    assert regex.selects("language_model.layers.0.mlp.up_proj") and not regex.selects("language_model.layers.1.mlp.up_proj")
    assert AdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="selects no module"):
        attach(small_model(), AdapterConfig(targets=("nothing",)), nnx.Rngs(0))


def test_serial_lora_has_a_quarter_of_the_parameters():
    d, r, layers = 32, 4, 2  # the small model's text hidden size and layer count (MHA: q, k, v, o all d x d)
    lora, serial = small_model(), small_model()
    attach(lora, AdapterConfig(kind="lora", rank=r, targets=("q_proj", "k_proj", "v_proj", "o_proj")), nnx.Rngs(0))
    attach(serial, AdapterConfig(kind="serial_lora", rank=r), nnx.Rngs(0))
    assert count_trainable(lora) == layers * 4 * 2 * d * r
    assert count_trainable(serial) == layers * 2 * d * r
    assert 4 * count_trainable(serial) == count_trainable(lora)


def test_serial_lora_feeds_qkv_with_the_transformed_input():
    model = small_model()
    attach(model, AdapterConfig(kind="serial_lora", rank=3, alpha=1.5, towers=("vision_tower",)), nnx.Rngs(0))
    attention = model.vision_tower.layers[0].self_attn
    adapter = attention.qkv_input_adapter
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 3)), rng.standard_normal((3, 16))
    adapter.A.set_value(jnp.asarray(a, jnp.float32))
    adapter.B.set_value(jnp.asarray(b, jnp.float32))
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    x_prime = x + 0.5 * (x @ a) @ b  # scaling alpha / r = 0.5
    w, bias = np.asarray(attention.v_proj.kernel[...], np.float64), np.asarray(attention.v_proj.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(attention.v_proj(adapter(jnp.asarray(x)))), x_prime @ w + bias, rtol=1e-4,
                               atol=1e-5)
    assert [p for p, _, _ in adapter_sites(model)] == ["vision_tower.layers.0.self_attn", "vision_tower.layers.1.self_attn"]


def test_lora_dropout_in_training_only():
    model = small_model()
    attach(model, AdapterConfig(kind="lora", rank=2, alpha=2, dropout=0.5, targets=("q_proj",)), nnx.Rngs(0, dropout=1))
    lora = model.language_model.layers[0].self_attn.q_proj.adapter
    lora.B.set_value(jnp.ones(lora.B.shape))
    x = jnp.ones((4, 32))
    clean = np.asarray(x @ lora.A[...] @ lora.B[...])
    assert not np.allclose(np.asarray(lora(x)), clean)  # training mode: half the inputs dropped, the rest x2
    model.eval()
    np.testing.assert_allclose(np.asarray(lora(x)), clean, rtol=1e-6)
