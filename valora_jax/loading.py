"""Load an HF model directory (config.json, *.safetensors, processor files) into the NNX model of its family.

The family (`valora_jax.models.registry`) comes from config.json's `architectures`; its checkpoint-name
rules accept the tensor names of every layout in circulation (the published one and transformers 5's).
The model is built abstractly (`nnx.eval_shape`); each tensor is read from disk, converted, and put
straight onto its sharding, one at a time, so host memory never holds a second copy of the model.
"""

from __future__ import annotations

import json
import logging
import pathlib
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open

from valora_jax.models.llava_family import NAMES as LLAVA_NAMES
from valora_jax.models.registry import CheckpointNames, Family, family_for_hf, family_of
from valora_jax.sharding import state_shardings

log = logging.getLogger(__name__)

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json")


def canonical_name(key: str, names: CheckpointNames = LLAVA_NAMES) -> str:
    """A checkpoint tensor name in the canonical layout of `names`' family (LLaVA by default)."""
    return names.canonical_name(key)


def model_param_path(canonical: str, params: dict[str, nnx.Variable],
                     names: CheckpointNames = LLAVA_NAMES) -> tuple[str | None, bool]:
    """(our parameter path, transpose?) for a canonical HF name; path None when it has no counterpart."""
    return names.param_path(canonical, params)


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


def load_processor(model_dir: str | pathlib.Path, family: Family | None = None):
    """The family's processor (tokenizer + image processor) from local files, or None (with a warning) if absent."""
    model_dir = pathlib.Path(model_dir)
    if not any((model_dir / f).is_file() for f in PROCESSOR_FILES):
        warnings.warn(f"{model_dir} has no processor files ({', '.join(PROCESSOR_FILES)}); processor is None",
                      stacklevel=3)
        return None
    family = family or load_config(model_dir)[0]
    return family.load_processor(model_dir)


def load_config(model_dir: str | pathlib.Path) -> tuple[Family, object]:
    """(family, config) of a model directory. transformers reads `config.json` (filling omitted fields with
    its defaults and normalising older spellings: `rope_scaling`, `image_token_index`), the family converts it."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: missing config.json")
    from transformers import AutoConfig

    raw = json.loads(path.read_text())
    family = family_for_hf(raw)
    try:
        hf = AutoConfig.from_pretrained(model_dir, local_files_only=True).to_dict()
    except (ValueError, KeyError) as err:
        raise ValueError(f"unsupported architecture in {path}: model_type={raw.get('model_type')!r} ({err})") from err
    return family, family.config_from_hf(hf)


def abstract_model(cfg, dtype) -> nnx.Module:
    """The model with shapes and metadata only (no memory): the target the loader fills."""
    model_class = family_of(cfg).model_class
    return nnx.eval_shape(lambda: model_class(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def load_weights(model_dir: str | pathlib.Path, cfg, *, dtype=jnp.float32, mesh: Mesh | None = None) -> nnx.Module:
    """Build the model of `cfg` (its family's class) with the weights of `model_dir`'s safetensors files."""
    model_dir = pathlib.Path(model_dir)
    names = family_of(cfg).names
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
                canonical = names.canonical_name(key)
                path, transpose = names.param_path(canonical, flat)
                if path is None:
                    tied_head = cfg.tie_word_embeddings and canonical == "lm_head.weight"
                    if not tied_head and not names.is_ignored(canonical):
                        unexpected.append(key)
                    continue
                array = names.convert(path, reader.get_tensor(key), transpose)
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
    """`(model, processor)` from a local HF model directory; processor is None if the directory has none.

    The family comes from config.json's `architectures` (`valora_jax.models.registry.supported_architectures`).

    `dtype`: parameter dtype (bfloat16 on accelerators, float32 for tests). `mesh`: place parameters by
    their logical axes on this mesh (default: the first device).
    """
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    family, cfg = load_config(model_dir)
    return load_weights(model_dir, cfg, dtype=dtype, mesh=mesh), load_processor(model_dir, family)
