"""Logical axes -> mesh axes: parameter placement and the one activation-constraint helper.

Parameters carry `logical_axes` metadata (e.g. ('embed', 'mlp')); a rule table maps logical names to the
axes of a `jax.sharding.Mesh` ('data' for data parallelism, 'model' for tensor parallelism). With no mesh
active everything is a no-op, so single-device code is the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Megatron-style tensor parallelism: column-parallel q/k/v/gate/up (output features on 'model'),
# row-parallel o/down (input features on 'model'); batch over 'data'.
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "mlp": "model",
    "heads": "model",
    "kv_heads": "model",
    "length": None,
    "rank": None,
}


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over the first data*model devices."""
    devices = list(devices if devices is not None else jax.devices())
    if data * model > len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def logical_to_spec(axes: Sequence[str | None], mesh: Mesh | None = None, rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes`; axes the mesh lacks (or of size 1) are replicated."""
    names = set(mesh.axis_names) if mesh is not None else None
    out = []
    for axis in axes:
        mesh_axis = rules.get(axis) if axis is not None else None
        out.append(mesh_axis if mesh_axis is not None and (names is None or mesh_axis in names) else None)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedSharding for every variable of an NNX state (abstract or concrete), from its `logical_axes`.

    A dimension the mesh axis does not divide (a vocabulary of 32001, say) is replicated instead.
    """

    def to_sharding(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        spec = logical_to_spec(axes, mesh, rules)
        spec = [a if a is None or dim % mesh.shape[a] == 0 else None for a, dim in zip(spec, var.shape)]
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, *axes: str | None, rules=DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding by logical axes under the active mesh (`jax.set_mesh`); else identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Move a model's variables onto `mesh` by their logical axes (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model
