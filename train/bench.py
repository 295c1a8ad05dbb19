"""`python -m train.bench`: throughput of one adapter-training step, this project vs HF transformers + PEFT.

Both sides build the same LLaVA shapes with random weights (`--preset`), put LoRA of `--rank` on the
language model's attention and MLP projections, and time a full step (forward, backward over the
adapter only, AdamW update) on a synthetic batch: `<image>` tokens for one image per row, then text, the
loss on the last `--answer-window` tokens. The PyTorch side runs as a subprocess under `--torch-python`
(torch is not a dependency of this project). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.step import TRAINED, Learner, train_step
from valora_jax.adapters import AdapterConfig, AdapterParam, attach
from valora_jax.config import LlavaConfig, preset
from valora_jax.models.llava import LlavaForConditionalGeneration

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, llava-1.5-7b, ...), random weights")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="base weight dtype")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens per row besides the image tokens")
    p.add_argument("--answer-window", type=int, default=16, help="final tokens that carry the loss")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, allocator warmup)")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch, transformers and peft for the reference side; omitted: JAX only")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench/train_bench.json"), help="JSON result")
    return p


def hf_spec(cfg: LlavaConfig, args: argparse.Namespace, seq_len: int) -> dict:
    """The shapes and settings the PyTorch side needs, in HF config names."""
    v, t = cfg.vision, cfg.text
    return {
        "vision": {"hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                   "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                   "image_size": v.image_size, "patch_size": v.patch_size},
        "text": {"vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                 "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                 "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": max(seq_len, 64)},
        "image_token_id": cfg.image_token_id, "image_seq_length": cfg.image_seq_length, "rank": args.rank,
        "alpha": 2 * args.rank, "dtype": args.dtype, "batch_size": args.batch_size, "seq_len": seq_len,
        "answer_window": args.answer_window, "steps": args.steps, "warmup": args.warmup,
    }


def synthetic_batch(cfg: LlavaConfig, batch_size: int, seq_len: int, answer_window: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.text.vocab_size, (batch_size, seq_len)).astype(np.int32)
    ids[:, 1:1 + cfg.image_seq_length] = cfg.image_token_id
    target_mask = np.zeros_like(ids, bool)
    target_mask[:, -answer_window:] = True
    size = cfg.vision.image_size
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool),
              "position_ids": np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy(),
              "pixel_values": rng.standard_normal((batch_size, 3, size, size)).astype(np.float32),
              "target_mask": target_mask}
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def jax_seconds_per_step(cfg: LlavaConfig, args: argparse.Namespace, seq_len: int) -> float:
    model = LlavaForConditionalGeneration(cfg, dtype=DTYPES[args.dtype], rngs=nnx.Rngs(0))
    attach(model, AdapterConfig(kind="lora", rank=args.rank, alpha=2 * args.rank), nnx.Rngs(1))
    learner = Learner(model, None)
    optimizer = nnx.Optimizer(learner, optax.adamw(1e-4), wrt=AdapterParam)
    graphdef, trained, frozen = nnx.split((learner, optimizer), TRAINED, ...)
    batch = synthetic_batch(cfg, args.batch_size, seq_len, args.answer_window)
    for _ in range(args.warmup):
        trained, loss = train_step(graphdef, trained, frozen, batch, args.answer_window, False)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(args.steps):
        trained, loss = train_step(graphdef, trained, frozen, batch, args.answer_window, False)
    loss.block_until_ready()
    return (time.perf_counter() - start) / args.steps


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = preset(args.preset)
    seq_len = cfg.image_seq_length + args.text_tokens
    reference = None
    if args.torch_python:  # first, so the JAX side's memory preallocation cannot starve it
        spec = json.dumps(hf_spec(cfg, args, seq_len))
        done = subprocess.run([args.torch_python, str(pathlib.Path(__file__).with_name("bench_peft.py"))],
                              input=spec, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"the PyTorch side failed:\n{done.stderr[-4000:]}")
        reference = json.loads(done.stdout.strip().splitlines()[-1])
    seconds = jax_seconds_per_step(cfg, args, seq_len)
    rows = [{"implementation": "valora_jax (JAX/Flax NNX)", "seconds_per_step": seconds}]
    if reference:
        rows.append({"implementation": f"HF transformers + PEFT (torch {reference['torch']})",
                     "seconds_per_step": reference["seconds_per_step"]})
    for row in rows:
        row["examples_per_s"] = args.batch_size / row["seconds_per_step"]
        row["tokens_per_s"] = args.batch_size * seq_len / row["seconds_per_step"]
    ratio = reference["seconds_per_step"] / seconds if reference else None
    result = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "torch_python")},
                           "seq_len": seq_len}, "device": str(jax.devices()[0].device_kind), "rows": rows,
              "speedup_vs_peft": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.preset}, {args.dtype}, LoRA rank {args.rank}, batch {args.batch_size} x {seq_len} tokens, "
          f"on {result['device']}\n")
    print("| implementation | s/step | examples/s | tokens/s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['implementation']} | {row['seconds_per_step']:.4f} | {row['examples_per_s']:.1f} | "
              f"{row['tokens_per_s']:.0f} |")
    if ratio:
        print(f"\nvalora_jax / PEFT throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
