"""AdapterPool: a mixed-adapter batch against PEFT run per request, modes, kinds side by side, errors.

The PEFT reference (`tests/golden/mixed_batch.outputs.safetensors`, made by `make golden`) holds what
transformers + PEFT give each of five requests alone (its own prompt length, its own image, its adapter
or the base model): logits and 16 greedy tokens. Here the five run as one left-padded batch.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize_adapter, small_inputs, small_model
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from valora_jax.adapters import AdapterConfig, attach, load_adapter, save_adapter
from valora_jax.adapters.heads import MASKED_LOGIT, ClassifyHeads
from valora_jax.adapters.pool import AdapterPool
from valora_jax.generation import Generator
from valora_jax.loading import load_pretrained

pytestmark = pytest.mark.xdist_group("pool_llava_mha")  # module fixtures load the golden model once

PEFT_ADAPTERS = ("peft_lora", "peft_lora_vision", "peft_lora_mlp")
TOWERS = ("language_model", "vision_tower", "multi_modal_projector")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, pixels, mask, positions, adapters):
    return nnx.merge(graphdef, state)(ids, pixels, mask, positions, adapters=adapters)


def forward(model, ids, pixels, mask, adapters):
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return np.asarray(_forward(*nnx.split(model), ids, pixels, mask, positions, adapters))


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def mixed(golden_dir):
    """(reference arrays, adapter per row, left-padded ids, mask, pixels) of the mixed-batch golden file."""
    path = golden_dir / "mixed_batch.outputs.safetensors"
    ref = load_file(str(path))
    with safe_open(str(path), "np") as f:
        names = json.loads(json.loads(f.metadata()["info"])["adapters"])
    rows = [ref[f"input_ids_{i}"][0] for i in range(len(names))]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, True
    pixels = np.concatenate([ref[f"pixel_values_{i}"] for i in range(len(rows))])
    # every adapter, the base model, one adapter on two rows, prompts of different lengths
    assert set(names) == {None, *PEFT_ADAPTERS} and len(names) == len(set(names)) + 1
    assert len({len(r) for r in rows}) == len(rows)
    return ref, names, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)


@pytest.fixture(scope="module")
def golden_pool(golden_dir):
    model, _ = load_pretrained(golden_dir / "llava_mha")
    pool = AdapterPool(model, slots=4, max_rank=8)
    for name in PEFT_ADAPTERS:
        pool.load(name, golden_dir / name)
    return model, pool


def check_rows(logits, ref, requests):
    """Row k's real positions against PEFT's logits for request `requests[k]` alone (float32, relative 1e-4)."""
    for row, i in enumerate(requests):
        want = ref[f"logits_{i}"][0]
        got = logits[row, logits.shape[1] - want.shape[0]:]
        assert rel_err(got, want) <= 1e-4, (row, i, rel_err(got, want))


@pytest.mark.parametrize("merged", [None, *PEFT_ADAPTERS])
def test_mixed_batch_equals_peft_per_request(golden_pool, mixed, merged):
    """Unmerged, and mixture mode with each adapter merged in turn: logits and greedy tokens of PEFT."""
    model, pool = golden_pool
    ref, names, ids, mask, pixels = mixed
    if merged is not None:
        pool.merge(merged)
    try:
        batch = pool.select(names)
        assert (batch.correction is None) == (merged is None)
        check_rows(forward(model, ids, pixels, mask, batch), ref, range(len(names)))
        tokens = Generator(model, max_len=96).generate(ids, pixels, mask, max_new_tokens=16, eos_token_id=-1,
                                                       adapters=batch)
        for i in range(len(names)):
            np.testing.assert_array_equal(tokens[i], ref[f"generated_ids_{i}"][0], err_msg=f"row {i}: {names[i]}")
    finally:
        pool.unmerge()


def test_pallas_backends_in_the_model_match_the_reference(golden_dir, mixed):
    """The GPU and TPU kernels (interpret mode) inside every adapted projection give the reference's logits."""
    ref, names, ids, mask, pixels = mixed
    rows = np.arange(4)  # every adapter and the base
    for backend in ("pallas_gpu", "pallas_tpu"):
        model, _ = load_pretrained(golden_dir / "llava_mha")
        pool = AdapterPool(model, slots=4, max_rank=8, backend=backend, interpret=True)
        for name in PEFT_ADAPTERS:
            pool.load(name, golden_dir / name)
        batch = pool.select([names[i] for i in rows])
        check_rows(forward(model, ids[rows], pixels[rows], mask[rows], batch), ref, rows)


