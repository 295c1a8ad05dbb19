"""Frozen configuration dataclasses for the LLaVA family (and the Llama decoder other families reuse), with
named presets and HF `config.json` parsing.

The field names follow transformers' LlavaConfig / CLIPVisionConfig / LlamaConfig where they exist,
so a reader can compare with an HF checkpoint's `config.json` line by line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or the older `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower (ViT with class token, pre-LayerNorm, quick-GELU MLP)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope: RopeConfig = RopeConfig()
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    qkv_bias: bool | None = None  # q/k/v biases apart from o_proj's (Qwen2); None: attention_bias

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.qkv_bias is None:
            object.__setattr__(self, "qkv_bias", self.attention_bias)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """LLaVA-1.5: vision tower -> 2-layer projector -> Llama decoder, image features at `<image>` tokens."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 32000
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or 'full', got {self.vision_feature_select_strategy!r}"
            )
        for layer in self.feature_layers:
            if not -self.vision.num_hidden_layers - 1 <= layer <= self.vision.num_hidden_layers:
                raise ValueError(f"vision_feature_layer {layer} out of range for {self.vision.num_hidden_layers} layers")

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return (layer,) if isinstance(layer, int) else tuple(layer)

    @property
    def image_seq_length(self) -> int:
        """Language-model tokens one image occupies (the processor expands `<image>` to this many)."""
        extra = 1 if self.vision_feature_select_strategy == "full" else 0
        return self.vision.num_patches + extra


def _tiny() -> LlavaConfig:
    from valora_jax.models.tiny_processor import IMAGE_TOKEN_ID, PAD_ID, BOS_ID, EOS_ID, tiny_vocab

    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16
        ),
        text=TextConfig(
            vocab_size=len(tiny_vocab()),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


_LLAVA_15_VISION = VisionConfig()  # CLIP ViT-L/14 at 336 px


PRESETS = {
    "tiny": _tiny,
    "llava-1.5-7b": lambda: LlavaConfig(vision=_LLAVA_15_VISION, text=TextConfig(), pad_token_id=32001),
    "llava-1.5-13b": lambda: LlavaConfig(
        vision=_LLAVA_15_VISION,
        text=TextConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40),
        pad_token_id=32001,
    ),
}


def preset(name: str):
    """A named configuration of any family: `tiny` (tests, demo), `llava-1.5-7b`, `llava-1.5-13b`,
    `qwen2-vl-2b`, `qwen2.5-vl-7b`, ... (shapes only)."""
    from valora_jax.models.registry import all_presets

    presets = all_presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(presets)}")
    return presets[name]()


def _rope_from_hf(text: dict[str, Any]) -> RopeConfig:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", text.get("rope_theta", 10000.0))
    fields = {f.name for f in dataclasses.fields(RopeConfig)} - {"theta", "rope_type"}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **{k: v for k, v in params.items() if k in fields})


def _pick(cls, d: dict[str, Any], **renames: str) -> dict[str, Any]:
    """The keys of an HF config dict that `cls` has (after `renames`: ours=theirs)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: d[k] for k in names if k in d}
    out.update({ours: d[theirs] for ours, theirs in renames.items() if theirs in d})
    return out


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
    """Parse an HF LLaVA `config.json` dict. Raises for architectures this project does not implement."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type != "llava" or (archs and "LlavaForConditionalGeneration" not in archs):
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
            "supported: LlavaForConditionalGeneration (model_type 'llava')"
        )
    vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"unsupported vision tower {vision.get('model_type')!r}; supported: clip_vision_model")
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported language model {text.get('model_type')!r}; supported: llama")
    feature_layer = hf.get("vision_feature_layer", -2)
    tie = hf.get("tie_word_embeddings") or text.get("tie_word_embeddings", False)
    return LlavaConfig(
        vision=VisionConfig(**_pick(VisionConfig, vision)),
        text=TextConfig(**{**_pick(TextConfig, text), "rope": _rope_from_hf(text)}),
        image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
        vision_feature_layer=feature_layer if isinstance(feature_layer, int) else tuple(feature_layer),
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=hf.get("multimodal_projector_bias", True),
        tie_word_embeddings=bool(tie),
        pad_token_id=hf.get("pad_token_id", text.get("pad_token_id")),
        bos_token_id=text.get("bos_token_id", hf.get("bos_token_id", 1)),
        eos_token_id=text.get("eos_token_id", hf.get("eos_token_id", 2)),
    )
