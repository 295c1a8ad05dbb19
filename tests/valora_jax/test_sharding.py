"""The tiny model on an 8-device CPU mesh (2-way data x 4-way tensor parallel) matches one device."""

import jax
import numpy as np
from flax import nnx

from valora_jax.config import preset
from valora_jax.models.llava import LlavaForConditionalGeneration
from valora_jax.sharding import make_mesh, shard_model


def test_tensor_parallel_logits_match_single_device():
    assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.text.vocab_size, (4, 24)).astype(np.int32)
    ids = np.concatenate([ids[:, :2], np.full((4, cfg.image_seq_length), cfg.image_token_id), ids[:, 2:]], axis=1)
    pixels = rng.normal(size=(4, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # a left-padded row

    single = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    expected = np.asarray(nnx.jit(lambda m, *a: m(*a))(single, ids, pixels, mask))

    mesh = make_mesh(data=2, model=4)
    sharded = shard_model(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), mesh)
    q_kernel = sharded.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    with jax.set_mesh(mesh):
        got = nnx.jit(lambda m, *a: m(*a))(sharded, ids, pixels, mask)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