KIND_CONFIGS = {
    "lora": AdapterConfig(kind="lora", rank=4, alpha=8, towers=TOWERS, rank_pattern={"down_proj": 2},
                          targets=("q_proj", "v_proj", "o_proj", "out_proj", "down_proj", "fc1", "linear_2")),
    "serial": AdapterConfig(kind="serial_lora", rank=3, alpha=6, towers=TOWERS),
    "snella": AdapterConfig(kind="snella", rank=4, towers=("language_model",), targets=("q_proj", "up_proj")),
}
ROWS = ("lora", "serial", None, "snella")  # the small inputs' row 0 is left-padded


@pytest.fixture(scope="module")
def saved_kinds(tmp_path_factory):
    """Each kind saved by `save_adapter` from the same base, and the logits it gives attached alone."""
    root = tmp_path_factory.mktemp("kinds")
    inputs = small_inputs(batch=len(ROWS))
    alone = {None: np.asarray(small_model(seed=3)(*inputs))}
    for seed, (name, config) in enumerate(KIND_CONFIGS.items()):
        model = small_model(seed=3)
        attach(model, config, nnx.Rngs(seed))
        randomize_adapter(model, seed=10 + seed)
        model.eval()
        save_adapter(model, root / name)
        alone[name] = np.asarray(model(*inputs))
        assert rel_err(alone[name], alone[None]) > 1e-2, f"{name} must change the logits"
    return root, inputs, alone


def kinds_pool(root, **kwargs):
    model = small_model(seed=3)
    pool = AdapterPool(model, slots=4, max_rank=64, **kwargs)
    for name in KIND_CONFIGS:
        pool.load(name, root / name)
    return model, pool


def check_kinds(logits, alone, rows=ROWS, tol=1e-5):
    for i, name in enumerate(rows):
        assert rel_err(logits[i], alone[name][i]) <= tol, (i, name, rel_err(logits[i], alone[name][i]))


@pytest.mark.parametrize("merged", [None, "lora", "serial"])
def test_kinds_side_by_side_equal_each_attached_alone(saved_kinds, merged):
    """LoRA, Serial LoRA, SNELLA (a dense slot) and the base in one batch, unmerged and in mixture mode."""
    root, inputs, alone = saved_kinds
    model, pool = kinds_pool(root)
    if merged is not None:
        pool.merge(merged)
    check_kinds(forward(model, *inputs, pool.select(ROWS)), alone)
    pool.unmerge()
    check_kinds(forward(model, *inputs, pool.select(ROWS)), alone)


def test_snella_merged_equals_snella_attached(saved_kinds):
    root, inputs, alone = saved_kinds
    model, pool = kinds_pool(root)
    pool.merge("snella")
    rows = ["snella"] * len(ROWS)
    check_kinds(forward(model, *inputs, pool.select(rows)), alone, rows)
    check_kinds(np.asarray(model(*inputs)), alone, rows)  # the merged weights alone, no selection


def test_snella_too_wide_for_the_rank_buffer_is_refused(saved_kinds):
    root, _, _ = saved_kinds
    pool = AdapterPool(small_model(seed=3), slots=2, max_rank=16)
    with pytest.raises(ValueError, match=r"adapter 'snella' needs a dense SNELLA delta of rank 32 .* max_rank 16"):
        pool.load("snella", root / "snella")
    assert pool.adapters == ()


def pool_state(pool):
    return pool.adapters, pool.resident, pool.merged


