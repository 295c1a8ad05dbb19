"""Qwen2-VL and Qwen2.5-VL configurations: frozen dataclasses, named presets, HF `config.json` parsing.

One config class serves both versions; `version` selects what differs in the vision encoder:
Qwen2-VL has LayerNorm blocks with a quick-GELU MLP (`fc1`/`fc2`) and full attention in every block;
Qwen2.5-VL has RMSNorm blocks with a gated SiLU MLP with biases (`gate_proj`/`up_proj`/`down_proj`) and
window attention except in `fullatt_block_indexes`. The decoder is a Llama `TextConfig` with q/k/v
biases (not o_proj), rotated by M-RoPE (`mrope_section`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from valora_jax.config import RopeConfig, TextConfig, _pick

VERSIONS = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    version: str = "qwen2_5_vl"
    depth: int = 32
    hidden_size: int = 1280  # the encoder width (Qwen2-VL's `embed_dim`)
    intermediate_size: int = 3420  # Qwen2-VL: embed_dim * mlp_ratio
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584  # the merger's output: the decoder width
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    window_size: int = 112  # pixels (Qwen2.5-VL)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # Qwen2.5-VL; every block for Qwen2-VL

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"unknown Qwen-VL version {self.version!r}; supported: {VERSIONS}")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a "
                             "multiple of 4 (the 2-D rotary splits each head into h and w halves)")
        if self.windowed and self.window_size % (self.spatial_merge_size * self.patch_size):
            raise ValueError(f"window_size {self.window_size} must be a multiple of spatial_merge_size * patch_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values of one flattened patch: (channels, temporal, patch, patch) as the image processor lays it out."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        return self.version == "qwen2_5_vl"

    @property
    def merger_window(self) -> int:
        """Window side in merged tokens."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def full_attention(self, block: int) -> bool:
        return not self.windowed or block in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    vision: QwenVisionConfig = QwenVisionConfig()
    text: TextConfig = TextConfig()
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645

    def __post_init__(self):
        if sum(self.mrope_section) != self.text.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.text.head_dim // 2}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                             f"{self.text.hidden_size}")

    @property
    def version(self) -> str:
        return self.vision.version

    @property
    def architecture(self) -> str:
        return {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[self.version]


def _qwen_text(**kw) -> TextConfig:
    base = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, rope=RopeConfig(theta=1000000.0), qkv_bias=True,
                vocab_size=151936)
    return TextConfig(**{**base, **kw})


def _qwen2_vision(out: int) -> QwenVisionConfig:
    return QwenVisionConfig(version="qwen2_vl", depth=32, hidden_size=1280, intermediate_size=5120, num_heads=16,
                            out_hidden_size=out, hidden_act="quick_gelu")


def _qwen25_vision(out: int) -> QwenVisionConfig:
    return QwenVisionConfig(version="qwen2_5_vl", out_hidden_size=out)


# Shapes of the published checkpoints (Qwen/Qwen2-VL-*-Instruct, Qwen/Qwen2.5-VL-*-Instruct config.json).
PRESETS = {
    "qwen2-vl-2b": lambda: QwenVLConfig(
        vision=_qwen2_vision(1536),
        text=_qwen_text(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2),
        tie_word_embeddings=True,
    ),
    "qwen2-vl-7b": lambda: QwenVLConfig(
        vision=_qwen2_vision(3584),
        text=_qwen_text(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4),
    ),
    "qwen2.5-vl-3b": lambda: QwenVLConfig(
        vision=_qwen25_vision(2048),
        text=_qwen_text(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, max_position_embeddings=128000),
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": lambda: QwenVLConfig(
        vision=_qwen25_vision(3584),
        text=_qwen_text(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
    ),
}


def _vision_from_hf(version: str, v: dict[str, Any]) -> QwenVisionConfig:
    rope = v.get("rope_parameters") or {}
    common = dict(version=version, depth=v["depth"], num_heads=v["num_heads"], in_channels=v.get("in_channels", 3),
                  patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                  spatial_merge_size=v["spatial_merge_size"], hidden_act=v["hidden_act"],
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if version == "qwen2_vl":
        return QwenVisionConfig(**common, hidden_size=v["embed_dim"],
                                intermediate_size=int(v["embed_dim"] * v["mlp_ratio"]),
                                out_hidden_size=v["hidden_size"])
    return QwenVisionConfig(**common, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                            out_hidden_size=v["out_hidden_size"], window_size=v["window_size"],
                            fullatt_block_indexes=tuple(v["fullatt_block_indexes"]))


def config_from_hf(hf: dict[str, Any]) -> QwenVLConfig:
    """Parse a transformers-normalised Qwen2-VL / Qwen2.5-VL config dict (`AutoConfig(...).to_dict()`)."""
    version = hf.get("model_type")
    if version not in VERSIONS:
        raise ValueError(f"unsupported architecture: model_type={version!r}; supported: {VERSIONS}")
    text = hf["text_config"]
    if text.get("use_sliding_window"):
        raise ValueError("Qwen-VL text sliding-window attention (use_sliding_window) is not supported")
    rope = dict(text.get("rope_parameters") or {})
    if rope.get("rope_type", "default") not in ("default", "mrope"):
        raise ValueError(f"unsupported Qwen-VL rope_type {rope.get('rope_type')!r}; supported: default (mrope)")
    fields = {**_pick(TextConfig, text), "rope": RopeConfig(theta=float(rope.get("rope_theta", 1000000.0))),
              "attention_bias": False, "qkv_bias": True, "mlp_bias": False}
    return QwenVLConfig(
        vision=_vision_from_hf(version, hf["vision_config"]),
        text=TextConfig(**fields),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        image_token_id=hf.get("image_token_id", 151655),
        video_token_id=hf.get("video_token_id", 151656),
        vision_start_token_id=hf.get("vision_start_token_id", 151652),
        vision_end_token_id=hf.get("vision_end_token_id", 151653),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings", False)),
        pad_token_id=text.get("pad_token_id", hf.get("pad_token_id")),
        bos_token_id=text.get("bos_token_id", hf.get("bos_token_id")),
        eos_token_id=_first(text.get("eos_token_id", hf.get("eos_token_id"))),
    )


def _first(token_id: int | list[int] | None) -> int | None:
    """One EOS id (generation stops at one): the first of a list."""
    if isinstance(token_id, list):
        return token_id[0] if token_id else None
    return token_id
