"""The NNX variable types that make an adapter selectable as a whole.

`AdapterParam` marks trainable adapter weights: `nnx.state(model, AdapterParam)` and
`nnx.Optimizer(model, tx, wrt=AdapterParam)` pick exactly them, so the base weights (plain
`nnx.Param`) stay frozen without any masking. `AdapterState` marks adapter values that are saved and
served with the adapter but never optimised (SNELLA's allocator EMAs and sparsity levels).
"""

from __future__ import annotations

from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """A trainable adapter weight (a subclass of `nnx.LoRAParam`, so LoRA-aware tooling selects it too)."""


class AdapterState(nnx.Variable):
    """Adapter state updated outside the gradient step (not trainable, saved with the adapter)."""
