"""Jitted generation: bucketed prefill, then a decode loop in `lax.while_loop`, over a donated KV cache.

The model's NNX state is an argument of every jitted function (never a closed-over constant), prompt
lengths are bucketed to powers of two and the cache has a static length, so repeated calls with
prompts of the same bucket reuse one compiled program. The state is read from the model at every call,
so weights changed in between (an adapter pool's loads and merges) are the ones that run; an adapter
pool's per-row selection (`adapters=`) is an argument too, so a new mix of adapters never recompiles. Prompts are left-padded (rows may be padded
either way on input; they are re-packed), which lets every row write the cache at the same slot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from valora_jax.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n (and >= minimum): the prefill lengths that get compiled."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, length: int, pad_id: int):
    """Re-pack each row's real tokens to the right end of a (batch, length) array."""
    ids = np.full((input_ids.shape[0], length), pad_id, np.int32)
    mask = np.zeros((input_ids.shape[0], length), bool)
    for row, (tokens, keep) in enumerate(zip(input_ids, attention_mask.astype(bool))):
        real = tokens[keep]
        ids[row, length - len(real):] = real
        mask[row, length - len(real):] = True
    return ids, mask


def top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """-inf for each token once the tokens ranked above it already cover `top_p` (per row, (batch, 1))."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
    drop_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Next token per row from float32 logits (batch, vocab)."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token, log-probability) per row, each row with its own settings and PRNG key (all (batch,)).

    The serving engine's rows are different requests: temperature 0 is greedy (log-probability under
    the unscaled distribution), top_k 0 and top_p 1 disable those filters. Log-probabilities are those
    of the distribution sampled from.
    """
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    kth = jnp.take_along_axis(-jnp.sort(-scaled, axis=-1), jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None],
                              axis=-1)
    filtered = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    filtered = jnp.where((top_p < 1.0)[:, None], top_p_filter(filtered, top_p[:, None]), filtered)
    drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filtered)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(jnp.where(greedy[:, None], logits, filtered), axis=-1)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def prefill(graphdef, state, input_ids, pixel_values, attention_mask, cache: KVCache, adapters=None,
            position_ids=None):
    """Run the prompt through the model into the cache; returns last-position logits and the cache.
    `position_ids`: the model's own positions for the prompt (Qwen-VL's M-RoPE), else counted from the mask."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(input_ids, pixel_values, attention_mask, position_ids=position_ids,
                                        cache=cache, adapters=adapters)
    return model.logits(hidden[:, -1]), cache


def prompt_inputs(model, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None):
    """(pixel inputs, position_ids) that `model.hidden_states` takes for a left-padded prompt batch: the family's
    host-side preparation (`generation_inputs`: Qwen-VL's vision metadata and M-RoPE positions) when it has
    one, else the pixel values as an array, left where they are (host or device), and positions None
    (counted from the mask). A ValueError names what does not fit (image tokens against images, inputs the
    family does not take)."""
    generation_inputs = getattr(model, "generation_inputs", None)
    if generation_inputs is not None:
        return generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
    if image_grid_thw is not None or mm_token_type_ids is not None:
        raise ValueError(f"{type(model.config).__name__} takes no image_grid_thw / mm_token_type_ids")
    if pixel_values is not None and not isinstance(pixel_values, jax.Array):
        pixel_values = np.asarray(pixel_values)
    return pixel_values, None


def decode_step(graphdef, state, tokens: jax.Array, cache: KVCache, adapters=None):
    """One token per row: logits (batch, vocab) for the next position, and the cache."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(tokens[:, None], attention_mask=jnp.ones((tokens.shape[0], 1), bool),
                                        cache=cache, adapters=adapters)
    return model.logits(hidden[:, -1]), cache


def decode_loop(graphdef, state, first_logits, cache: KVCache, key, adapters=None, *, max_new_tokens: int,
                sampling: SamplingConfig, eos_token_id: int, pad_token_id: int):
    """Sample up to `max_new_tokens` per row; rows stop at EOS (later slots hold `pad_token_id`)."""
    batch = first_logits.shape[0]
    key, sub = jax.random.split(key)
    first = sample(first_logits, sub, sampling)
    out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, out, last, done, cache, key = carry
        logits, cache = decode_step(graphdef, state, last, cache, adapters)
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad_token_id, sample(logits, sub, sampling))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, out, token, done | (token == eos_token_id), cache, key

    carry = (jnp.int32(1), out, first, first == eos_token_id, cache, key)
    _, out, _, _, cache, _ = jax.lax.while_loop(cond, body, carry)
    return out, cache


class Generator:
    """Generation for one model with a static cache length; compiled programs are reused across calls."""

    def __init__(self, model: nnx.Module, *, max_len: int, cache_dtype=None, min_bucket: int = 16):
        self.model = model
        self.config = model.config
        self.max_len = max_len
        self.min_bucket = min_bucket
        self.cache_dtype = cache_dtype or model.language_model.embed_tokens.embedding.dtype
        self.prefill = jax.jit(prefill, static_argnums=0, donate_argnames="cache")
        self.decode_step = jax.jit(decode_step, static_argnums=0, donate_argnames="cache")
        self.decode_loop = jax.jit(decode_loop, static_argnums=0, donate_argnames="cache",
                                   static_argnames=("max_new_tokens", "sampling", "eos_token_id", "pad_token_id"))

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.init(self.config.text, batch, self.max_len, self.cache_dtype)

    def generate(self, input_ids, pixel_values=None, attention_mask=None, *, image_grid_thw=None,
                 mm_token_type_ids=None, max_new_tokens: int = 32, sampling: SamplingConfig = SamplingConfig(),
                 key: jax.Array | None = None, eos_token_id: int | None = None, adapters=None) -> np.ndarray:
        """New tokens (batch, max_new_tokens); after a row's EOS the rest is the pad id.

        Takes what the model's processor returns (`generate(**inputs)`); `image_grid_thw` and
        `mm_token_type_ids` are Qwen-VL's. `adapters`: the adapter pool's per-row selection
        (`AdapterPool.select`), one entry per row.
        """
        cfg = self.config
        input_ids = np.asarray(input_ids)
        attention_mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask)
        bucket = bucket_length(int(attention_mask.sum(axis=1).max()), self.min_bucket)
        if bucket + max_new_tokens > self.max_len:
            raise ValueError(f"prompt bucket {bucket} + max_new_tokens {max_new_tokens} exceeds the cache "
                             f"length {self.max_len}; build the Generator with a larger max_len")
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        ids, mask = left_pad(input_ids, attention_mask, bucket, pad_id)
        pixels, positions = prompt_inputs(self.model, ids, mask, pixel_values, image_grid_thw, mm_token_type_ids)
        graphdef, state = nnx.split(self.model)
        logits, cache = self.prefill(graphdef, state, ids, pixels, mask, self.new_cache(ids.shape[0]), adapters,
                                     positions)
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        tokens, _ = self.decode_loop(
            graphdef, state, logits, cache, key if key is not None else jax.random.key(0), adapters,
            max_new_tokens=max_new_tokens, sampling=sampling, eos_token_id=-1 if eos is None else eos,
            pad_token_id=pad_id,
        )
        return np.asarray(tokens)

    def compiled_programs(self) -> int:
        """How many programs the jitted functions hold (a test asserts calls of one bucket add none)."""
        return sum(f._cache_size() for f in (self.prefill, self.decode_step, self.decode_loop))
