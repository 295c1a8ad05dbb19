"""valora-jax: LoRA-family adapters for large multimodal models, trained and served in JAX."""

from valora_jax.loading import load_pretrained

__all__ = ["load_pretrained"]
