"""Load an HF LLaVA model directory (config.json, *.safetensors, processor files) into the NNX model.

Tensor names of both layouts in circulation are accepted: the one transformers 5 writes
(`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`) and the one of the published llava-hf
checkpoints (`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`).
The model is built abstractly (`nnx.eval_shape`); each tensor is read from disk, converted, and put
straight onto its sharding, one at a time, so host memory never holds a second copy of the model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open

from valora_jax.config import LlavaConfig, load_hf_config
from valora_jax.models.llava import LlavaForConditionalGeneration
from valora_jax.sharding import state_shardings

log = logging.getLogger(__name__)

# Checkpoint name prefixes -> the canonical prefixes used below (first match wins).
_PREFIX_RULES = (
    (r"^model\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.", "language_model."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)
# Canonical names whose module path differs from ours.
_RENAMES = (
    (r"^vision_tower\.encoder\.layers\.", "vision_tower.layers."),
    (r"^vision_tower\.embeddings\.(patch_embedding|position_embedding)\.weight$", r"vision_tower.\1"),
    (r"^vision_tower\.embeddings\.class_embedding$", "vision_tower.class_embedding"),
    (r"^language_model\.embed_tokens\.weight$", "language_model.embed_tokens.embedding"),
)
# Tensors a checkpoint may hold that this model has no use for.
_IGNORED = (r"^vision_tower\.post_layernorm\.", r"\.position_ids$", r"\.rotary_emb\.inv_freq$")

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def canonical_name(key: str) -> str:
    for pattern, repl in _PREFIX_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    return key


def model_param_path(canonical: str, params: dict[str, nnx.Variable]) -> tuple[str | None, bool]:
    """(our parameter path, transpose?) for a canonical HF name; path None when it has no counterpart."""
    name = canonical
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    if name.endswith(".weight") and name[: -len(".weight")] + ".kernel" in params:
        return name[: -len(".weight")] + ".kernel", True  # torch Linear (out, in) -> our kernel (in, out)
    return (name, False) if name in params else (None, False)


def _convert(name: str, array: np.ndarray, transpose: bool) -> np.ndarray:
    if name == "vision_tower.patch_embedding":  # Conv2d (d, c, p, p) -> (c*p*p, d)
        return array.reshape(array.shape[0], -1).T
    return array.T if transpose else array


def _checkpoint_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} is not a model directory: no *.safetensors weights found")
    return files


def load_processor(model_dir: str | pathlib.Path):
    """The HF processor (tokenizer + image processor) from local files, or None (with a warning) if absent."""
    model_dir = pathlib.Path(model_dir)
    if not any((model_dir / f).is_file() for f in PROCESSOR_FILES):
        warnings.warn(f"{model_dir} has no processor files ({', '.join(PROCESSOR_FILES)}); processor is None",
                      stacklevel=3)
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def abstract_model(cfg: LlavaConfig, dtype) -> LlavaForConditionalGeneration:
    """The model with shapes and metadata only (no memory): the target the loader fills."""
    return nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_weights(model_dir: str | pathlib.Path, cfg: LlavaConfig, *, dtype=jnp.float32,
                 mesh: Mesh | None = None) -> LlavaForConditionalGeneration:
    """Build the model of `cfg` with the weights of `model_dir`'s safetensors files."""
    model_dir = pathlib.Path(model_dir)
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    if mesh is None:
        shardings = {k: SingleDeviceSharding(jax.local_devices()[0]) for k in flat}
    else:
        shardings = {".".join(map(str, p)): s for p, s in nnx.to_flat_state(state_shardings(state, mesh))}
    loaded, unexpected = {}, []
    for file in _checkpoint_files(model_dir):
        with safe_open(file, framework="np") as reader:
            for key in reader.keys():
                canonical = canonical_name(key)
                path, transpose = model_param_path(canonical, flat)
                if path is None:
                    tied_head = cfg.tie_word_embeddings and canonical == "lm_head.weight"
                    if not tied_head and not any(re.search(p, canonical) for p in _IGNORED):
                        unexpected.append(key)
                    continue
                array = _convert(path, reader.get_tensor(key), transpose)
                want = flat[path]
                if array.shape != want.shape:
                    raise ValueError(f"{file.name}: tensor {key!r} has shape {array.shape} (after layout "
                                     f"conversion) but the model's {path} expects {want.shape}")
                loaded[path] = jax.device_put(array.astype(want.dtype), shardings[path])
    if unexpected:
        raise ValueError(f"{model_dir}: unexpected tensors for this architecture: {unexpected[:10]}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = sorted(set(flat) - set(loaded))
    if missing:
        raise ValueError(f"{model_dir}: tensors missing from the checkpoint for parameters: {missing[:10]}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for path, var in flat.items():
        var.set_value(loaded[path])
    return nnx.merge(graphdef, state)


def load_pretrained(model_dir: str | pathlib.Path, *, dtype=jnp.float32, mesh: Mesh | None = None):
    """`(model, processor)` from a local HF LLaVA directory; processor is None if the directory has none.

    `dtype`: parameter dtype (bfloat16 on accelerators, float32 for tests). `mesh`: place parameters by
    their logical axes on this mesh (default: the first device).
    """
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    cfg = load_hf_config(model_dir)
    return load_weights(model_dir, cfg, dtype=dtype, mesh=mesh), load_processor(model_dir)
