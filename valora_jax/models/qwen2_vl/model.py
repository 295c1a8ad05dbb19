"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration` as
transformers 5 defines them) in Flax NNX.

flattened patches + `image_grid_thw` -> vision encoder (`visual`) -> merged tokens written, in order, over
the `<|image_pad|>` positions of the text embeddings -> the Qwen2 decoder (the Llama decoder with q/k/v
biases) rotated by M-RoPE -> logits. M-RoPE gives text tokens one position on all three axes and image
tokens their (temporal, row, column); its positions are computed on the host (`inputs.rope_positions`)
from `input_ids`, the attention mask and `image_grid_thw`, and decoding continues from one past the
prompt's largest position (the cache's `next_position`, set by every prefill). Module and attribute
names follow transformers (without its `model.` level, as LLaVA here), so checkpoint keys and PEFT
target names map one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valora_jax.config import TextConfig
from valora_jax.kv_cache import KVCache
from valora_jax.layers import Linear, place_image_features
from valora_jax.models.llama import LlamaModel, rope_cos_sin, rope_inv_freq
from valora_jax.models.qwen2_vl.config import QwenVLConfig
from valora_jax.models.qwen2_vl.inputs import (
    VisionInputs,
    image_rows,
    image_token_counts,
    rope_positions,
    vision_inputs,
)
from valora_jax.models.qwen2_vl.vision import VisionTransformer


class Qwen2VLTextModel(LlamaModel):
    """The Qwen2 decoder: Llama layers (q/k/v biases from the config) with multimodal rotary positions."""

    def __init__(self, cfg: TextConfig, mrope_section: tuple[int, int, int], *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        # Which of the (temporal, height, width) position axes rotates each rotary pair.
        self.pair_axis = nnx.static(tuple(int(a) for a in np.repeat(np.arange(3), mrope_section)))

    def rotary(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """cos/sin (b, s, head_dim) of M-RoPE positions (3, b, s) (or (b, s): text only, all axes equal): each
        rotary pair takes its angle from its axis (`mrope_section`), computed in float32 as transformers does."""
        positions = jnp.broadcast_to(positions, (3, *positions.shape[-2:]))
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg.rope, self.cfg.head_dim), dtype)  # (3, b, s, hd)
        axis = np.tile(self.pair_axis, 2)  # the rotate-half layout repeats the pairs
        select = lambda t: jnp.where(axis == 0, t[0], jnp.where(axis == 1, t[1], t[2]))  # noqa: E731
        return select(cos), select(sin)


class Qwen2VLForConditionalGeneration(nnx.Module):
    """Both versions (the vision config's `version` picks the encoder's blocks)."""

    # Towers whose projections take the adapter pool's per-row selection (`AdapterPool` serves only these).
    POOL_TOWERS = ("visual", "language_model")

    def __init__(self, cfg: QwenVLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision, dtype=dtype, rngs=rngs)
        self.language_model = Qwen2VLTextModel(cfg.text, cfg.mrope_section, dtype=dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, axes=("embed", "vocab"), dtype=dtype, rngs=rngs
        )

    # -- host-side inputs -------------------------------------------------------------------------------
    def generation_inputs(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                          mm_token_type_ids=None, *, exact: bool = False) -> tuple[VisionInputs | None, np.ndarray]:
        """(vision inputs, M-RoPE positions) for a batch as the HF image processor and tokenizer give it.

        Each image is its own vision attention group, padded to shared buckets; `exact` (images of one size,
        the layout of training batches) pads nothing, and its groups shard over devices with their rows."""
        cfg = self.config
        input_ids = np.asarray(input_ids)
        is_image = input_ids == cfg.image_token_id
        if (input_ids == cfg.video_token_id).any():
            raise ValueError("input_ids hold <|video_pad|> tokens: videos are not supported")
        if mm_token_type_ids is not None and not np.array_equal(np.asarray(mm_token_type_ids) == 1, is_image):
            raise ValueError("mm_token_type_ids does not mark exactly the image tokens of input_ids")
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw go together: pass both or neither")
        n_tokens = int((is_image & np.asarray(attention_mask).astype(bool)).sum())
        n_features = 0 if image_grid_thw is None else int(image_token_counts(cfg, image_grid_thw).sum())
        if n_tokens != n_features:
            raise ValueError(f"{n_tokens} <|image_pad|> tokens in input_ids but image_grid_thw gives {n_features} "
                             "image tokens; expand each image's <|image_pad|> to its token count")
        vision = None if pixel_values is None else vision_inputs(
            cfg, pixel_values, image_grid_thw, image_rows=image_rows(cfg, input_ids, attention_mask),
            exact=exact)
        return vision, rope_positions(cfg, input_ids, attention_mask, image_grid_thw)

    # -- vision ------------------------------------------------------------------------------------------
    def embed(self, input_ids: jax.Array, vision: VisionInputs | None = None, adapters=None) -> jax.Array:
        """Token embeddings with the merged image tokens written over the `<|image_pad|>` positions, in order."""
        is_image = input_ids == self.config.image_token_id
        embeds = self.language_model.embed_tokens(jnp.where(is_image, 0, input_ids))
        if vision is None:
            return embeds
        return place_image_features(embeds, is_image, self.visual(vision, adapters))

    # -- language model ----------------------------------------------------------------------------------
    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.language_model.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def hidden_states(self, input_ids, pixel_values: VisionInputs | None = None, attention_mask=None,
                      position_ids=None, cache: KVCache | None = None, adapters=None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed decoder hidden states (b, s, d) (and the updated cache when one is given).

        The jit-side entry: `pixel_values` are `VisionInputs` and `position_ids` M-RoPE positions (3, b, s),
        both from `generation_inputs`; a decode step passes neither. `adapters`, the adapter pool's per-row
        selection, reaches the decoder and the vision tower (each patch through its image's row).
        """
        if pixel_values is not None and (position_ids is None or jnp.ndim(position_ids) != 3):
            raise ValueError("a Qwen-VL prompt with images needs its M-RoPE position_ids (3, batch, seq): "
                             "take them from generation_inputs")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        attention_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask)
        return self.language_model(self.embed(input_ids, pixel_values, adapters), attention_mask, position_ids, cache,
                                   adapters)

    def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, position_ids=None,
                 mm_token_type_ids=None, adapters=None) -> jax.Array:
        """Logits (batch, seq, vocab) in float32 for what the HF tokenizer and image processor return
        (`pixel_values` flattened patches (patches, patch_dim), `image_grid_thw` (images, 3)); positions
        are M-RoPE's unless `position_ids` is given."""
        input_ids = np.asarray(input_ids)
        attention_mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        vision, positions = self.generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw,
                                                   mm_token_type_ids)
        hidden, _ = self.hidden_states(input_ids, vision, attention_mask,
                                       positions if position_ids is None else position_ids, adapters=adapters)
        return self.logits(hidden)
