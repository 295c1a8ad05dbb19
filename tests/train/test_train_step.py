"""The jitted train step carries the adapter dropout streams from step to step: each step draws new masks."""

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.step import TRAINED, Learner, train_step
from valora_jax.adapters import AdapterConfig, AdapterParam, attach
from valora_jax.config import LlavaConfig, TextConfig, VisionConfig
from valora_jax.models.llava import LlavaForConditionalGeneration

IMAGE_TOKEN = 63


def test_each_step_draws_new_dropout_masks():
    """SNELLA (default dropout and drop-path 0.1) on a tiny LLaVA, learning rate 0 and no re-sharing: the
    weights stay put, so three steps on one batch give three losses only if the masks change."""
    cfg = LlavaConfig(
        vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8),
        text=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-1, pad_token_id=0)
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    attach(model, AdapterConfig(kind="snella", rank=4, targets=("q_proj",)), nnx.Rngs(1))
    learner = Learner(model, None)
    optimizer = nnx.Optimizer(learner, optax.sgd(0.0), wrt=AdapterParam)
    graphdef, trained, frozen = nnx.split((learner, optimizer), TRAINED, ...)
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.full((4, 4), IMAGE_TOKEN), rng.integers(1, IMAGE_TOKEN, (4, 6))], axis=1)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32),
             "pixel_values": jnp.asarray(rng.standard_normal((4, 3, 16, 16)), jnp.float32),
             "attention_mask": jnp.ones((4, 10), jnp.int32),
             "position_ids": jnp.broadcast_to(jnp.arange(10), (4, 10)),
             "target_mask": jnp.ones((4, 10), jnp.int32)}
    losses = []
    for _ in range(3):
        trained, loss = train_step(graphdef, trained, frozen, batch, 3, False)
        losses.append(float(loss))
    assert len(set(losses)) == 3, losses
