"""The registry entries of Qwen2-VL and Qwen2.5-VL: config parsing, model, checkpoint-name rules, presets.

Checkpoint layouts: the published one (`visual.*`, `model.*` for the decoder, `lm_head.*`) and the one
transformers 5 keeps in memory (`model.visual.*`, `model.language_model.*`, `lm_head.*`).
"""

from __future__ import annotations

from valora_jax.models.qwen2_vl.config import PRESETS, QwenVLConfig, config_from_hf
from valora_jax.models.qwen2_vl.model import Qwen2VLForConditionalGeneration
from valora_jax.models.qwen2_vl.processor import load_processor
from valora_jax.models.registry import CheckpointNames, Family

# Qwen-VL's ChatML conversation format (a system turn first, each image as <|vision_start|><|image_pad|>
# <|vision_end|>), for checkpoints whose processor ships no chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

NAMES = CheckpointNames(
    prefixes=(
        (r"^model\.visual\.", "visual."),
        (r"^model\.language_model\.", "language_model."),
        (r"^visual\.", "visual."),
        (r"^model\.", "language_model."),
    ),
    renames=((r"^language_model\.embed_tokens\.weight$", "language_model.embed_tokens.embedding"),),
    ignored=(r"\.rotary_emb\.inv_freq$", r"\.rotary_pos_emb\.inv_freq$"),
    conv_kernels=("visual.patch_embed.proj.kernel",),
)


def _family(version: str, architecture: str) -> Family:
    return Family(
        name=version,
        architectures=(architecture,),
        model_types=(version,),
        config_class=QwenVLConfig,
        config_from_hf=config_from_hf,
        model_class=Qwen2VLForConditionalGeneration,
        names=NAMES,
        presets={name: make for name, make in PRESETS.items() if make().version == version},
        load_processor=load_processor,
        hf_modules=(("visual.", "model.visual."), ("language_model.", "model.language_model."), ("lm_head", "lm_head")),
        chat_template=CHAT_TEMPLATE,
    )


QWEN2_VL = _family("qwen2_vl", "Qwen2VLForConditionalGeneration")
QWEN2_5_VL = _family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")
