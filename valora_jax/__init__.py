"""valora-jax: LoRA-family adapters for large multimodal models, trained and served in JAX."""

import os

# transformers serves configs, tokenizers and image processors here; its "PyTorch was not found"
# advisory on import does not apply. A user's own TRANSFORMERS_VERBOSITY still wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from valora_jax.loading import load_pretrained  # noqa: E402

__all__ = ["load_pretrained"]
