#!/usr/bin/env python
"""Reference outputs for valora-jax, made with HF transformers 5 / PEFT in PyTorch (CPU, float32, eager).

Run in the reference venv (`make golden`, or `.venv-ref/bin/python scripts/make_golden.py --out tests/golden`).
It never touches the network: every model is built from a config with seeded random weights, and the
processors come from `valora_jax.models.tiny_processor` (tokenizers/transformers only, no JAX).

Writes, under --out (see tests/golden/README.md for the full description):
  llava_mha/                      tiny LlavaForConditionalGeneration, default transformers 5 `save_pretrained`
                                  (one model.safetensors; transformers 5 reverts its conversion mapping on save, so
                                  the names are language_model.model.*, language_model.lm_head.weight,
                                  multi_modal_projector.*, vision_tower.* -- no `vision_model.` level) + processor
  llava_mha.outputs.safetensors   inputs, logits, image features and greedy generations of llava_mha
  llava_gqa_legacy/               GQA / llama3-rope / tied / "full" config, in the published llava-hf layout
                                  (transformers-4 style config.json, legacy tensor names, 2 safetensors shards
                                  + model.safetensors.index.json); no processor files
  llava_gqa_legacy.outputs.safetensors
  peft_lora/                      PEFT LoRA adapter (language model only) on llava_mha
  peft_lora.outputs.safetensors   adapted and merged logits (+ greedy generation) on llava_mha's inputs
  peft_lora_vision/               PEFT LoRA adapter (vision q/k/v/out + LM q/v, with a rank_pattern)
  peft_lora_vision.outputs.safetensors
  qwen2_vl/                       tiny Qwen2VLForConditionalGeneration (tied), published layout (save_pretrained:
                                  visual.*, model.*), tokenizer + Qwen2VLImageProcessorPil files
  qwen2_vl.outputs.safetensors    inputs (3 images of different sizes, 2 prompts), logits, M-RoPE positions,
                                  merged image features, greedy generations
  qwen2_5_vl/                     tiny Qwen2_5_VLForConditionalGeneration (untied, ragged windows), transformers 5
                                  in-memory names (model.visual.*, model.language_model.*, lm_head.*)
  qwen2_5_vl.outputs.safetensors
  peft_lora_qwen2_5_vl/           PEFT LoRA on qwen2_5_vl: vision blocks (qkv, proj, gated MLP) + decoder
  peft_lora_qwen2_5_vl.outputs.safetensors   adapted / merged logits and greedy generation on qwen2_5_vl's inputs
`--only llava` / `--only qwen` regenerates one family's files and leaves the others alone.

The reverse direction (an adapter the JAX side saved with `save_adapter`, loaded into PEFT):
  python scripts/make_golden.py --out tests/golden --saved-adapter jax_saved_lora
loads <out>/jax_saved_lora (written by `python tests/adapters/jax_saved_lora.py`) with
`PeftModel.from_pretrained` on llava_mha and writes PEFT's logits for it to
<out>/jax_saved_lora.outputs.safetensors, touching nothing else; `make golden` runs it after the full
run and the JAX script, and the test suite compares the JAX logits with these.
  python scripts/make_golden.py --verify-adapter DIR --base tests/golden/llava_mha \
      --expect FILE [--inputs tests/golden/llava_mha.outputs.safetensors]
compares PEFT's logits with FILE's `logits` on the stored inputs and exits 1 when the max relative
error (max |a-b| over non-pad positions / max |expect| over those positions) exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import re
import shutil
import sys

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from safetensors.numpy import load_file as np_load_file  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

MAX_NEW_TOKENS = 16
MIN_GREEDY_MARGIN = 1e-3  # every greedy step's top-1 / top-2 logit gap must exceed this
VERIFY_TOL = 1e-4

# Prompts: words of TINY_VOCAB_WORDS and `<image>`. Prompt 0 is the shorter one (left-padded in the batch);
# the single (unbatched) example is prompt 0 with image 0.
PROMPTS = (
    "user : <image> what colour is the circle ? assistant :",
    "user : <image> how many red shapes are there in this image ? answer with one word . assistant :",
)


# ----------------------------------------------------------------------------------------------------------------
# determinism


def set_determinism(seed: int = 0) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once, before any inter-op parallel work
        pass


# ----------------------------------------------------------------------------------------------------------------
# configs


def tiny_vocab_size() -> int:
    from valora_jax.models.tiny_processor import tiny_vocab

    return len(tiny_vocab())


def mha_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from valora_jax.models.tiny_processor import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID

    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    n_patches = (32 // 8) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=n_patches,  # "default" drops CLS
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
    )


LEGACY_IMAGE_SIZE = 24
LEGACY_PATCH_SIZE = 8


def legacy_config_json() -> dict:
    """config.json of the legacy model, written the way transformers 4.x wrote the llava-hf checkpoints.

    As in llava-hf/llava-1.5-7b-hf, sub-configs hold only the values that differ from the sub-config class
    defaults (LlamaConfig / CLIPVisionConfig), `image_token_index` (not `image_token_id`) is used, and the rope is
    given as `rope_theta` + `rope_scaling` (transformers 4 style; transformers 5 converts it to `rope_parameters`).
    Omitted defaults a loader must fill in: text hidden_act "silu", bos 1, eos 2, attention_bias/mlp_bias false;
    vision hidden_act "quick_gelu", layer_norm_eps 1e-5, num_channels 3.
    """
    from valora_jax.models.tiny_processor import IMAGE_TOKEN_ID, PAD_ID

    n_patches = (LEGACY_IMAGE_SIZE // LEGACY_PATCH_SIZE) ** 2
    vocab = tiny_vocab_size()
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": n_patches + 1,  # "full" keeps CLS
        "image_token_index": IMAGE_TOKEN_ID,
        "model_type": "llava",
        "pad_token_id": PAD_ID,
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "model_type": "llama",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 64,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "vocab_size": vocab,
        },
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.46.0",
        "vision_config": {
            "hidden_size": 48,
            "image_size": LEGACY_IMAGE_SIZE,
            "intermediate_size": 96,
            "model_type": "clip_vision_model",
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "patch_size": LEGACY_PATCH_SIZE,
            "projection_dim": 48,
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "vocab_size": vocab,
    }


# ----------------------------------------------------------------------------------------------------------------
# weights


_NORM_RE = re.compile(r"(norm|layrnorm|layer_norm|ln_q)[^.]*\.weight$")
_NORM_BIAS_RE = re.compile(r"(norm|layrnorm|layer_norm|ln_q)[^.]*\.bias$")


def init_weights(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Re-initialise every parameter from a seeded numpy generator (platform independent), in name order.

    Norm weights ~ 1 + 0.1 N(0,1); all biases ~ 0.1 N(0,1); token / position / class embeddings ~ N(0,1);
    every other matrix (linear, conv) ~ std * N(0,1). Large enough that logits are far from uniform.
    """
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            z = rng.standard_normal(tuple(p.shape))
            if _NORM_RE.search(name):
                v = 1.0 + 0.1 * z
            elif name.endswith(".bias") or _NORM_BIAS_RE.search(name):
                v = 0.1 * z
            elif "embed_tokens" in name or "position_embedding" in name or "class_embedding" in name:
                v = z
            else:
                v = std * z
            p.copy_(torch.from_numpy(v.astype(np.float32)))


