"""valora-jax: LoRA-family adapters for large multimodal models, trained and served in JAX."""

import os

# transformers serves configs, tokenizers and image processors here; its "PyTorch was not found"
# advisory on import does not apply. A user's own TRANSFORMERS_VERBOSITY still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__all__ = ["load_pretrained"]


def __getattr__(name: str):
    # Imported on first use, so the JAX-free modules (the tiny processor that `make golden`'s reference
    # venv imports) load without jax.
    if name == "load_pretrained":
        from valora_jax.loading import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'valora_jax' has no attribute {name!r}")
