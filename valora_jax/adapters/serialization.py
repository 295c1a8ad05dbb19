"""`save_adapter` / `load_adapter`: a directory with `adapter_config.json` + `adapter_model.safetensors`.

Kind `lora` uses PEFT's layout (see `peft_format`), so adapters move between this project and HF PEFT in
both directions. Serial LoRA and SNELLA, which PEFT does not have, use this project's layout: the config
is `AdapterConfig.to_json()` with `"adapter_format": "valora_jax"` and `"adapter_format_version"`, tensors
are named `<host path>.<variable>` (e.g. `language_model.layers.0.self_attn.qkv_input_adapter.A`) in our
orientation, and SNELLA's allocator state is saved beside its factors.

Format versions: 2 sparsifies SNELLA's dW as the authors' released code does
(dW * |dW| * [|dW| > tau]); in 1 (files without the field) SNELLA adapters are trained for
dW * max(|dW| - |tau|, 0). A version-1 SNELLA adapter is refused, since its tensors compute another delta
under this sparsifier; version-1 Serial LoRA adapters load unchanged.

Loading checks everything (kind, module names, shapes, missing and extra tensors) before it attaches
anything, and errors name the offending tensor; a loaded adapter starts in eval mode (no dropout).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from valora_jax.adapters import peft_format
from valora_jax.adapters.attach import adapter_sites, attached_config, build_adapter, hook_name, install, target_hosts
from valora_jax.adapters.config import AdapterConfig, pattern_value
from valora_jax.adapters.extract import extract
from valora_jax.adapters.variables import AdapterParam, AdapterState
from valora_jax.models.registry import family_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
VALORA_FORMAT = "valora_jax"
VALORA_FORMAT_VERSION = 2


def save_adapter(model: nnx.Module, directory: str | pathlib.Path, *, base_model: str | None = None) -> None:
    """Write the attached adapter to `directory` (created if needed). `base_model` goes into PEFT's config."""
    config = attached_config(model)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.kind == "lora":
        tensors, config_json = _peft_lora_files(model, config, base_model)
        metadata = {"format": "pt"}  # what PEFT / transformers expect of a torch-loadable file
    else:
        tensors = {f"{path}.{hook_name(config.kind)}.{name}": np.asarray(value, np.float32)
                   for path, arrays in extract(model).items() for name, value in arrays.items() if name != "scaling"}
        config_json = {"adapter_format": VALORA_FORMAT, "adapter_format_version": VALORA_FORMAT_VERSION,
                       **config.to_json()}
        metadata = {"format": VALORA_FORMAT}
    save_file({k: np.array(v, order="C") for k, v in tensors.items()}, str(directory / WEIGHTS_FILE), metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")


def _peft_lora_files(model, config: AdapterConfig, base_model):
    kernels, family = peft_format.linear_kernels(model), family_of(model.config)
    hf_names, tensors = {}, {}
    for path, _, adapter in adapter_sites(model):
        hf = hf_names[path] = peft_format.hf_module_name(path, kernels, family)
        tensors[peft_format.peft_tensor_name(hf, "A")] = np.asarray(adapter.A[...], np.float32).T
        tensors[peft_format.peft_tensor_name(hf, "B")] = np.asarray(adapter.B[...], np.float32).T
    return tensors, peft_format.peft_config_json(config, hf_names, base_model)


def read_adapter(model: nnx.Module, directory: str | pathlib.Path) -> tuple[AdapterConfig, dict[str, dict[str, np.ndarray]]]:
    """(config, host path -> {variable: array}) of the adapter saved in `directory`, validated against `model`.

    Reads and checks only: nothing is attached, so the adapter pool uses it to keep adapters in host memory.
    Raises FileNotFoundError for a missing file and ValueError for anything that does not fit `model`.
    """
    directory = pathlib.Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not an adapter directory: missing {name}")
    try:
        config_json = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as err:  # truncated or not JSON / safetensors at all
        raise ValueError(f"{directory}: unreadable adapter files ({err})") from err
    if not isinstance(config_json, dict):
        raise ValueError(f"{directory / CONFIG_FILE}: expected a JSON object")
    if config_json.get("peft_type") == "LORA":
        return _read_peft_lora(model, config_json, tensors)
    if config_json.get("adapter_format") == VALORA_FORMAT:
        _check_version(directory / CONFIG_FILE, config_json)
        config = AdapterConfig.from_json({k: v for k, v in config_json.items()
                                          if k not in ("adapter_format", "adapter_format_version")})
        return config, _read_valora(model, config, tensors)
    raise ValueError(f"{directory / CONFIG_FILE}: neither a PEFT LoRA (peft_type 'LORA') nor a valora_jax adapter "
                     f"(peft_type={config_json.get('peft_type')!r})")


def load_adapter(model: nnx.Module, directory: str | pathlib.Path) -> AdapterConfig:
    """Attach the adapter saved in `directory` to `model` (which must have none); returns its config."""
    if any(True for _ in adapter_sites(model)):
        raise ValueError("the model already has an adapter attached; call detach(model) first")
    config, values = read_adapter(model, directory)
    adapters = {}
    for path, host in target_hosts(model, config).items():
        adapter = build_adapter(host, path, config, jnp.float32, nnx.Rngs(0))
        for name, value in values[path].items():
            getattr(adapter, name).set_value(jnp.asarray(value))
        adapter.eval()
        adapters[path] = adapter
    install(model, config, adapters)
    return config


def _check_version(path: pathlib.Path, config_json: dict[str, Any]) -> None:
    """Refuse files of a newer format, and SNELLA adapters of version 1 (see the module docstring)."""
    version = config_json.get("adapter_format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= VALORA_FORMAT_VERSION:
        raise ValueError(f"{path}: adapter_format_version {version!r} is not one this valora_jax reads "
                         f"(1 to {VALORA_FORMAT_VERSION})")
    if version < 2 and config_json.get("kind") == "snella":
        raise ValueError(f"{path}: a SNELLA adapter of format version 1, trained with the sparsifier "
                         "dW * max(|dW| - |tau|, 0); this valora_jax sparsifies as the authors' released code "
                         "(dW * |dW| * [|dW| > tau]), so its weights would compute another update. Retrain it.")


def _read_peft_lora(model, peft_config: dict[str, Any], tensors: dict[str, np.ndarray]):
    """(AdapterConfig, host path -> {A, B} in our orientation) from PEFT files, validated against `model`."""
    peft_format.check_supported(peft_config)
    kernels, family = peft_format.linear_kernels(model), family_of(model.config)
    factors: dict[str, dict[str, np.ndarray]] = {}
    hf_of: dict[str, str] = {}
    for key in sorted(tensors):
        match = peft_format.PEFT_TENSOR.match(key)
        if match is None:
            raise ValueError(f"tensor {key!r} is not a PEFT LoRA factor (base_model.model.<module>.lora_A/B.weight)")
        path = peft_format.module_path_from_hf(match["module"], kernels, family)
        if path is None:
            raise ValueError(f"tensor {key!r} adapts module {match['module']!r}, which this model does not have")
        hf_of[path] = match["module"]
        factors.setdefault(path, {})[match["factor"]] = tensors[key]
    r, lora_alpha = int(peft_config["r"]), float(peft_config["lora_alpha"])
    rank_pattern, alpha_pattern = dict(peft_config.get("rank_pattern") or {}), dict(peft_config.get("alpha_pattern") or {})
    ranks, alphas = {}, {}
    for path, pair in factors.items():
        hf = hf_of[path]
        for missing in {"A", "B"} - set(pair):
            raise ValueError(f"tensor {peft_format.peft_tensor_name(hf, missing)!r} is missing (its pair is present)")
        rank = int(pattern_value(tuple(rank_pattern.items()), hf, r))
        d_in, d_out = kernels[path + ".kernel"].in_features, kernels[path + ".kernel"].out_features
        for factor, want in (("A", (rank, d_in)), ("B", (d_out, rank))):
            if pair[factor].shape != want:
                raise ValueError(f"tensor {peft_format.peft_tensor_name(hf, factor)!r} has shape {pair[factor].shape}, "
                                 f"expected {want} (rank {rank}, module {path} is {d_in} -> {d_out})")
        ranks[path], alphas[path] = rank, float(pattern_value(tuple(alpha_pattern.items()), hf, lora_alpha))
    if not factors:
        raise ValueError("the PEFT adapter file holds no LoRA tensors")
    config = AdapterConfig(
        kind="lora", rank=r, alpha=lora_alpha, dropout=float(peft_config.get("lora_dropout") or 0.0),
        targets=tuple(sorted(factors)), towers=tuple(sorted({p.split(".")[0] for p in factors})),
        rank_pattern={_exact(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={_exact(p): a for p, a in alphas.items() if not math.isclose(a, lora_alpha)},
        use_rslora=bool(peft_config.get("use_rslora", False)),
    )
    values = {path: {"A": pair["A"].T, "B": pair["B"].T} for path, pair in factors.items()}
    return config, values


def _exact(path: str) -> str:
    """A pattern that selects exactly `path` under PEFT's matching rule."""
    return re.escape(path)


def _read_valora(model, config: AdapterConfig, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Host path -> {variable: array} from a valora_jax file, validated against what `config` builds on `model`."""
    hook = hook_name(config.kind)
    expected = {}
    for path, host in target_hosts(model, config).items():
        shapes = nnx.eval_shape(lambda h=host, p=path: build_adapter(h, p, config, jnp.float32, nnx.Rngs(0)))
        for name, value in nnx.to_pure_dict(nnx.state(shapes, nnx.Any(AdapterParam, AdapterState))).items():
            expected[f"{path}.{hook}.{name}"] = (path, name, tuple(value.shape))
    for key in sorted(tensors):
        if key not in expected:
            raise ValueError(f"tensor {key!r} has no place in this model for a {config.kind} adapter with targets "
                             f"{config.targets!r}")
        if tuple(tensors[key].shape) != expected[key][2]:
            raise ValueError(f"tensor {key!r} has shape {tensors[key].shape}, the model expects {expected[key][2]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from the adapter file" +
                         (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    values: dict[str, dict[str, np.ndarray]] = {}
    for key, (path, name, _) in expected.items():
        values.setdefault(path, {})[name] = tensors[key]
    return values
