"""Adapters for the LMM: LoRA, Serial LoRA and SNELLA as NNX parameter trees (METHODS.md sections 1-3).

Public API:
- `AdapterConfig(kind="lora" | "serial_lora" | "snella", rank, alpha, dropout, targets, towers, rank_pattern,
  alpha_pattern, snella=SnellaConfig(...))`: what to attach where.
- `attach(model, config, rngs)` / `detach(model)`: add fresh adapters in place / remove them.
- `AdapterParam` (trainable, a `nnx.LoRAParam`) and `AdapterState` (saved, not trained): filters for
  `nnx.state(model, AdapterParam)` and `nnx.Optimizer(model, tx, wrt=AdapterParam)`.
- `merge(model)` / `unmerge(model)`: fold the adapter into the base weights and back.
- `save_adapter(model, dir)` / `load_adapter(model, dir)`: PEFT layout for LoRA, our own for the others.
- `extract(model)`: adapter arrays by host path (the serving pool's view); `count_trainable(model)`.
- `update_sparsity(model, grads, step)`: SNELLA's bi-level allocator, once per training step.
- `AdapterPool(model, slots, max_rank)` and its per-row selection `AdapterBatch`: many adapters served side
  by side in one batch (`valora_jax.adapters.pool`).
"""

from valora_jax.adapters.allocator import update_sparsity
from valora_jax.adapters.attach import attach, detach
from valora_jax.adapters.config import AdapterConfig, SnellaConfig
from valora_jax.adapters.extract import count_trainable, extract
from valora_jax.adapters.merge import merge, unmerge
from valora_jax.adapters.pool import AdapterBatch, AdapterPool
from valora_jax.adapters.serialization import load_adapter, save_adapter
from valora_jax.adapters.variables import AdapterParam, AdapterState

__all__ = [
    "AdapterBatch", "AdapterConfig", "AdapterParam", "AdapterPool", "AdapterState", "SnellaConfig", "attach", "count_trainable", "detach", "extract",
    "load_adapter", "merge", "save_adapter", "unmerge", "update_sparsity",
]
