"""LLaVA-1.5 (`LlavaForConditionalGeneration` as transformers defines it) in Flax NNX.

pixel_values -> CLIP vision tower -> hidden states of `vision_feature_layer` (CLS dropped for the
"default" strategy) -> 2-layer GELU projector -> written, in order, over the `<image>` token positions
of the text embeddings -> Llama decoder -> logits. Module and attribute names follow transformers so
checkpoint keys and PEFT target names map one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valora_jax.config import LlavaConfig
from valora_jax.kv_cache import KVCache
from valora_jax.layers import Linear, activation, place_image_features
from valora_jax.models.clip import VisionTower
from valora_jax.models.llama import LlamaModel


class MultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, dtype, rngs: nnx.Rngs):
        d_vision = cfg.vision.hidden_size * len(cfg.feature_layers)
        d_text = cfg.text.hidden_size
        bias = cfg.multimodal_projector_bias
        self.linear_1 = Linear(d_vision, d_text, axes=(None, "mlp"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(d_text, d_text, axes=("mlp", "embed"), use_bias=bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.projector_hidden_act)

    def __call__(self, x, adapters=None):
        return self.linear_2(self.act(self.linear_1(x, adapters)), adapters)


class LlavaForConditionalGeneration(nnx.Module):
    # Towers whose projections take the adapter pool's per-row selection (images use their row's adapter).
    POOL_TOWERS = ("vision_tower", "multi_modal_projector", "language_model")

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.vision_tower = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = LlamaModel(cfg.text, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
        )

    # -- vision ------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array, adapters=None) -> jax.Array:
        """(images, image_seq_length, text hidden): projected features of each image (`adapters`: per image)."""
        cfg = self.config
        num_states = cfg.vision.num_hidden_layers + 1
        indices = [k % num_states for k in cfg.feature_layers]
        # layers past the last used are skipped
        states = self.vision_tower(pixel_values, num_layers=max(indices), adapters=adapters)
        selected = [states[k][:, 1:] if cfg.vision_feature_select_strategy == "default" else states[k] for k in indices]
        return self.multi_modal_projector(jnp.concatenate(selected, axis=-1), adapters)

    def image_rows(self, input_ids: jax.Array, num_images: int) -> jax.Array:
        """(images,) the row each image belongs to: images fill the `<image>` positions in row-major order."""
        per_row = jnp.sum(input_ids == self.config.image_token_id, axis=1) // self.config.image_seq_length
        return jnp.repeat(jnp.arange(input_ids.shape[0]), per_row, total_repeat_length=num_images)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None, adapters=None) -> jax.Array:
        """Token embeddings with image features written over the `<image>` positions, row-major in order."""
        cfg = self.config
        is_image = input_ids == cfg.image_token_id
        embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))
        if pixel_values is None:
            return embeds
        if adapters is not None:
            adapters = adapters.for_rows(self.image_rows(input_ids, pixel_values.shape[0]))
        features = self.image_features(pixel_values, adapters)
        return place_image_features(embeds, is_image, features.reshape(-1, features.shape[-1]))

    # -- language model ----------------------------------------------------------------------------------
    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.language_model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None,
                      cache: KVCache | None = None, adapters=None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed decoder hidden states (b, s, d) (and the updated cache when one is given)."""
        input_ids, pixel_values, attention_mask = self._as_arrays(input_ids, pixel_values, attention_mask)
        return self.language_model(self.embed(input_ids, pixel_values, adapters), attention_mask, position_ids,
                                   cache, adapters)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, adapters=None) -> jax.Array:
        """Logits (batch, seq, vocab) in float32; accepts the numpy arrays an HF processor returns.

        `adapters`: the adapter pool's per-row selection (`AdapterPool.select`), or None for the model as is.
        """
        hidden, _ = self.hidden_states(input_ids, pixel_values, attention_mask, position_ids, adapters=adapters)
        return self.logits(hidden)

    def _as_arrays(self, input_ids, pixel_values, attention_mask):
        cfg = self.config
        if isinstance(input_ids, np.ndarray) and pixel_values is not None:
            n_tokens = int((input_ids == cfg.image_token_id).sum())
            n_expected = int(np.shape(pixel_values)[0]) * cfg.image_seq_length
            if n_tokens != n_expected:
                raise ValueError(
                    f"{n_tokens} <image> tokens in input_ids but {np.shape(pixel_values)[0]} images x "
                    f"{cfg.image_seq_length} features each; use the model's processor to expand <image>"
                )
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        pixel_values = None if pixel_values is None else jnp.asarray(pixel_values)
        return input_ids, pixel_values, jnp.asarray(attention_mask)
