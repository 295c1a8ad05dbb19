"""The adapter pool: many adapters served side by side, each row of a batch with its own (METHODS.md 1b, 1c).

`AdapterPool(model, slots, max_rank)` gives every adaptable site of the model a fixed stack of device
slots in the layout `pallas_kernels` takes: at each projection (`Linear`) a (slots, d_in, R) and a
(slots, R, d_out) array, a rank and a scale per slot; at each attention block (Serial LoRA's transform
before q/k/v, d_out = d) the same. The stacks are `PoolSlots` variables inside the model, so the model's
split NNX state carries them into jitted functions as arguments, and writing a slot changes data, never a
shape: loading, evicting and selecting never recompile.

Adapters live in host memory once loaded (`load`), in any number; `select(names)` moves the ones a batch
needs into device slots (evicting the least recently used adapter that is neither pinned, held, nor in
the batch) and returns an `AdapterBatch`: which slot each row reads, as data. The model passes it down
to every adapted projection, which computes base + delta with `pallas_kernels.lora_projection` from
per-token slot ids (images use their row's slot in the vision tower and projector).

Kinds:
- LoRA: A (d_in, r) and B (r, d_out) zero-padded to R, scale alpha / r (per-module rank and alpha).
- Serial LoRA: its block transform x' = x + s x A B, batched through `batched_lora` with base_out = x.
- SNELLA: dW_s is full-rank, so it occupies a slot as a dense delta, A = dW_s and B = I (or A = I, B = dW_s,
  whichever is narrower): rank min(d_in, d_out). That needs max_rank >= min(d_in, d_out) at every site it
  adapts (for a 4096-wide 7B model R = 4096, and a slot's R * (d_in + d_out) values per site come to
  about 1.6x the adapted weights: 20.5 GB per slot in bfloat16), so a SNELLA adapter that does not fit is
  refused at `load` with an error naming the site and the limit; such an adapter is served merged on a
  model of its own (`attach` / `load_adapter`, then `valora_jax.adapters.merge`).

Modes:
- Unmerged: base weights untouched; every row's delta from its slot.
- Merged: `merge(name)` folds one adapter into every adapted weight (W += s A B at projections; for Serial
  LoRA W_{q,k,v} += s A (B W_{q,k,v})) in one jitted, donated update of all sites at once.
- Mixture: while adapter m is merged, a row of adapter i computes x (s_i A_i B_i - s_m A_m B_m) and a base
  row computes -x s_m A_m B_m (a second slot id per row, `AdapterBatch.correction`, read with the negated
  scale), so no row waits for a switch; m's own rows read nothing. For a merged Serial LoRA the correction
  sits at q/k/v: merging writes (A_m, B_m W_{q,k,v}) into m's slot there, and x' W' - s x' A_m B_m W = x' W.
Classify heads (`valora_jax.adapters.heads`, saved beside an adapter by `ClassifyHeads.save`) load with
their adapter and sit in its slot too: `select(names, tasks=...)` gives a row its task's head, and
`model.classify_slots(last_hidden, batch.heads)` answers it from the same forward pass.

- `switch(name)` replaces the merged adapter in one pass (W + dW_new - dW_old); `merge` and `unmerge` are
  switches from and to none. Each subtracts exactly the float32 delta it removes, but in bfloat16 a switch
  can still move a weight by one unit of its last place where the sum rounds across a binade, so the pool
  keeps a host copy of the original weights of every site it has merged into and restores them exactly
  every `restore_every` switches away from a merged adapter (and on `restore()`): the drift is bounded by
  what `restore_every` switches can add, however many switches follow. float32 weights are restored the
  same way.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
import re
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import batched_lora, lora_projection, resolve_backend
from valora_jax.adapters.attach import SERIAL_HOOK, adapter_sites, module_path
from valora_jax.adapters.config import AdapterConfig
from valora_jax.adapters.heads import LABELS_FILE, MASKED_LOGIT, load_heads
from valora_jax.adapters.serial_lora import QKV, qkv_projections
from valora_jax.adapters.serialization import read_adapter
from valora_jax.adapters.snella import sparse_delta_weight
from valora_jax.layers import Linear

POOL_HOOK = "slots"
SERIAL_POOL_HOOK = "qkv_input_slots"
HEADS_HOOK = "classify_slots"


class PoolSlots(nnx.Variable):
    """Device slots of the adapter pool (written by `AdapterPool`, never trained)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=("slots", "correction", "heads"),
                   meta_fields=("backend", "interpret"))
