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


def spread_devices(count: int) -> list[jax.Device]:
    """`count` devices, the same number from every process (each one's first), in process order.

    A mesh over them has a part on every process of a multi-host job, and each process's part is
    contiguous along the mesh's first axis (so its batch rows are too); one process gets its first `count`.
    """
    processes = jax.process_count()
    if count % processes:
        raise ValueError(f"{count} devices cannot be spread evenly over {processes} processes: give a multiple "
                         f"of {processes} (all devices: {jax.device_count()})")
    per_process = count // processes
    spread = []
    for index in range(processes):
        local = sorted((d for d in jax.devices() if d.process_index == index), key=lambda d: d.id)
        if per_process > len(local):
            raise ValueError(f"{count} devices need {per_process} on each of {processes} processes; process {index} "
                             f"has {len(local)} (all devices: {jax.device_count()})")
        spread += local[:per_process]
    return spread


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over the first data*model of `devices`; by default `spread_devices`."""
    devices = list(devices) if devices is not None else spread_devices(data * model)
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


def put(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` placed with `sharding`. A sharding with devices of other processes too (a multi-host mesh) is
    filled by every process from its own copy of `x`, which must be the same in all of them: each process
    writes the shards on its devices (devices cannot copy to another host's)."""
    if getattr(x, "sharding", None) == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Move a model's variables onto `mesh` by their logical axes (in place; returns the model)."""
    state = nnx.state(model)
    placed = jax.tree.map(lambda var, sharding: var.replace(put(var.get_value(), sharding)),
                          state, state_shardings(state, mesh, rules), is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, placed)
    return model
