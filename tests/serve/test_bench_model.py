"""serve.bench_model: the byte floor's weight count, derived by hand from the config, and a CPU run."""

import json

import jax.numpy as jnp
from serve import bench_model
from valora_jax.config import preset


def test_decode_weight_bytes_counts_the_language_model_and_head_but_one_embedding_row():
    model = bench_model.random_model("tiny", jnp.float32, seed=0)
    cfg = preset("tiny")
    text = cfg.text
    h, inter, heads, kv_heads = text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = text.head_dim
    attention = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    per_layer = attention + 3 * h * inter + 2 * h  # q k v o, gate up down, two RMSNorms
    head = 0 if cfg.tie_word_embeddings else text.vocab_size * h
    expected = 4 * (text.num_hidden_layers * per_layer + h + head)  # + final norm; float32
    assert bench_model.decode_weight_bytes(model) == expected


def test_bench_model_writes_one_row_per_phase(tmp_path):
    bench_model.main(["--batch", "1", "2", "--prompt-len", "16", "--new-tokens", "3", "--prefill-len", "32",
                      "--repeats", "1", "--copy-bytes", str(1 << 20), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_model.json").read_text())
    assert [(r["phase"], r["batch"]) for r in rows] == [("prefill", 1), ("decode", 1), ("decode", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["floor_ms"] > 0 and r["step_ms"] > 0 for r in rows[1:])
    assert (tmp_path / "bench_model.md").read_text().startswith("tiny float32")


def test_bench_model_runs_a_qwen_vl_preset(tmp_path, monkeypatch, golden_dir):
    """`--preset qwen2.5-vl-7b` goes through the registry to the Qwen-VL model; its shapes are swapped for the
    tiny golden Qwen2.5-VL config so the run fits a CPU test (the preset's own shapes: test_model_registry)."""
    from valora_jax.loading import load_config
    from valora_jax.models.qwen2_vl.model import Qwen2VLForConditionalGeneration

    _, tiny = load_config(golden_dir / "qwen2_5_vl")
    monkeypatch.setattr(bench_model, "preset", lambda name: tiny if name == "qwen2.5-vl-7b" else preset(name))
    assert isinstance(bench_model.random_model("qwen2.5-vl-7b", jnp.float32, seed=0), Qwen2VLForConditionalGeneration)
    bench_model.main(["--preset", "qwen2.5-vl-7b", "--batch", "2", "--prompt-len", "16", "--new-tokens", "3",
                      "--prefill-len", "32", "--repeats", "1", "--copy-bytes", str(1 << 20), "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_model.json").read_text())
    assert [(r["phase"], r["batch"], r["preset"]) for r in rows] == [("prefill", 1, "qwen2.5-vl-7b"),
                                                                      ("decode", 2, "qwen2.5-vl-7b")]
    assert all(r["floor_ms"] > 0 and r["step_ms"] > 0 for r in rows[1:])