@dataclasses.dataclass(frozen=True)
class AdapterBatch:
    """Which pool slot each row of a batch reads: passed explicitly to the model (`adapters=`).

    `slots` (rows,) int32: the row's adapter slot, -1 for none (the base model, or the merged adapter's
    own rows). `correction` (rows,) int32 or None: in mixture mode the merged adapter's slot, whose delta
    the row subtracts (-1 for none). `heads` (rows,) int32 or None: the row's classify head (-1 for none).
    `backend` / `interpret` are static: the `pallas_kernels` backend.
    """

    slots: jax.Array
    correction: jax.Array | None
    heads: jax.Array | None = None
    backend: str = "reference"
    interpret: bool = False

    def for_rows(self, rows: jax.Array) -> AdapterBatch:
        """The selection for items that belong to `rows` (e.g. each image's row)."""
        pick = lambda a: None if a is None else a[rows]
        return dataclasses.replace(self, slots=pick(self.slots), correction=pick(self.correction),
                                   heads=pick(self.heads))

    def token_ids(self, lead_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
        """Per-token slot ids for an activation whose leading axes start with the selection's own axes
        ((rows,), or after `for_rows` the shape of its index)."""
        def per_token(ids):
            if ids is None:
                return None
            ids = ids.reshape(ids.shape + (1,) * (len(lead_shape) - ids.ndim))
            return jnp.broadcast_to(ids, lead_shape).reshape(-1)
        return per_token(self.slots), per_token(self.correction)


class SlotStack(nnx.Module):
    """One site's slots: a (N, d_in, R), b (N, R, d_out), rank (N,) int32, scale (N,) float32."""

    def __init__(self, d_in: int, d_out: int, *, slots: int, max_rank: int, dtype, axes):
        self.a = PoolSlots(jnp.zeros((slots, d_in, max_rank), dtype), logical_axes=(None, axes[0], "rank"))
        self.b = PoolSlots(jnp.zeros((slots, max_rank, d_out), dtype), logical_axes=(None, "rank", axes[1]))
        self.rank = PoolSlots(jnp.zeros((slots,), jnp.int32))
        self.scale = PoolSlots(jnp.zeros((slots,), jnp.float32))

    def _call(self, kernel_fn, x, adapters: AdapterBatch, *args, **kwargs):
        lead = x.shape[:-1]
        slots, correction = adapters.token_ids(lead)
        flat = x.reshape(-1, x.shape[-1])
        opts = dict(backend=adapters.backend, interpret=adapters.interpret)
        a, b, rank, scale = self.a[...], self.b[...], self.rank[...], self.scale[...]
        y = kernel_fn(flat, *args, a, b, slots, rank, scale, **kwargs, **opts)
        if correction is not None:
            y = batched_lora(flat, a, b, correction, rank, -scale, base_out=y, **opts)
        return y.reshape(*lead, y.shape[-1])

    def project(self, x: jax.Array, kernel: jax.Array, adapters: AdapterBatch) -> jax.Array:
        """x @ kernel plus each row's delta (minus the merged adapter's, in mixture mode)."""
        return self._call(lora_projection, x.astype(kernel.dtype), adapters, kernel)

    def transform(self, x: jax.Array, adapters: AdapterBatch) -> jax.Array:
        """Serial LoRA's x + s x A B for each row (its slot's transform; no correction here)."""
        plain = dataclasses.replace(adapters, correction=None)
        flat = x.reshape(-1, x.shape[-1])
        return self._call(batched_lora, x, plain, base_out=flat)


class SlotHeads(nnx.Module):
    """The classify heads of the adapters in slots: kernel (N, tasks, d, labels), bias, label count."""

    def __init__(self, hidden: int, *, slots: int, tasks: int, labels: int):
        self.kernel = PoolSlots(jnp.zeros((slots, tasks, hidden, labels), jnp.float32))
        self.bias = PoolSlots(jnp.zeros((slots, tasks, labels), jnp.float32))
        self.count = PoolSlots(jnp.zeros((slots, tasks), jnp.int32))

    def __call__(self, last_hidden: jax.Array, heads: jax.Array) -> jax.Array:
        """(rows, labels) float32 logits of each row's head (`AdapterBatch.heads`); MASKED_LOGIT past its
        labels and on rows without a head."""
        kernel = self.kernel[...].reshape(-1, *self.kernel.shape[2:])
        index = jnp.clip(heads, 0, kernel.shape[0] - 1)
        scores = jnp.einsum("rd,rdl->rl", last_hidden.astype(jnp.float32), kernel[index],
                            precision=jax.lax.Precision.HIGHEST)
        scores = scores + self.bias[...].reshape(-1, kernel.shape[2])[index]
        valid = (jnp.arange(kernel.shape[2])[None, :] < self.count[...].reshape(-1)[index][:, None])
        return jnp.where(valid & (heads >= 0)[:, None], scores, MASKED_LOGIT)


@dataclasses.dataclass
class HostAdapter:
    """A loaded adapter in host memory: per-site (a (d_in, r), b (r, d_out), scale) in float32, and its
    classify heads (task -> (labels, kernel (d, labels), bias))."""

    name: str
    path: str
    config: AdapterConfig
    linear: dict[str, tuple[np.ndarray, np.ndarray, float]]
    serial: dict[str, tuple[np.ndarray, np.ndarray, float]]
    heads: dict[str, tuple[tuple[str, ...], np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    pinned: bool = False


def _dense_factors(dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A full (d_in, d_out) matrix as factors of rank min(d_in, d_out): (dW, I) or (I, dW)."""
    d_in, d_out = dw.shape
    return (dw, np.eye(d_out, dtype=np.float32)) if d_out <= d_in else (np.eye(d_in, dtype=np.float32), dw)


def _factors(config: AdapterConfig, path: str, values: dict[str, np.ndarray]):
    if config.kind == "snella":
        params = [jnp.asarray(values[k], jnp.float32) for k in
                  ("A", "B", "kernel_alpha", "kernel_gamma", "kernel_beta", "sparsity")]
        dw = np.asarray(sparse_delta_weight(*params, config.snella.chunk_coefficients), np.float32)
        return (*_dense_factors(dw), 1.0)
    return (np.asarray(values["A"], np.float32), np.asarray(values["B"], np.float32),
            float(config.scaling_for(path)))


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(stacks, slot, values):
    return jax.tree.map(lambda s, v: s.at[slot].set(v.astype(s.dtype)), stacks, values)


def _low_rank(stack, slot) -> jax.Array:
    """float32 s A B of one slot of one site's stack."""
    a, b = stack["a"][slot].astype(jnp.float32), stack["b"][slot].astype(jnp.float32)
    return stack["scale"][slot] * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=5)
def _switch(kernels, linear, serial, old, new, plan):
    """Take the kernels from slot `old` merged to slot `new` merged in one pass over each weight:
    W + s_new A_new B_new - s_old A_old B_old, summed in float32 and rounded once.

    `plan` (static): (the sites `old`'s delta is in, the sites `new`'s goes into, and for a Serial LoRA
    `new` its (serial site, q/k/v sites) pairs, whose mixture corrections (A, B W) are written into slot
    `new` from the base weights W, `old` removed)."""
    old_sites, new_sites, qkv_of = plan
    base = {name: w.astype(jnp.float32) - _low_rank(linear[name], old) if name in old_sites else w.astype(jnp.float32)
            for name, w in kernels.items()}
    for site, names in qkv_of:
        a, b = serial[site]["a"][new], serial[site]["b"][new].astype(jnp.float32)
        for name in names:
            w = base[name].astype(kernels[name].dtype).astype(jnp.float32)
            bw = jnp.dot(b, w, precision=jax.lax.Precision.HIGHEST)
            linear[name] = {
                "a": linear[name]["a"].at[new].set(a.astype(linear[name]["a"].dtype)),
                "b": linear[name]["b"].at[new].set(bw.astype(linear[name]["b"].dtype)),
                "rank": linear[name]["rank"].at[new].set(serial[site]["rank"][new]),
                "scale": linear[name]["scale"].at[new].set(serial[site]["scale"][new]),
            }
    switched = {name: (w + _low_rank(linear[name], new) if name in new_sites else w).astype(kernels[name].dtype)
                for name, w in base.items()}
    return switched, linear


@functools.partial(jax.jit, donate_argnums=0)
def _write_back(kernels, originals):
    """The original weights written into the kernels' (donated) buffers: through a jitted update, as merge
    and unmerge, so the restored arrays are placed as theirs are and the steps that read them never
    compile again."""
    return {p: jax.lax.dynamic_update_slice(w, originals[p].astype(w.dtype), (0,) * w.ndim)
            for p, w in kernels.items()}


class AdapterPool:
    """Adapters in device slots and host memory, selected per row; see the module docstring.

    Sites lie in the model's `POOL_TOWERS` (the towers that pass the selection down: all of LLaVA's and
    Qwen-VL's). `targets` limits the projection sites (PEFT's rule: a sequence of module names matches a path equal to
    a name or ending in "." + name; a string is a regex over the whole path); by default every `Linear`
    except the output head. `serial=False` leaves out the attention-block sites of Serial LoRA. Memory:
    each projection site holds slots * R * (d_in + d_out) values of the model's dtype, each serial site
    slots * R * 2d; the heads slots * head_tasks * ((d + 1) * head_labels + 1) float32 values. The first merge
    into a site copies its original weight to host memory (see `restore`). `host_capacity` (vLLM's
    `max_cpu_loras`) bounds how many adapters keep their weights in host memory: past it, the least recently
    used one that is not pinned, held or merged drops them and is read from its directory again when selected.
    """

    def __init__(self, model: nnx.Module, slots: int = 16, max_rank: int = 64, *,
                 targets: Sequence[str] | str | None = None, serial: bool = True, backend: str = "auto",
                 interpret: bool = False, restore_every: int = 32, head_tasks: int = 4, head_labels: int = 32,
                 host_capacity: int | None = None):
        if slots < 1 or max_rank < 1:
            raise ValueError(f"slots and max_rank must be >= 1, got {slots} and {max_rank}")
        if any(True for _ in adapter_sites(model)):
            raise ValueError("the model has an adapter attached; detach it before building an AdapterPool")
        self.model, self.num_slots, self.max_rank = model, slots, max_rank
        self.backend, self.interpret = resolve_backend(backend), interpret
        self.restore_every = restore_every
        towers = tuple(getattr(model, "POOL_TOWERS", ()))
        modules = {module_path(p): m for p, m in nnx.iter_modules(model)
                   if not towers or module_path(p).split(".")[0] in towers}
        self._linear: dict[str, Linear] = {
            path: m for path, m in modules.items()
            if isinstance(m, Linear) and not path.startswith("lm_head") and _selected(targets, path)}
        self._serial: dict[str, nnx.Module] = (
            {path: m for path, m in modules.items() if hasattr(m, SERIAL_HOOK)} if serial else {})
        if not self._linear and not self._serial:
            raise ValueError(f"targets {targets!r} select no projection of the model")
        for path, linear in self._linear.items():
            setattr(linear, POOL_HOOK, SlotStack(linear.in_features, linear.out_features, slots=slots,
                                                 max_rank=max_rank, dtype=linear.kernel.dtype,
                                                 axes=getattr(linear.kernel, "logical_axes", (None, None))))
        for path, block in self._serial.items():
            first = qkv_projections(block)[0]
            setattr(block, SERIAL_POOL_HOOK, SlotStack(first.in_features, first.in_features, slots=slots,
                                                       max_rank=max_rank, dtype=first.kernel.dtype,
                                                       axes=("embed", "embed")))
        self.hidden_size = model.config.text.hidden_size
        setattr(model, HEADS_HOOK, SlotHeads(self.hidden_size, slots=slots, tasks=head_tasks, labels=head_labels))
        # q/k/v Linear sites of each serial site, for the corrections of a merged Serial LoRA.
        qkv = {path: tuple(f"{path}.{n}" for n in QKV if hasattr(block, n)) for path, block in self._serial.items()}
        self._qkv_of = {path: names for path, names in qkv.items() if all(n in self._linear for n in names)}
        if host_capacity is not None and host_capacity < 1:
            raise ValueError(f"host_capacity must be >= 1, got {host_capacity}")
        self.host_capacity = host_capacity
        self._host: dict[str, HostAdapter] = {}
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()  # names with weights
        self._slot_of: dict[str, int] = {}
        self._lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._held: collections.Counter[str] = collections.Counter()
        self._merged: str | None = None
        self._originals: dict[str, np.ndarray] = {}
        self.version = 0  # bumped whenever the pool writes the model's variables (slots, kernels)
        self._switches_away = 0

    # -- host side -----------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        """Names of every loaded adapter (on device or in host memory)."""
        return tuple(self._host)

    @property
    def resident(self) -> dict[str, int]:
        """Adapter name -> device slot, for the adapters now in device slots."""
        return dict(self._slot_of)

    @property
    def merged(self) -> str | None:
        return self._merged

    def config(self, name: str) -> AdapterConfig:
        return self._adapter(name).config

    def load(self, name: str, path: str | pathlib.Path, *, pin: bool = False) -> AdapterConfig:
        """Read the adapter in `path` (a `save_adapter` or PEFT LoRA directory) into host memory as `name`.

        Everything is checked (files, shapes against the model, ranks against max_rank) before the pool
        changes; `pin=True` also places it in a device slot that is never evicted.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._host:
            raise ValueError(f"adapter {name!r} is already loaded; unload it first")
        adapter = self._read(name, path, pin)
        if pin and not self._room():
            raise RuntimeError(f"no device slot to pin adapter {name!r}: all {self.num_slots} slots hold pinned, "
                               f"merged or running adapters")
        self._host[name] = adapter
        self._host_lru[name] = None
        if pin:
            self._place(name)
        self._trim_host()
        return adapter.config

    @property
    def in_host_memory(self) -> tuple[str, ...]:
        """Names of the adapters whose weights are in host memory now (the others are read again on use)."""
        return tuple(self._host_lru)

    def _read(self, name: str, path, pin: bool = False) -> HostAdapter:
        """An adapter's files as a validated HostAdapter; errors name it."""
        try:
            config, values = read_adapter(self.model, path)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"adapter {name!r}: {err}") from err
        adapter = HostAdapter(name, str(path), config, {}, {}, pinned=pin)
        for site, arrays in values.items():
            a, b, scale = _factors(config, site, arrays)
            table, sites = ((adapter.serial, self._serial) if config.kind == "serial_lora"
                            else (adapter.linear, self._linear))
            if site not in sites:
                raise ValueError(f"adapter {name!r} adapts {site}, which is not a site of this pool "
                                 f"(pool targets leave it out)")
            if a.shape[1] > self.max_rank:
                what = "a dense SNELLA delta of rank" if config.kind == "snella" else "rank"
                raise ValueError(f"adapter {name!r} needs {what} {a.shape[1]} at {site}, above the pool's "
                                 f"max_rank {self.max_rank}")
            table[site] = (a, b, scale)
        if (pathlib.Path(path) / LABELS_FILE).is_file():
            adapter.heads = self._read_heads(name, path)
        return adapter

    def _trim_host(self) -> None:
        """Drop the host weights of least recently used adapters beyond `host_capacity`."""
        if self.host_capacity is None:
            return
        for name in list(self._host_lru):
            if len(self._host_lru) <= self.host_capacity:
                return
            adapter = self._host[name]
            if not adapter.pinned and not self._held[name] and name != self._merged:
                adapter.linear, adapter.serial = {}, {}
                del self._host_lru[name]

    def _weights(self, name: str) -> HostAdapter:
        """`name` with its weights in host memory (read from its directory again if they were dropped)."""
        adapter = self._host[name]
        if name not in self._host_lru:
            fresh = self._read(name, adapter.path, adapter.pinned)
            adapter.linear, adapter.serial, adapter.heads = fresh.linear, fresh.serial, fresh.heads
        self._host_lru[name] = None
        self._host_lru.move_to_end(name)
        return adapter

    def _read_heads(self, name: str, path) -> dict:
        heads = self._heads_module()
        _, tasks, hidden, labels = heads.kernel.shape
        try:
            saved = load_heads(path)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"adapter {name!r}: unreadable classify heads in {path} ({err})") from err
        if len(saved.tasks) > tasks:
            raise ValueError(f"adapter {name!r} has {len(saved.tasks)} classify heads; the pool holds {tasks} per "
                             f"adapter (head_tasks)")
        if saved.kernel.shape[0] != hidden:
            raise ValueError(f"adapter {name!r}: its classify heads read hidden size {saved.kernel.shape[0]}, the "
                             f"model's is {hidden}")
        out = {}
        kernel, bias = np.asarray(saved.kernel[...]), np.asarray(saved.bias[...])
        for (task, names), offset, count in zip(saved.label_sets, saved.offsets, saved.counts):
            if count > labels:
                raise ValueError(f"adapter {name!r}: task {task!r} has {count} labels; the pool's heads hold "
                                 f"{labels} (head_labels)")
            out[task] = (names, kernel[:, offset:offset + count], bias[offset:offset + count])
        return out

    def _heads_module(self) -> SlotHeads:
        return getattr(self.model, HEADS_HOOK)

    def labels(self, name: str, task: str) -> tuple[str, ...]:
        """The label names of `name`'s classify head for `task` (column order of its logits)."""
        heads = self._adapter(name).heads
        if task not in heads:
            raise KeyError(f"adapter {name!r} has no classify head for task {task!r}; it has {sorted(heads)}")
        return heads[task][0]

    def unload(self, name: str) -> None:
        """Forget `name` and free its slot; refused while it is merged or held by running requests."""
        self._adapter(name)
        if self._merged == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge() before unloading it")
        if self._held[name]:
            raise ValueError(f"adapter {name!r} is in use by {self._held[name]} running request(s)")
        self._evict(name)
        del self._host[name]
        self._host_lru.pop(name, None)

    def pin(self, name: str, pinned: bool = True) -> None:
        self._adapter(name).pinned = pinned
        if pinned:
            self._place(name)

    def hold(self, names: Iterable[str | None]) -> None:
        """Mark adapters as used by running requests: they are not evicted or unloaded until `release`."""
        for name in names:
            if name is not None:
                self._adapter(name)
                self._held[name] += 1

    def release(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name is not None and self._held[name]:
                self._held[name] -= 1

    # -- device slots --------------------------------------------------------------------------------
    def select(self, names: Sequence[str | None], tasks: Sequence[str | None] | None = None) -> AdapterBatch:
        """The per-row selection for a batch whose row i uses adapter `names[i]` (None: the base model) and,
        with `tasks`, answers classify task `tasks[i]` from that adapter's head (None: no head)."""
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        for name in distinct:
            self._adapter(name)
        if tasks is not None:
            if len(tasks) != len(names):
                raise ValueError(f"{len(tasks)} tasks for {len(names)} rows")
            for name, task in zip(names, tasks):
                if task is not None:
                    if name is None:
                        raise ValueError(f"classify task {task!r} on a base-model row: heads belong to adapters")
                    self.labels(name, task)
        merged = self._merged
        if merged is not None and any(n != merged for n in names) and not self._correctable(merged):
            raise ValueError(f"adapter {merged!r} is merged and has no mixture correction here; only its own "
                             f"rows can run until unmerge()")
        needed = [n for n in distinct if n != merged]
        for name in needed:
            self._place(name, keep=needed)
        slot = lambda n: -1 if n is None or n == merged else self._slot_of[n]
        slots = np.asarray([slot(n) for n in names], np.int32)
        correction = heads = None
        if merged is not None:
            m = self._slot_of[merged]
            correction = jnp.asarray([-1 if n == merged else m for n in names], jnp.int32)
        if tasks is not None:
            per_slot = self._heads_module().kernel.shape[1]
            head = lambda n, t: (-1 if t is None else
                                 self._slot_of[n] * per_slot + list(self._host[n].heads).index(t))
            heads = jnp.asarray([head(n, t) for n, t in zip(names, tasks)], jnp.int32)
        return AdapterBatch(jnp.asarray(slots), correction, heads, self.backend, self.interpret)

    def _adapter(self, name: str) -> HostAdapter:
        if name not in self._host:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {sorted(self._host)}")
        return self._host[name]

    def _place(self, name: str, keep: Sequence[str] = ()) -> int:
        """Put `name` in a device slot (if it is not in one); returns the slot."""
        if name in self._slot_of:
            self._lru.move_to_end(name)
            return self._slot_of[name]
        adapter = self._weights(name)
        slot = self._ensure_free_slot(name, needed=keep)
        self._write(slot, adapter)
        self._trim_host()
        self._slot_of[name] = slot
        self._lru[name] = None
        return slot

    def _evictable(self, victim: str, needed: Sequence[str] = ()) -> bool:
        return (not self._host[victim].pinned and not self._held[victim] and victim not in needed
                and victim != self._merged)

    def _room(self) -> bool:
        return len(self._slot_of) < self.num_slots or any(self._evictable(v) for v in self._lru)

    def _ensure_free_slot(self, name: str, needed: Sequence[str]) -> int:
        used = set(self._slot_of.values())
        free = [s for s in range(self.num_slots) if s not in used]
        if free:
            return free[0]
        for victim in self._lru:
            if self._evictable(victim, needed):
                slot = self._slot_of[victim]
                self._evict(victim)
                return slot
        raise RuntimeError(f"no device slot for adapter {name!r}: all {self.num_slots} slots hold pinned, merged, "
                           f"running or co-selected adapters ({sorted(self._slot_of)})")

    def _evict(self, name: str) -> None:
        if name in self._slot_of:
            del self._slot_of[name]
            self._lru.pop(name, None)

    def _stacks(self):
        pick = lambda sites, hook: {p: {k: getattr(getattr(m, hook), k)[...] for k in ("a", "b", "rank", "scale")}
                                    for p, m in sites.items()}
        return pick(self._linear, POOL_HOOK), pick(self._serial, SERIAL_POOL_HOOK)

    def _heads_state(self):
        heads = self._heads_module()
        return {k: getattr(heads, k)[...] for k in ("kernel", "bias", "count")}

    def _set_stacks(self, linear, serial=None, heads=None) -> None:
        self.version += 1
        for sites, hook, values in ((self._linear, POOL_HOOK, linear), (self._serial, SERIAL_POOL_HOOK, serial)):
            for path, arrays in (values or {}).items():
                stack = getattr(sites[path], hook)
                for key, value in arrays.items():
                    getattr(stack, key).set_value(value)
        for key, value in (heads or {}).items():
            getattr(self._heads_module(), key).set_value(value)

    def _write(self, slot: int, adapter: HostAdapter) -> None:
        """One jitted, donated update of every site's slot `slot` (zeros where the adapter has no delta)."""
        def values(sites, table, hook):
            out = {}
            for path, module in sites.items():
                stack = getattr(module, hook)
                d_in, d_out = stack.a.shape[1], stack.b.shape[2]
                a = np.zeros((d_in, self.max_rank), np.float32)
                b = np.zeros((self.max_rank, d_out), np.float32)
                rank, scale = 0, 0.0
                if path in table:
                    fa, fb, scale = table[path]
                    rank = fa.shape[1]
                    a[:, :rank], b[:rank] = fa, fb
                out[path] = {"a": a, "b": b, "rank": np.int32(rank), "scale": np.float32(scale)}
            return out
        linear, serial = self._stacks()
        new = _write_slot((linear, serial, self._heads_state()), jnp.int32(slot),
                          (values(self._linear, adapter.linear, POOL_HOOK),
                           values(self._serial, adapter.serial, SERIAL_POOL_HOOK), self._head_values(adapter)))
        self._set_stacks(*new)

    def _head_values(self, adapter: HostAdapter) -> dict[str, np.ndarray]:
        _, tasks, hidden, labels = self._heads_module().kernel.shape
        kernel = np.zeros((tasks, hidden, labels), np.float32)
        bias = np.zeros((tasks, labels), np.float32)
        count = np.zeros((tasks,), np.int32)
        for t, (names, k, b) in enumerate(adapter.heads.values()):
            kernel[t, :, :len(names)], bias[t, :len(names)], count[t] = k, b, len(names)
        return {"kernel": kernel, "bias": bias, "count": count}

    # -- modes ---------------------------------------------------------------------------------------
    def _correctable(self, name: str) -> bool:
        adapter = self._host[name]
        return all(site in self._qkv_of for site in adapter.serial)

    def _merge_sites(self, adapter: HostAdapter) -> list[str]:
        sites = set(adapter.linear)
        for site in adapter.serial:
            sites.update(self._qkv_of[site])
        return sorted(sites)

    def merge(self, name: str) -> None:
        """Fold `name` into the base weights (one jitted, donated update); other rows then run in mixture mode."""
        self._adapter(name)
        if self._merged not in (None, name):
            raise ValueError(f"adapter {self._merged!r} is merged; unmerge() before merging {name!r}, or switch()")
        self.switch(name)

    def unmerge(self) -> None:
        """Restore the base weights: a switch to none (see `switch`)."""
        self.switch(None)

    def switch(self, name: str | None) -> None:
        """Make `name` the merged adapter (None: none) in one jitted, donated pass over the weights it and the
        merged one adapt: W + dW_name - dW_merged, rounded once, so going from one merged adapter to another
        costs one read and write of each weight, not an unmerge and a merge. Every `restore_every`-th switch
        away from a merged adapter first puts back the exact original weights from the host copy."""
        if name is not None:
            self._adapter(name)
        if name == self._merged:
            return
        new = None if name is None else self._weights(name)
        if new is not None:
            for site in new.serial:
                if site not in self._qkv_of:
                    raise ValueError(f"adapter {name!r}: merging a Serial LoRA needs its block's q/k/v projections "
                                     f"among the pool's sites ({site})")
        old = None if self._merged is None else self._host[self._merged]
        old_slot = -1 if old is None else self._slot_of[old.name]
        new_slot = -1 if new is None else self._place(name)
        old_sites = () if old is None else tuple(self._merge_sites(old))
        if old is not None:
            self._switches_away += 1
            if self._switches_away % self.restore_every == 0:
                self._restore(sorted(self._originals))
                old_sites = ()
        new_sites = () if new is None else tuple(self._merge_sites(new))
        sites = sorted(set(old_sites) | set(new_sites))
        self._keep_originals(new_sites)
        if sites:
            linear, serial = self._stacks()
            qkv_of = () if new is None else tuple((s, self._qkv_of[s]) for s in sorted(new.serial))
            kernels, linear = _switch({p: self._kernel(p) for p in sites}, linear,
                                      {s: serial[s] for s in (new.serial if new is not None else ())},
                                      jnp.int32(max(old_slot, 0)), jnp.int32(max(new_slot, 0)),
                                      (old_sites, new_sites, qkv_of))
            self._set_kernels(kernels)
            self._set_stacks(linear)
        self._merged = name
        if old is not None and old.serial:  # drop its q/k/v corrections: a plain Serial LoRA slot again
            self._write(old_slot, old)

    def restore(self) -> None:
        """Put back the exact original weights of every site a merge has touched (nothing may be merged)."""
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged!r} is merged; unmerge() first")
        self._restore(sorted(self._originals))

    def _kernel(self, path: str) -> jax.Array:
        return self._linear[path].kernel[...]

    def _set_kernels(self, kernels: dict[str, jax.Array]) -> None:
        self.version += 1
        for path, value in kernels.items():
            self._linear[path].kernel.set_value(value)

    def _keep_originals(self, sites: Sequence[str]) -> None:
        for path in sites:
            if path not in self._originals:
                self._originals[path] = np.asarray(jax.device_get(self._kernel(path)))

    def _restore(self, sites: Sequence[str]) -> None:
        self._set_kernels(_write_back({path: self._kernel(path) for path in sites},
                                      {path: self._originals[path] for path in sites}))


def _selected(targets, path: str) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)
