"""The KV cache: preallocated to a static length, held outside the model, passed in and returned (donated).

Each row writes its next key/value at its own slot (`length[row]`): a batch generated together is
left-padded to one bucket length, so its rows share a length, while the serving engine's decode slots
each hold a request of its own. `valid` marks which slots of each row hold real tokens (not padding),
and `next_position` keeps each row's next RoPE position: one past the largest position of its real tokens
so far (their count; with Qwen-VL's M-RoPE, one past the prompt's largest position plus the tokens
decoded since).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from valora_jax.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # (layers, batch, max_len, kv_heads, head_dim)
    v: jax.Array  # (layers, batch, max_len, kv_heads, head_dim)
    valid: jax.Array  # (batch, max_len) bool
    next_position: jax.Array  # (batch,) int32: RoPE position of each row's next token
    length: jax.Array  # (batch,) int32: slots written so far in each row

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch, max_len), bool),
            next_position=jnp.zeros((batch,), jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