def test_errors_name_the_adapter_and_leave_the_pool_unchanged(saved_kinds, golden_dir, tmp_path):
    root, _, _ = saved_kinds
    model, pool = kinds_pool(root)
    pool.select(["lora", "serial"])
    before = pool_state(pool)
    with pytest.raises(KeyError, match="'medical' is not loaded"):
        pool.select(["lora", "medical"])
    with pytest.raises(ValueError, match=r"adapter 'other-base'.*lora_A.*shape"):
        pool.load("other-base", golden_dir / "peft_lora")  # made for the golden model's widths
    with pytest.raises(ValueError, match=r"adapter 'wide' needs rank 4 at .*max_rank 3"):
        AdapterPool(small_model(seed=3), slots=2, max_rank=3).load("wide", root / "lora")
    with pytest.raises(FileNotFoundError, match=r"adapter 'gone'.*missing adapter_config.json"):
        pool.load("gone", tmp_path / "nowhere")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "lora", corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter 'corrupt'.*unreadable"):
        pool.load("corrupt", corrupt)
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("lora", root / "lora")
    assert pool_state(pool) == before


def test_full_pool_evicts_lru_and_refuses_when_all_slots_are_pinned_or_held(saved_kinds):
    root, _, _ = saved_kinds
    model = small_model(seed=3)
    pool = AdapterPool(model, slots=2, max_rank=64)
    pool.load("lora", root / "lora", pin=True)
    pool.load("serial", root / "serial")
    pool.load("snella", root / "snella")
    pool.select(["serial"])
    pool.select(["snella"])  # evicts serial, the least recently used unpinned adapter
    assert set(pool.resident) == {"lora", "snella"}
    with pytest.raises(RuntimeError, match=r"no device slot for adapter 'serial'"):
        pool.select(["serial", "snella"])  # snella is in the same batch, lora is pinned
    pool.hold(["snella"])
    before = pool_state(pool)
    with pytest.raises(RuntimeError, match=r"no device slot for adapter 'serial'"):
        pool.select(["serial"])
    with pytest.raises(ValueError, match=r"'snella' is in use by 1 running request"):
        pool.unload("snella")
    assert pool_state(pool) == before
    pool.release(["snella"])
    pool.select(["serial"])
    pool.unload("snella")
    assert set(pool.resident) == {"lora", "serial"} and pool.adapters == ("lora", "serial")


def test_loading_evicting_selecting_and_switching_never_recompile(saved_kinds):
    """One forward program per mode (unmerged, merged/mixture) and one slot writer, whatever the mix."""
    root, inputs, alone = saved_kinds
    model = small_model(seed=3)
    pool = AdapterPool(model, slots=2, max_rank=64, restore_every=2)  # the exact restore runs too
    for name in KIND_CONFIGS:
        pool.load(name, root / name)
    mixes = [("lora", "serial", None, None), ("serial", None, None, "serial"), ("snella", "lora", "lora", None),
             (None,) * 4, ("snella", "serial", "snella", None), ("lora", None, "lora", "lora")]
    forward(model, *inputs, pool.select(mixes[0]))  # compiles the unmerged forward and the slot writer
    programs, writers = _forward._cache_size(), pool_writer_programs()
    for rows in mixes:  # three adapters in two slots: most of these evict
        check_kinds(forward(model, *inputs, pool.select(rows)), alone, rows)
    pool.unload("lora")
    pool.load("lora", root / "lora")
    check_kinds(forward(model, *inputs, pool.select(mixes[0])), alone, mixes[0])
    assert _forward._cache_size() == programs and pool_writer_programs() == writers
    pool.merge("snella")
    check_kinds(forward(model, *inputs, pool.select(["snella", "snella", None, "snella"])), alone,
                ["snella", "snella", None, "snella"])
    programs += 1  # the mixture program
    for merged in ("lora", "snella", "lora"):
        pool.unmerge()
        pool.merge(merged)
        rows = (merged, None, "serial", merged)
        check_kinds(forward(model, *inputs, pool.select(rows)), alone, rows)
    assert _forward._cache_size() == programs and pool_writer_programs() == writers


