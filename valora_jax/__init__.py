"""valora-jax: LoRA-family adapters for large multimodal models, trained and served in JAX."""
