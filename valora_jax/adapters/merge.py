"""Fold attached adapters into the base weights (`merge`) and take them out again (`unmerge`).

Each adapter kind knows its own algebra (`merge_into` / `unmerge_from` on its host); these functions
walk the model and keep the `merged` flag, which makes the adapter's forward contribution vanish while
it is folded in. Both are idempotent per adapter: merging twice does not add the delta twice.
"""

from __future__ import annotations

from flax import nnx

from valora_jax.adapters.attach import adapter_sites


def merge(model: nnx.Module) -> None:
    """W <- W + dW for every attached adapter (Serial LoRA: W_{q,k,v} <- (I + s A_s B_s) W_{q,k,v})."""
    for _, host, adapter in adapter_sites(model):
        if not adapter.merged:
            adapter.merge_into(host)
            adapter.merged = True


def unmerge(model: nnx.Module) -> None:
    """Restore the base weights that `merge` changed."""
    for _, host, adapter in adapter_sites(model):
        if adapter.merged:
            adapter.unmerge_from(host)
            adapter.merged = False
