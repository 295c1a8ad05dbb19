"""Put adapters on a model, find them again, take them off.

An adapter lives in a hook slot of its host: `Linear.adapter` (LoRA, SNELLA) or an attention block's
`qkv_input_adapter` (Serial LoRA). The model keeps the `AdapterConfig` it was adapted with as static
metadata (`model.adapter_config`), which is what `save_adapter` and the SNELLA allocator read.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
from flax import nnx

from valora_jax.adapters.config import AdapterConfig
from valora_jax.adapters.lora import LoRA
from valora_jax.adapters.serial_lora import SerialLoRA
from valora_jax.adapters.snella import Snella
from valora_jax.layers import Linear

SERIAL_HOOK = "qkv_input_adapter"
LINEAR_HOOK = "adapter"


def module_path(path: tuple) -> str:
    return ".".join(map(str, path))


def hook_name(kind: str) -> str:
    return SERIAL_HOOK if kind == "serial_lora" else LINEAR_HOOK


def is_host(module: nnx.Module, kind: str) -> bool:
    """Whether `module` can carry an adapter of `kind`."""
    return hasattr(module, SERIAL_HOOK) if kind == "serial_lora" else isinstance(module, Linear)


def adapter_sites(model: nnx.Module) -> Iterator[tuple[str, nnx.Module, nnx.Module]]:
    """(host path, host, adapter) for every attached adapter, in module order."""
    for path, module in nnx.iter_modules(model):
        adapter = getattr(module, LINEAR_HOOK if isinstance(module, Linear) else SERIAL_HOOK, None)
        if adapter is not None:
            yield module_path(path), module, adapter


def target_hosts(model: nnx.Module, config: AdapterConfig) -> dict[str, nnx.Module]:
    """Host path -> host of every module `config` selects; raises if it selects none."""
    hosts = {module_path(p): m for p, m in nnx.iter_modules(model) if is_host(m, config.kind)
             and config.selects(module_path(p))}
    if not hosts:
        raise ValueError(f"adapter config selects no module of the model (kind {config.kind!r}, targets "
                         f"{config.targets!r}, towers {config.towers!r})")
    return hosts


def build_adapter(host: nnx.Module, path: str, config: AdapterConfig, dtype, rngs: nnx.Rngs) -> nnx.Module:
    rank = config.rank_for(path)
    if config.kind == "lora":
        return LoRA(host, rank=rank, scaling=config.scaling_for(path), dropout=config.dropout, dtype=dtype, rngs=rngs)
    if config.kind == "serial_lora":
        return SerialLoRA(host, rank=rank, scaling=config.scaling_for(path), dropout=config.dropout, dtype=dtype,
                          rngs=rngs)
    snella = config.snella
    return Snella(host, rank=rank, coefficients=snella.chunk_coefficients, sparsity=snella.init_ratio,
                  dropout=snella.dropout, drop_path=snella.drop_path, dtype=dtype, rngs=rngs)


def attach(model: nnx.Module, config: AdapterConfig, rngs: nnx.Rngs, *, dtype=jnp.float32) -> dict[str, nnx.Module]:
    """Add freshly initialised adapters to every module `config` selects, in place; returns them by host path.

    Adapter weights are `AdapterParam` (float32 by default, whatever the base dtype); base weights are not
    touched. Every adapter is built before any is attached, so a failure leaves the model unchanged.
    """
    if any(True for _ in adapter_sites(model)):
        raise ValueError("the model already has an adapter attached; call detach(model) first")
    adapters = {path: build_adapter(host, path, config, dtype, rngs) for path, host in target_hosts(model, config).items()}
    install(model, config, adapters)
    return adapters


def install(model: nnx.Module, config: AdapterConfig, adapters: dict[str, nnx.Module]) -> None:
    """Place prepared adapters (host path -> adapter) into their hooks and record `config` on the model."""
    hosts = {module_path(p): m for p, m in nnx.iter_modules(model)}
    for path, adapter in adapters.items():
        setattr(hosts[path], hook_name(config.kind), adapter)
    model.adapter_config = config


def detach(model: nnx.Module) -> None:
    """Remove every adapter. A merged adapter must be unmerged first, or its delta would stay in the weights."""
    sites = list(adapter_sites(model))
    if any(adapter.merged for _, _, adapter in sites):
        raise ValueError("the adapter is merged into the base weights; call unmerge(model) before detach(model)")
    for _, host, adapter in sites:
        setattr(host, SERIAL_HOOK if isinstance(adapter, SerialLoRA) else LINEAR_HOOK, None)
    model.adapter_config = None


def attached_config(model: nnx.Module) -> AdapterConfig:
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("the model has no adapter attached")
    return config