# ----------------------------------------------------------------------------------------------------------------
# inputs and reference runs


def make_images(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)


def process(processor, prompts, images) -> dict[str, torch.Tensor]:
    out = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def mask_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What `generate` uses: cumsum(mask) - 1, pad positions set to 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def forward_logits(model, input_ids, attention_mask, pixel_values, position_ids="mask") -> torch.Tensor:
    kw = {}
    if isinstance(position_ids, str):
        if position_ids == "mask":
            kw["position_ids"] = mask_position_ids(attention_mask)
    else:
        kw["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **kw)
    return out.logits.float()


@torch.no_grad()
def greedy(model, input_ids, attention_mask, pixel_values) -> tuple[torch.Tensor, float]:
    """`model.generate` greedy (KV cache), checked against a naive argmax loop without cache.

    Returns the new tokens only [B, MAX_NEW_TOKENS] and the smallest top-1/top-2 logit gap seen.
    eos never stops generation and is never suppressed: eos_token_id=None, min_new_tokens unset.
    """
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=1,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        generation_config=gc,
    )
    new = out[:, input_ids.shape[1]:]
    assert new.shape[1] == MAX_NEW_TOKENS, new.shape

    # naive loop: full forward each step, positions from the mask
    ids, mask, margin, naive = input_ids, attention_mask, float("inf"), []
    for _ in range(MAX_NEW_TOKENS):
        last = forward_logits(model, ids, mask, pixel_values)[:, -1]
        top2 = torch.topk(last, 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        nxt = last.argmax(-1, keepdim=True)
        naive.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    naive = torch.cat(naive, dim=1)
    if not torch.equal(naive, new):
        raise AssertionError(f"generate != naive greedy loop:\n{new}\n{naive}")
    return new, margin


def check_reference(logits, gen, single_logits, single_gen, mask, real0) -> None:
    """Row 0 alone (no padding) gives the batch's row-0 logits and generation; generations are not a constant
    token; logits are far from uniform."""
    d = (single_logits[0] - logits[0, real0]).abs().max().item()
    assert d < 1e-4, f"padded vs unpadded logits differ by {d}"
    assert torch.equal(single_gen, gen[:1]), (single_gen, gen[:1])
    for row in gen:
        assert len(set(row.tolist())) > 2, f"greedy generation too repetitive: {row.tolist()}"
    assert float(logits[mask.bool()].std()) > 0.5, "logits too close to uniform"


def reference_outputs(model, processor_or_none, prompts, images, inputs) -> tuple[dict[str, np.ndarray], dict]:
    ids, mask, pv = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    pos = mask_position_ids(mask)
    logits = forward_logits(model, ids, mask, pv, pos)
    logits_default = forward_logits(model, ids, mask, pv, position_ids=None)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pv,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
    feats = torch.stack(list(feats))
    gen, margin = greedy(model, ids, mask, pv)

    # unbatched: prompt 0 with image 0, no padding
    real0 = mask[0].bool()
    s_ids, s_mask, s_pv = ids[:1, real0], mask[:1, real0], pv[:1]
    s_logits = forward_logits(model, s_ids, s_mask, s_pv)
    s_gen, s_margin = greedy(model, s_ids, s_mask, s_pv)

    check_reference(logits, gen, s_logits, s_gen, mask, real0)

    arrays = {
        "images": images,
        "input_ids": ids.numpy().astype(np.int64),
        "attention_mask": mask.numpy().astype(np.int64),
        "position_ids": pos.numpy().astype(np.int64),
        "pixel_values": pv.numpy().astype(np.float32),
        "logits": logits.numpy().astype(np.float32),
        "logits_default_positions": logits_default.numpy().astype(np.float32),
        "image_features": feats.numpy().astype(np.float32),
        "generated_ids": gen.numpy().astype(np.int64),
        "single_input_ids": s_ids.numpy().astype(np.int64),
        "single_attention_mask": s_mask.numpy().astype(np.int64),
        "single_pixel_values": s_pv.numpy().astype(np.float32),
        "single_logits": s_logits.numpy().astype(np.float32),
        "single_generated_ids": s_gen.numpy().astype(np.int64),
    }
    meta = {
        "prompts": json.dumps(list(prompts)),
        "greedy_min_top2_margin": f"{min(margin, s_margin):.6f}",
        "max_new_tokens": str(MAX_NEW_TOKENS),
        "generated_ids": "new tokens only; greedy, eos_token_id=None (never stops, never suppressed)",
        "logits": "position_ids = cumsum(attention_mask)-1, pads 0 (as generate); pad rows are not meaningful",
        "logits_default_positions": "HF forward without position_ids (arange over the padded length)",
    }
    assert min(margin, s_margin) > MIN_GREEDY_MARGIN, f"greedy margin too small: {min(margin, s_margin)}"
    return arrays, meta


def save_outputs(path: pathlib.Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    # one metadata key holding sorted JSON: safetensors writes a multi-key metadata map in hash order, which
    # would make the files differ byte-wise from run to run
    info = json.dumps(meta, sort_keys=True, indent=1)
    np_save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata={"info": info})


def load_model(path, **kw):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32, **kw
    )
    return model.eval()