def test_switching_between_merged_adapters_directly(saved_kinds):
    """`switch(b)` while a is merged: every row's logits as after unmerge() and merge(b) (Serial LoRA's q/k/v
    corrections rebuilt from the base weights, not a's), in one program per pair of site sets."""
    from valora_jax.adapters import pool as pool_module

    root, inputs, alone = saved_kinds
    model = small_model(seed=3)
    pool = AdapterPool(model, slots=3, max_rank=64)
    for name in KIND_CONFIGS:
        pool.load(name, root / name)
    path = ("serial", "lora", "snella", "serial", None, "lora", "serial", "lora")
    for target in path:
        pool.switch(target)
        assert pool.merged == target
        rows = (target, None, "lora", "serial")
        check_kinds(forward(model, *inputs, pool.select(rows)), alone, rows)
    programs = pool_module._switch._cache_size()
    for target in path:  # the same path again compiles nothing
        pool.switch(target)
    assert pool_module._switch._cache_size() == programs
    with pytest.raises(ValueError, match="'lora' is merged; unmerge\\(\\) before merging 'serial', or switch"):
        pool.merge("serial")
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        pool.switch("nope")
    assert pool.merged == "lora"


def pool_writer_programs():
    from valora_jax.adapters import pool as pool_module
    return pool_module._write_slot._cache_size()


def test_bfloat16_mixed_batch_within_tolerance_of_float32(golden_dir, mixed):
    ref, names, ids, mask, pixels = mixed
    model, _ = load_pretrained(golden_dir / "llava_mha", dtype=jnp.bfloat16)
    pool = AdapterPool(model, slots=4, max_rank=8)
    for name in PEFT_ADAPTERS:
        pool.load(name, golden_dir / name)
    logits = forward(model, ids, pixels, mask, pool.select(names))
    # bfloat16 weights and activations cost this small random model up to 9.4% (relative max error) on
    # these requests run alone with `load_adapter` (base row: 3.3%); the pool's mixed batch stays within 10%.
    for i, name in enumerate(names):
        want = ref[f"logits_{i}"][0]
        assert rel_err(logits[i, logits.shape[1] - want.shape[0]:], want) <= 0.1, (i, name)


def test_mixed_batch_on_a_mesh_equals_one_device(golden_dir, mixed):
    from valora_jax.sharding import make_mesh, shard_model

    _, names, ids, mask, pixels = mixed
    rows = np.arange(4)
    outputs = []
    for mesh in (None, make_mesh(data=2, model=4)):
        model, _ = load_pretrained(golden_dir / "llava_mha")
        pool = AdapterPool(model, slots=4, max_rank=8)
        if mesh is not None:
            shard_model(model, mesh)
            b = model.language_model.layers[0].self_attn.q_proj.slots.b[...]
            assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
        for name in PEFT_ADAPTERS:
            pool.load(name, golden_dir / name)
        pool.merge("peft_lora_mlp")
        batch = pool.select([names[i] for i in rows])
        if mesh is None:
            outputs.append(forward(model, ids[rows], pixels[rows], mask[rows], batch))
        else:
            with jax.set_mesh(mesh):
                outputs.append(forward(model, ids[rows], pixels[rows], mask[rows], batch))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5 * np.abs(outputs[0]).max())


def test_switching_100_times_in_bfloat16_keeps_the_base_weights(golden_dir):
    """merge / unmerge cycles in bf16: bit-identical at every restore, within a fixed bound in between."""
    model, _ = load_pretrained(golden_dir / "llava_mha", dtype=jnp.bfloat16)
    every = 4
    pool = AdapterPool(model, slots=4, max_rank=8, restore_every=every)
    for name in PEFT_ADAPTERS:
        pool.load(name, golden_dir / name)
    kernels = lambda: {p: np.asarray(m.kernel[...].astype(jnp.float32)) for p, m in nnx.iter_modules(model)
                       if hasattr(m, "kernel") and p[0] != "lm_head"}
    original, largest, drifted = kernels(), 0.0, 0
    for cycle in range(1, 101):
        pool.merge(PEFT_ADAPTERS[cycle % 3])
        largest = max(largest, max(np.abs(w).max() for w in kernels().values()))
        pool.unmerge()
        drift = max(np.abs(w - original[p]).max() for p, w in kernels().items())
        if cycle % every == 0:
            assert drift == 0.0, cycle
        else:
            drifted += drift > 0
            # each unmerge since the last restore can leave at most one bf16 rounding (2^-8 relative) behind
            assert drift <= (cycle % every) * 2.0**-8 * largest, (cycle, drift)
    assert drifted, "bf16 rounding must show between restores for this test to mean anything"
    pool.merge("peft_lora")
    pool.unmerge()
    pool.restore()
    assert all(np.array_equal(w, original[p]) for p, w in kernels().items())
    # Direct switches between merged adapters: every switch away from one counts towards the restore.
    pool = AdapterPool(model, slots=4, max_rank=8, restore_every=every)
    for name in PEFT_ADAPTERS:
        pool.load(name, golden_dir / name)
    away = 0
    for cycle in range(1, 31):
        for name in PEFT_ADAPTERS[: cycle % 3 + 1]:
            away += pool.merged is not None
            pool.switch(name)
        away += 1
        pool.switch(None)
        since_restore = away % every
        drift = max(np.abs(w - original[p]).max() for p, w in kernels().items())
        assert drift <= since_restore * 2.0**-8 * largest, (cycle, drift)
        if since_restore == 0:
            assert drift == 0.0, cycle


