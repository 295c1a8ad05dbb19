"""Peak memory of one training step: LoRA vs Serial LoRA vs SNELLA vs full fine-tuning on a model preset.

    python -m train.bench_memory --preset tiny --rank 8
    python -m train.bench_memory --preset llava-1.5-7b --text-layers 2 --vision-layers 2 --seq 64

One step = forward + backward (gradients of the trained variables only) + an AdamW update, jitted with the
trained state donated. On accelerators (`memory_stats()` available) the step runs and the device's
`peak_bytes_in_use` is reported; on CPU, where there is no allocator peak, the compiled executable's
memory analysis is: arguments + outputs + temporaries - donated aliases (nothing is allocated, so presets
far larger than the host's memory can be analysed). Each mode runs in its own process: the device peak
never resets, and a parent holding the device would starve its children. `--text-layers` /
`--vision-layers` truncate the preset (same widths) to bound compile time. SNELLA's allocator update
(once per step, O(adapter size)) is not part of the measured step. Writes a Markdown table to stdout and
JSON next to it with `--json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, attach
from valora_jax.config import preset
from valora_jax.models.llava import LlavaForConditionalGeneration

MODES = ("lora", "serial_lora", "snella", "full")


def build(cfg, mode: str, dtype, rank: int):
    """The model (abstract: shapes only) with the mode's adapter (VaLoRA's attention + MLP targets) attached."""
    def make():
        model = LlavaForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if mode != "full":
            attach(model, AdapterConfig(kind=mode, rank=rank, alpha=16), nnx.Rngs(1))
        return model
    return nnx.eval_shape(make)


def train_step(graphdef, tx, wrt):
    def step(trained, frozen, opt_state, ids, pixels, mask):
        def loss_fn(model):
            logits = model(ids, pixels, mask)[:, :-1]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]))

        # Merged outside the gradient so adapter dropout (an RNG stream) may advance inside it.
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(nnx.merge(graphdef, trained, frozen))
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def batch_shapes(cfg, batch: int, text_len: int):
    seq = cfg.image_seq_length + text_len
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    pixels = jax.ShapeDtypeStruct((batch, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    return ids, pixels, jax.ShapeDtypeStruct((batch, seq), jnp.int32)


def measure(cfg, mode: str, dtype, batch: int, text_len: int, rank: int) -> dict:
    model = build(cfg, mode, dtype, rank)
    wrt = nnx.Param if mode == "full" else AdapterParam
    graphdef, trained, frozen = nnx.split(model, wrt, ...)
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt_state = jax.eval_shape(tx.init, trained)
    step = train_step(graphdef, tx, wrt)
    n_trained = sum(x.size for x in jax.tree.leaves(trained))
    result = {"mode": mode, "trained_params": int(n_trained), "platform": jax.devices()[0].platform}
    stats = jax.devices()[0].memory_stats()
    if stats is None:
        compiled = step.lower(trained, frozen, opt_state, *batch_shapes(cfg, batch, text_len)).compile()
        mem = compiled.memory_analysis()
        result.update(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                      temporaries=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes,
                      peak=mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes, source="compiled memory analysis")
    else:
        materialise = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        trained, frozen = materialise(trained), materialise(frozen)
        opt_state = tx.init(trained)
        ids, pixels, mask = (jnp.ones(s.shape, s.dtype) for s in batch_shapes(cfg, batch, text_len))
        jax.block_until_ready(step(trained, frozen, opt_state, ids, pixels, mask))
        result.update(peak=jax.devices()[0].memory_stats()["peak_bytes_in_use"], source="device peak_bytes_in_use")
    return result


def measure_in_subprocess(argv: list[str], mode: str) -> dict:
    """`measure` in a fresh process (see the module docstring for why)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp, "result.json")
        subprocess.run([sys.executable, "-m", "train.bench_memory", *argv, "--modes", mode, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["results"][0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rank", type=int, default=64, help="adapter rank (VaLoRA's default: 64)")
    parser.add_argument("--dtype", default=None, help="base weight dtype (default: float32 for tiny, else bfloat16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32, help="text tokens after the image tokens")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--vision-layers", type=int, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    cfg = preset(args.preset)
    if args.text_layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=args.text_layers))
    if args.vision_layers:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, num_hidden_layers=args.vision_layers))
    dtype = jnp.dtype(args.dtype or ("float32" if args.preset == "tiny" else "bfloat16"))
    if len(args.modes) > 1:
        results = [measure_in_subprocess(argv, mode) for mode in args.modes]
    else:
        results = [measure(cfg, mode, dtype, args.batch, args.seq, args.rank) for mode in args.modes]
    print(f"preset {args.preset} (text layers {cfg.text.num_hidden_layers}, vision layers "
          f"{cfg.vision.num_hidden_layers}), {dtype.name} base, batch {args.batch}, "
          f"{cfg.image_seq_length}+{args.seq} tokens, rank {args.rank}, AdamW; {results[0]['source']} on "
          f"{results[0]['platform']}\n")
    print("| mode | trained params | peak MiB |\n| --- | ---: | ---: |")
    for r in results:
        print(f"| {r['mode']} | {r['trained_params']:,} | {r['peak'] / 2**20:,.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "config": dataclasses.asdict(cfg), "results": results},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