def build_model(config):
    from transformers import LlavaForConditionalGeneration

    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


# ----------------------------------------------------------------------------------------------------------------
# legacy layout


def to_legacy_names(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """transformers 5 names -> published llava-hf (transformers 4.x) names.

    The inverse of transformers 5's `conversion_mapping["llava"]`:
      lm_head                   -> language_model.lm_head     (omitted when tied, as 4.x save_pretrained did)
      model.language_model      -> language_model.model
      model.vision_tower        -> vision_tower.vision_model   (CLIPVisionModel's own PrefixChange("vision_model"))
      model.multi_modal_projector -> multi_modal_projector
    """
    out = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            if tied:
                continue
            nk = "language_model.lm_head.weight"
        elif k.startswith("model.language_model."):
            nk = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower."):
            nk = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model.multi_modal_projector."):
            nk = "multi_modal_projector." + k[len("model.multi_modal_projector."):]
        else:
            raise KeyError(f"unexpected key {k}")
        out[nk] = v.detach().clone().contiguous()
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: pathlib.Path, num_shards: int = 2) -> list[str]:
    names = sorted(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    target = total / num_shards
    shards, cur, acc = [], [], 0
    for n, s in zip(names, sizes):
        if cur and acc + s / 2 > target * (len(shards) + 1) and len(shards) < num_shards - 1:
            shards.append(cur)
            cur = []
        cur.append(n)
        acc += s
    shards.append(cur)
    assert len(shards) == num_shards, len(shards)
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        torch_save_file({n: tensors[n] for n in shard}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


# ----------------------------------------------------------------------------------------------------------------
# PEFT


LORA_LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_VISION_TARGETS = r".*(vision_tower.*\.(q_proj|k_proj|v_proj|out_proj)|language_model.*\.(q_proj|v_proj))"
LORA_VISION_RANK_PATTERN = {"language_model.layers.1.self_attn.v_proj": 3}
LORA_MLP_TARGETS = r".*(multi_modal_projector\.linear_[12]|language_model.*\.(gate_proj|up_proj|down_proj))"
# The mixed-batch requests: (adapter directory name or None for the base model, prompt). Every adapter,
# a base row, one adapter on two rows, prompts of different lengths; request i uses image i.
MIXED_REQUESTS = (
    ("peft_lora", "user : <image> what colour is the circle ? assistant :"),
    (None, "user : <image> how many shapes ? assistant :"),
    ("peft_lora_vision", "user : <image> where is the red square in this picture ? give the bounding box . assistant :"),
    ("peft_lora_mlp", "user : <image> count the objects in the scene . assistant :"),
    ("peft_lora", "user : <image> which shape is blue ? answer with one word . assistant :"),
)


def init_lora(peft_model, seed: int, std: float = 0.2) -> None:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.from_numpy((std * rng.standard_normal(tuple(p.shape))).astype(np.float32)))


def make_adapter(base_dir, out_dir, lora_config, seed, inputs) -> tuple[dict[str, np.ndarray], dict]:
    from peft import get_peft_model

    base = load_model(base_dir)
    # PEFT copies model.name_or_path (here the absolute load path) into adapter_config.json; keep it portable
    base.name_or_path = lora_config.base_model_name_or_path
    base.config._name_or_path = lora_config.base_model_name_or_path  # (the adapter README's base_model)
    peft_model = get_peft_model(base, lora_config).eval()
    init_lora(peft_model, seed)
    ids, mask, pv = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    logits = forward_logits(peft_model, ids, mask, pv)
    gen, margin = greedy(peft_model, ids, mask, pv)
    peft_model.save_pretrained(str(out_dir))
    # the adapter must change the outputs
    base_logits = forward_logits(load_model(base_dir), ids, mask, pv)
    change = (logits - base_logits)[mask.bool()].abs().max().item()
    assert change > 0.1, f"adapter barely changes the logits ({change})"
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    merged_logits = forward_logits(merged, ids, mask, pv)
    d = (merged_logits - logits)[mask.bool()].abs().max().item()
    assert d < 1e-3, f"merged vs adapted logits differ by {d}"
    # round trip through PEFT's loader
    check = verify_adapter_logits(out_dir, base_dir, inputs)
    d2 = (check - logits)[mask.bool()].abs().max().item()
    assert d2 == 0.0 or d2 < 1e-6, f"reloaded adapter logits differ by {d2}"
    arrays = {
        "input_ids": ids.numpy().astype(np.int64),
        "attention_mask": mask.numpy().astype(np.int64),
        "position_ids": mask_position_ids(mask).numpy().astype(np.int64),
        "pixel_values": pv.numpy().astype(np.float32),
        "logits": logits.numpy().astype(np.float32),
        "merged_logits": merged_logits.numpy().astype(np.float32),
        "generated_ids": gen.numpy().astype(np.int64),
    }
    meta = {
        "base": pathlib.Path(base_dir).name,
        "logits": "adapted model, position_ids = cumsum(attention_mask)-1 (pads 0); pad rows not meaningful",
        "merged_logits": "after merge_and_unload()",
        "generated_ids": "adapted model, new tokens only, greedy, eos_token_id=None",
        "greedy_min_top2_margin": f"{margin:.6f}",
        "max_abs_merged_minus_adapted": f"{d:.3e}",
    }
    assert margin > MIN_GREEDY_MARGIN, margin
    return arrays, meta


def verify_adapter_logits(adapter_dir, base_dir, inputs) -> torch.Tensor:
    from peft import PeftModel

    base = load_model(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    pos = inputs.get("position_ids")
    if pos is None:
        pos = mask_position_ids(inputs["attention_mask"])
    return forward_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], pos)