def test_classify_heads_load_with_their_adapter_and_answer_in_the_same_pass(saved_kinds, tmp_path):
    root, inputs, _ = saved_kinds
    label_sets = {"shape": ("circle", "square", "star"), "count": ("1", "2", "3", "4", "5")}
    heads = ClassifyHeads(32, label_sets, rngs=nnx.Rngs(4))
    heads.kernel.set_value(jax.random.normal(jax.random.key(5), heads.kernel.shape))
    heads.bias.set_value(jax.random.normal(jax.random.key(6), heads.bias.shape))
    directory = tmp_path / "lora_with_heads"
    shutil.copytree(root / "lora", directory)
    heads.save(directory)
    attached = small_model(seed=3)
    load_adapter(attached, directory)
    hidden, _ = attached.hidden_states(*inputs)
    expected = np.asarray(heads(hidden[:, -1], jnp.asarray([0, 1, 0, 1])))

    model = small_model(seed=3)
    pool = AdapterPool(model, slots=2, max_rank=64, head_tasks=2, head_labels=8)
    pool.load("lora", directory)
    pool.load("serial", root / "serial")
    assert pool.labels("lora", "count") == label_sets["count"]
    batch = pool.select(["lora", "lora", "serial", "lora"], tasks=["shape", "count", None, "count"])
    hidden, _ = model.hidden_states(*inputs, adapters=batch)
    got = np.asarray(model.classify_slots(hidden[:, -1], batch.heads))
    for row, task in ((0, "shape"), (1, "count"), (3, "count")):
        n = len(label_sets[task])
        np.testing.assert_allclose(got[row, :n], expected[row, :n], rtol=1e-5, atol=1e-5)
        assert (got[row, n:] == MASKED_LOGIT).all()
    assert (got[2] == MASKED_LOGIT).all()
    with pytest.raises(KeyError, match="'serial' has no classify head for task 'shape'"):
        pool.select(["serial"], tasks=["shape"])
    with pytest.raises(ValueError, match="base-model row"):
        pool.select([None], tasks=["shape"])
    with pytest.raises(ValueError, match=r"'lora' has 2 classify heads; the pool holds 1"):
        AdapterPool(small_model(seed=3), slots=2, max_rank=64, head_tasks=1).load("lora", directory)


def test_host_capacity_drops_weights_and_reads_them_again_on_use(saved_kinds):
    """vLLM's max_cpu_loras: past `host_capacity`, the least recently used adapters keep only their name and
    directory; selecting one reads it again, with the same outputs."""
    root, inputs, alone = saved_kinds
    model = small_model(seed=3)
    pool = AdapterPool(model, slots=1, max_rank=64, host_capacity=1)
    for name in KIND_CONFIGS:
        pool.load(name, root / name)
    assert pool.adapters == tuple(KIND_CONFIGS) and pool.in_host_memory == ("snella",)
    for rows in (("lora",) * 4, ("serial", None, "serial", None), ("lora", "lora", None, None)):
        check_kinds(forward(model, *inputs, pool.select(rows)), alone, rows)
        assert pool.in_host_memory == (rows[0],) and set(pool.resident) == {rows[0]}
    pool.merge("serial")
    check_kinds(forward(model, *inputs, pool.select(["serial"] * 4)), alone, ["serial"] * 4)
    with pytest.raises(ValueError, match="host_capacity must be >= 1"):
        AdapterPool(small_model(seed=3), host_capacity=0)
