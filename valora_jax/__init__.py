"""valora-jax: LoRA-family adapters for large multimodal models, trained and served in JAX.

`load_pretrained` is imported on first use, so modules without JAX (the tiny processor, which the
PyTorch reference venv of `make golden` imports) load without it.
"""

import os

# transformers serves configs, tokenizers and image processors here; its "PyTorch was not found"
# advisory on import does not apply. A user's own TRANSFORMERS_VERBOSITY still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

__all__ = ["load_pretrained"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from valora_jax.loading import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'valora_jax' has no attribute {name!r}")