def verify_adapter_cli(adapter_dir: str, base_dir: str, expect: str, inputs_file: str | None) -> int:
    base_path = pathlib.Path(base_dir)
    inputs_file = inputs_file or str(base_path.parent / f"{base_path.name}.outputs.safetensors")
    stored = np_load_file(inputs_file)
    exp = np_load_file(expect)
    for k in ("input_ids", "attention_mask", "pixel_values", "position_ids"):
        if k in exp:  # the expect file may carry its own inputs
            stored[k] = exp[k]
    inputs = {k: torch.from_numpy(stored[k]) for k in ("input_ids", "attention_mask", "pixel_values", "position_ids")
              if k in stored}
    got = verify_adapter_logits(adapter_dir, base_dir, inputs).numpy()
    want = exp["logits"].astype(np.float32)
    if got.shape != want.shape:
        print(f"shape mismatch: PEFT {got.shape} vs expect {want.shape}")
        return 1
    real = inputs["attention_mask"].numpy().astype(bool)
    err = np.abs(got - want)[real].max()
    rel = float(err / max(np.abs(want[real]).max(), 1e-12))
    print(f"adapter {adapter_dir} on {base_dir}: inputs {inputs_file}; max abs err {err:.3e}, "
          f"max relative error {rel:.3e} (tolerance {VERIFY_TOL:g})")
    if rel > VERIFY_TOL:
        print("FAIL")
        return 1
    print("OK")
    return 0


def record_saved_adapter(out: pathlib.Path, name: str) -> None:
    """PEFT's adapted and merged logits for <out>/<name>, an adapter saved by valora-jax, on llava_mha's inputs."""
    from peft import PeftModel

    set_determinism(0)
    adapter_dir, base_dir = out / name, out / "llava_mha"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(f"{adapter_dir} holds no adapter: write it first (python tests/adapters/{name}.py)")
    stored = np_load_file(str(out / "llava_mha.outputs.safetensors"))
    inputs = {k: torch.from_numpy(stored[k]) for k in ("input_ids", "attention_mask", "pixel_values", "position_ids")}
    ids, mask, pv, pos = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["position_ids"]
    peft_model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).eval()
    logits = forward_logits(peft_model, ids, mask, pv, pos)
    change = (logits - forward_logits(load_model(base_dir), ids, mask, pv, pos))[mask.bool()].abs().max().item()
    assert change > 0.1, f"adapter barely changes the logits ({change})"
    merged_logits = forward_logits(peft_model.merge_and_unload().eval(), ids, mask, pv, pos)
    d = (merged_logits - logits)[mask.bool()].abs().max().item()
    assert d < 1e-3, f"merged vs adapted logits differ by {d}"
    arrays = {k: v.numpy() for k, v in inputs.items()}
    arrays.update(logits=logits.numpy().astype(np.float32), merged_logits=merged_logits.numpy().astype(np.float32))
    meta = {
        "adapter": f"{name}/, saved by valora-jax save_adapter, loaded with PeftModel.from_pretrained",
        "base": "llava_mha",
        "logits": "PEFT's adapted model, position_ids = cumsum(attention_mask)-1 (pads 0); pad rows not meaningful",
        "merged_logits": "after merge_and_unload()",
        "max_abs_merged_minus_adapted": f"{d:.3e}",
    }
    save_outputs(out / f"{name}.outputs.safetensors", arrays, meta)
    print(f"wrote {out / f'{name}.outputs.safetensors'} (PEFT's logits for {adapter_dir})")


# ----------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL


QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
# Prompt 0 (shorter, left-padded in the batch) has one image, prompt 1 two images of other sizes; the
# single (unbatched) example is prompt 0 with its image. Sizes in pixels (h, w), multiples of patch * merge.
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PROMPTS = (
    f"user : {QWEN_IMAGE} what colour is the circle ? assistant :",
    f"user : {QWEN_IMAGE} {QWEN_IMAGE} how many red shapes are there in this image ? assistant :",
)
QWEN_IMAGE_SIZES = ((16, 24), (24, 24), (32, 16))


def qwen_ids() -> dict[str, int]:
    from valora_jax.models.tiny_processor import tiny_vocab

    base = len(tiny_vocab())
    return {tok: base + i for i, tok in enumerate(QWEN_SPECIALS)}


def qwen_tokenizer():
    """The tiny word-level tokenizer with Qwen's vision tokens appended (ids after the tiny vocabulary)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from valora_jax.models.tiny_processor import tiny_vocab

    vocab = {**tiny_vocab(), **qwen_ids()}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>"}, padding_side="left",
    )
    ids = tokenizer.convert_tokens_to_ids(list(QWEN_SPECIALS))
    assert ids == [qwen_ids()[t] for t in QWEN_SPECIALS], ids
    return tokenizer


def qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL, merge_size=QWEN_MERGE,
                                    min_pixels=8 * 8, max_pixels=64 * 64)


def qwen_config(version: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from valora_jax.models.tiny_processor import BOS_ID, EOS_ID, PAD_ID

    ids = qwen_ids()
    text = dict(vocab_size=tiny_vocab_size() + len(QWEN_SPECIALS), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                eos_token_id=EOS_ID,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, hidden_act="quick_gelu",
                      patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
        return Qwen2VLConfig(vision_config=vision, text_config={**text, "tie_word_embeddings": True},
                             tie_word_embeddings=True, **common)
    # window 16 px = 2x2 merged tokens: images of 2x3, 3x3 and 4x2 merged tokens give ragged edge windows
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, hidden_act="silu",
                  patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                  window_size=16, out_hidden_size=64, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(vision_config=vision, text_config={**text, "tie_word_embeddings": False},
                            tie_word_embeddings=False, **common)


def qwen_model_class(version: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}[version]


def qwen_inputs(tokenizer, image_processor, prompts, images, image_token_id) -> dict[str, torch.Tensor]:
    """What Qwen2VLProcessor returns for images: `<|image_pad|>` expanded per image, flattened patches."""
    vision = image_processor(images=list(images), return_tensors="pt")
    counts = iter((vision["image_grid_thw"].prod(-1) // QWEN_MERGE**2).tolist())
    texts = []
    for prompt in prompts:
        parts = prompt.split("<|image_pad|>")
        texts.append(parts[0] + "".join("<|image_pad|>" * next(counts) + p for p in parts[1:]))
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    ids = tokens["input_ids"]
    assert not (ids == tokenizer.unk_token_id).any(), "a prompt word is outside the tiny vocabulary"
    return {"input_ids": ids, "attention_mask": tokens["attention_mask"], "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"], "mm_token_type_ids": (ids == image_token_id).int()}


@torch.no_grad()
def qwen_greedy(model, inputs) -> tuple[torch.Tensor, float]:
    """`generate` greedy (KV cache, M-RoPE decode positions from the prompt's rope delta), checked against a
    naive argmax loop (full forward each step, positions recomputed from the whole sequence)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None,
                          pad_token_id=0, bos_token_id=1)
    prompt_len = inputs["input_ids"].shape[1]
    model.generation_config.eos_token_id = None  # else generate merges the config's eos into `gc`
    new = model.generate(**inputs, generation_config=gc)[:, prompt_len:]
    assert new.shape[1] == MAX_NEW_TOKENS, new.shape
    # a generated vision token would be taken for an image placeholder by the naive loop's full forward
    assert not np.isin(new.numpy(), list(qwen_ids().values())).any(), f"vision token generated (pick a seed): {new}"
    step, margin, naive = dict(inputs), float("inf"), []
    for _ in range(MAX_NEW_TOKENS):
        last = model(**step).logits.float()[:, -1]
        top2 = torch.topk(last, 2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        nxt = last.argmax(-1, keepdim=True)
        naive.append(nxt)
        step["input_ids"] = torch.cat([step["input_ids"], nxt], dim=1)
        step["attention_mask"] = torch.cat([step["attention_mask"], torch.ones_like(nxt)], dim=1)
        step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(nxt).int()], dim=1)
    naive = torch.cat(naive, dim=1)
    if not torch.equal(naive, new):
        raise AssertionError(f"generate != naive greedy loop:\n{new}\n{naive}")
    return new, margin


def qwen_reference(model, inputs) -> tuple[dict[str, np.ndarray], dict]:
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        position_ids, deltas = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
        feats = torch.cat(list(model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
    gen, margin = qwen_greedy(model, inputs)

    # unbatched: prompt 0 with its image, no padding
    mask = inputs["attention_mask"]
    real0 = mask[0].bool()
    n0 = int(inputs["image_grid_thw"][0].prod())
    single = {"input_ids": inputs["input_ids"][:1, real0], "attention_mask": mask[:1, real0],
              "pixel_values": inputs["pixel_values"][:n0], "image_grid_thw": inputs["image_grid_thw"][:1],
              "mm_token_type_ids": inputs["mm_token_type_ids"][:1, real0]}
    with torch.no_grad():
        s_logits = model(**single).logits.float()
    s_gen, s_margin = qwen_greedy(model, single)
    check_reference(logits, gen, s_logits, s_gen, mask, real0)
    assert min(margin, s_margin) > MIN_GREEDY_MARGIN, f"greedy margin too small: {min(margin, s_margin)}"
    as_np = lambda t, dt: t.numpy().astype(dt)  # noqa: E731
    arrays = {
        "input_ids": as_np(inputs["input_ids"], np.int64),
        "attention_mask": as_np(mask, np.int64),
        "pixel_values": as_np(inputs["pixel_values"], np.float32),
        "image_grid_thw": as_np(inputs["image_grid_thw"], np.int64),
        "position_ids": as_np(position_ids, np.int64),
        "rope_deltas": as_np(deltas.reshape(-1), np.int64),
        "logits": as_np(logits, np.float32),
        "image_features": as_np(feats, np.float32),
        "generated_ids": as_np(gen, np.int64),
        "single_input_ids": as_np(single["input_ids"], np.int64),
        "single_logits": as_np(s_logits, np.float32),
        "single_generated_ids": as_np(s_gen, np.int64),
    }
    meta = {
        "prompts": json.dumps(list(QWEN_PROMPTS)),
        "image_sizes": json.dumps(QWEN_IMAGE_SIZES),
        "greedy_min_top2_margin": f"{min(margin, s_margin):.6f}",
        "max_new_tokens": str(MAX_NEW_TOKENS),
        "logits": "HF forward with mm_token_type_ids (M-RoPE positions from get_rope_index over the mask); "
                  "pad rows are not meaningful",
        "generated_ids": "new tokens only; greedy, eos_token_id=None (never stops, never suppressed)",
    }
    return arrays, meta


def to_v5_names(state_dict: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The names transformers 5 keeps in memory (`model.visual.*`, `model.language_model.*`, `lm_head.*`)."""
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}


def build_qwen(out: pathlib.Path, version: str, seed: int) -> None:
    """`qwen2_vl`: tied embeddings, published layout (`save_pretrained`: `visual.*`, `model.*`, no lm_head);
    `qwen2_5_vl`: untied, transformers 5's names (`model.visual.*`, `model.language_model.*`, `lm_head.*`)."""
    set_determinism(0)
    mdir = out / version
    config = qwen_config(version)
    config._attn_implementation = "eager"
    model_class = qwen_model_class(version)
    model = model_class(config).to(torch.float32).eval()
    init_weights(model, seed=seed)
    tied = config.tie_word_embeddings
    if version == "qwen2_vl":
        model.save_pretrained(str(mdir))
    else:
        mdir.mkdir(parents=True)
        config.save_pretrained(str(mdir))
        torch_save_file(to_v5_names(model.state_dict(), tied), str(mdir / "model.safetensors"),
                        metadata={"format": "pt"})
    tokenizer, image_processor = qwen_tokenizer(), qwen_image_processor()
    tokenizer.save_pretrained(str(mdir))
    image_processor.save_pretrained(str(mdir))

    loaded = model_class.from_pretrained(str(mdir), attn_implementation="eager", dtype=torch.float32).eval()
    sd_new, sd_old = loaded.state_dict(), model.state_dict()
    assert sd_new.keys() == sd_old.keys()
    for k in sd_old:
        assert torch.equal(sd_new[k], sd_old[k]), f"{k} differs after reload"

    rng = np.random.default_rng(seed + 100)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in QWEN_IMAGE_SIZES]
    inputs = qwen_inputs(tokenizer, image_processor, QWEN_PROMPTS, images, config.image_token_id)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum(), "prompt 0 must be padded"
    grids = inputs["image_grid_thw"].tolist()
    assert grids == [[1, h // QWEN_PATCH, w // QWEN_PATCH] for h, w in QWEN_IMAGE_SIZES], grids
    arrays, meta = qwen_reference(loaded, inputs)
    arrays.update({f"image_{i}": im for i, im in enumerate(images)})
    meta["model"] = version
    meta["layout"] = "published (save_pretrained)" if version == "qwen2_vl" else "transformers 5 in-memory names"
    save_outputs(out / f"{version}.outputs.safetensors", arrays, meta)
    return mdir, inputs


QWEN_LORA_TARGETS = (r".*(visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)"
                     r"|language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj))")


def build_qwen_adapter(out: pathlib.Path, base_dir: pathlib.Path, inputs, seed: int) -> None:
    """PEFT LoRA on the vision blocks (fused qkv, proj, gated MLP) and the decoder of `base_dir` (Qwen2.5-VL)."""
    from peft import LoraConfig, get_peft_model

    set_determinism(0)
    model_class = qwen_model_class("qwen2_5_vl")
    load = lambda: model_class.from_pretrained(str(base_dir), attn_implementation="eager",  # noqa: E731
                                               dtype=torch.float32).eval()
    base = load()
    base.name_or_path = base.config._name_or_path = base_dir.name
    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none", target_modules=QWEN_LORA_TARGETS,
                      base_model_name_or_path=base_dir.name)
    peft_model = get_peft_model(base, lora).eval()
    init_lora(peft_model, seed)
    adapted = {name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert any(".visual.blocks." in n for n in adapted) and any(".language_model." in n for n in adapted), adapted
    with torch.no_grad():
        logits = peft_model(**inputs).logits.float()
        base_logits = load()(**inputs).logits.float()
    mask = inputs["attention_mask"].bool()
    change = (logits - base_logits)[mask].abs().max().item()
    assert change > 0.1, f"adapter barely changes the logits ({change})"
    gen, margin = qwen_greedy(peft_model, inputs)
    assert margin > MIN_GREEDY_MARGIN, margin
    adir = out / "peft_lora_qwen2_5_vl"
    peft_model.save_pretrained(str(adir))
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits.float()
    d = (merged_logits - logits)[mask].abs().max().item()
    assert d < 1e-3, f"merged vs adapted logits differ by {d}"
    arrays = {"logits": logits.numpy().astype(np.float32), "merged_logits": merged_logits.numpy().astype(np.float32),
              "generated_ids": gen.numpy().astype(np.int64)}
    meta = {"base": base_dir.name, "inputs": f"{base_dir.name}.outputs.safetensors",
            "logits": "adapted model, M-RoPE positions; pad rows not meaningful",
            "merged_logits": "after merge_and_unload()",
            "generated_ids": "adapted model, new tokens only, greedy, eos_token_id=None",
            "greedy_min_top2_margin": f"{margin:.6f}", "max_abs_merged_minus_adapted": f"{d:.3e}"}
    save_outputs(out / "peft_lora_qwen2_5_vl.outputs.safetensors", arrays, meta)



# ----------------------------------------------------------------------------------------------------------------
# main


def build_mha(out: pathlib.Path):
    from valora_jax.models.tiny_processor import tiny_processor

    set_determinism(0)
    config = mha_config()
    model = build_model(config)
    init_weights(model, seed=1)
    processor = tiny_processor(32, 8, "default")
    mdir = out / "llava_mha"
    model.save_pretrained(str(mdir))
    processor.save_pretrained(str(mdir))

    images = make_images(seed=2, size=32)
    inputs = process(processor, PROMPTS, images)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum(), "prompt 0 must be padded"
    # at the model resolution the processor's resize/crop is the identity: pixel_values = normalize(images/255)
    mean = np.array(processor.image_processor.image_mean)
    std = np.array(processor.image_processor.image_std)
    ref = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert np.abs(inputs["pixel_values"].numpy() - ref).max() < 1e-5

    # reload from disk (what the files say is what the outputs come from)
    model = load_model(mdir)
    arrays, meta = reference_outputs(model, processor, PROMPTS, images, inputs)
    meta["model"] = "llava_mha"
    save_outputs(out / "llava_mha.outputs.safetensors", arrays, meta)
    return mdir, inputs


def build_legacy(out: pathlib.Path):
    from transformers import LlavaConfig

    from valora_jax.models.tiny_processor import tiny_processor

    set_determinism(0)
    ldir = out / "llava_gqa_legacy"
    ldir.mkdir(parents=True)
    cfg_json = legacy_config_json()
    (ldir / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    config = LlavaConfig.from_pretrained(str(ldir))
    tc = config.text_config
    assert tc.num_key_value_heads == 2 and config.tie_word_embeddings and tc.tie_word_embeddings
    assert tc.rope_parameters["rope_type"] == "llama3" and tc.rope_parameters["rope_theta"] == 500000.0, tc.rope_parameters
    assert config.vision_feature_select_strategy == "full" and config.vision_feature_layer == -1
    model = build_model(config)
    init_weights(model, seed=3)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr(), "not tied"

    tensors = to_legacy_names(model.state_dict(), tied=True)
    shard_files = save_sharded(tensors, ldir, num_shards=2)

    processor = tiny_processor(LEGACY_IMAGE_SIZE, LEGACY_PATCH_SIZE, "full")  # used for the prompts only
    images = make_images(seed=4, size=LEGACY_IMAGE_SIZE)
    inputs = process(processor, PROMPTS, images)
    n_img = int((inputs["input_ids"][0] == config.image_token_id).sum())
    assert n_img == cfg_json["image_seq_length"], (n_img, cfg_json["image_seq_length"])
    in_memory = forward_logits(model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])

    # transformers 5 must load the legacy dir (names converted by its conversion mapping, lm_head tied)
    loaded = load_model(ldir)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    sd_new, sd_old = loaded.state_dict(), model.state_dict()
    assert sd_new.keys() == sd_old.keys()
    for k in sd_old:
        assert torch.equal(sd_new[k], sd_old[k]), f"{k} differs after legacy reload"
    reloaded = forward_logits(loaded, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    assert torch.equal(reloaded, in_memory), (reloaded - in_memory).abs().max()

    arrays, meta = reference_outputs(loaded, None, PROMPTS, images, inputs)
    meta["model"] = "llava_gqa_legacy"
    meta["processor"] = (f"none in the model dir; inputs made with tiny_processor({LEGACY_IMAGE_SIZE}, "
                         f"{LEGACY_PATCH_SIZE}, 'full')")
    save_outputs(out / "llava_gqa_legacy.outputs.safetensors", arrays, meta)
    return ldir, shard_files


# PEFT LoRA adapters on llava_mha: (name, r, lora_alpha, target_modules, rank_pattern, seed of A and B).
LLAVA_ADAPTERS = (
    ("peft_lora", 4, 8, LORA_LM_TARGETS, None, 5),
    ("peft_lora_vision", 2, 4, LORA_VISION_TARGETS, LORA_VISION_RANK_PATTERN, 6),
    ("peft_lora_mlp", 8, 8, LORA_MLP_TARGETS, None, 7),
)


def build_adapters(out: pathlib.Path, mha_dir: pathlib.Path, inputs):
    from peft import LoraConfig

    for name, rank, alpha, targets, rank_pattern, seed in LLAVA_ADAPTERS:
        set_determinism(0)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                            base_model_name_or_path="llava_mha",
                            **({"rank_pattern": dict(rank_pattern)} if rank_pattern else {}))
        arrays, meta = make_adapter(mha_dir, out / name, config, seed=seed, inputs=inputs)
        save_outputs(out / f"{name}.outputs.safetensors", arrays, meta)


def build_mixed(out: pathlib.Path, mha_dir: pathlib.Path) -> None:
    """What PEFT gives each request of a mixed-adapter batch when it runs alone (no padding, its own image)."""
    from peft import PeftModel

    from valora_jax.models.tiny_processor import tiny_processor

    set_determinism(0)
    processor = tiny_processor(32, 8, "default")
    images = np.random.default_rng(10).integers(0, 256, size=(len(MIXED_REQUESTS), 32, 32, 3), dtype=np.uint8)
    models = {None: load_model(mha_dir)}
    arrays, margin = {"images": images}, float("inf")
    for i, (adapter, prompt) in enumerate(MIXED_REQUESTS):
        if adapter not in models:
            models[adapter] = PeftModel.from_pretrained(load_model(mha_dir), str(out / adapter)).eval()
        inputs = process(processor, [prompt], images[i:i + 1])
        ids, mask, pv = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
        gen, row_margin = greedy(models[adapter], ids, mask, pv)
        margin = min(margin, row_margin)
        arrays[f"input_ids_{i}"] = ids.numpy().astype(np.int64)
        arrays[f"pixel_values_{i}"] = pv.numpy().astype(np.float32)
        arrays[f"logits_{i}"] = forward_logits(models[adapter], ids, mask, pv).numpy().astype(np.float32)
        arrays[f"generated_ids_{i}"] = gen.numpy().astype(np.int64)
    lengths = [arrays[f"input_ids_{i}"].shape[1] for i in range(len(MIXED_REQUESTS))]
    assert len(set(lengths)) == len(lengths), f"prompt lengths must differ: {lengths}"
    assert margin > MIN_GREEDY_MARGIN, margin
    meta = {
        "base": "llava_mha",
        "adapters": json.dumps([adapter for adapter, _ in MIXED_REQUESTS]),
        "prompts": json.dumps([prompt for _, prompt in MIXED_REQUESTS]),
        "logits_i": "request i alone (batch 1, no padding) with its adapter (PeftModel) or the base model",
        "generated_ids_i": "request i alone, new tokens only, greedy, eos_token_id=None",
        "greedy_min_top2_margin": f"{margin:.6f}",
    }
    save_outputs(out / "mixed_batch.outputs.safetensors", arrays, meta)


def summary(out: pathlib.Path) -> None:
    from safetensors import safe_open

    total = 0
    print(f"\n== {out} ==")
    for p in sorted(out.rglob("*")):
        if not p.is_file():
            continue
        size = p.stat().st_size
        total += size
        print(f"{size:>10,d}  {p.relative_to(out)}")
        if p.suffix == ".safetensors":
            with safe_open(str(p), "np") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    if p.name.endswith(".outputs.safetensors") or "adapter" in p.name:
                        print(f"{'':12}{k}: {sl.get_dtype()} {list(sl.get_shape())}")
    print(f"{total:>10,d}  total")


# What each family writes under --out (a directory and its `.outputs.safetensors`).
FAMILY_FILES = {
    "llava": ("llava_mha", "llava_gqa_legacy", "peft_lora", "peft_lora_vision", "peft_lora_mlp", "mixed_batch"),
    "qwen": ("qwen2_vl", "qwen2_5_vl", "peft_lora_qwen2_5_vl"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "tests" / "golden"))
    ap.add_argument("--verify-adapter", metavar="DIR", help="adapter dir (PEFT layout) to check against --expect")
    ap.add_argument("--base", metavar="DIR", help="base model dir for --verify-adapter")
    ap.add_argument("--expect", metavar="FILE", help="safetensors with `logits` (and optionally the inputs)")
    ap.add_argument("--inputs", metavar="FILE", help="safetensors with the inputs; default <base>.outputs.safetensors")
    ap.add_argument("--saved-adapter", metavar="NAME",
                    help="only record PEFT's logits for <out>/NAME (an adapter saved by valora-jax) in "
                         "<out>/NAME.outputs.safetensors")
    ap.add_argument("--only", action="append", choices=sorted(FAMILY_FILES),
                    help="regenerate only this family's files (repeatable; default: all)")
    args = ap.parse_args(argv)

    set_determinism(0)
    if args.verify_adapter:
        if not (args.base and args.expect):
            ap.error("--verify-adapter needs --base and --expect")
        return verify_adapter_cli(args.verify_adapter, args.base, args.expect, args.inputs)
    if args.saved_adapter:
        record_saved_adapter(pathlib.Path(args.out), args.saved_adapter)
        return 0

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    keep = readme.read_text() if readme.exists() else None
    families = args.only or list(FAMILY_FILES)
    for name in (n for family in families for n in FAMILY_FILES[family]):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / f"{name}.outputs.safetensors").unlink(missing_ok=True)

    if "llava" in families:
        mha_dir, inputs = build_mha(out)
        build_legacy(out)
        build_adapters(out, mha_dir, inputs)
        build_mixed(out, mha_dir)
    if "qwen" in families:
        build_qwen(out, "qwen2_vl", seed=11)
        qwen25_dir, qwen25_inputs = build_qwen(out, "qwen2_5_vl", seed=14)
        build_qwen_adapter(out, qwen25_dir, qwen25_inputs, seed=13)
    if keep is not None:
        readme.write_text(keep)
    summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
