"""LLaVA's registry entry: config parsing (`valora_jax.config`), the model (`valora_jax.models.llava`) and
the checkpoint-name rules of both layouts in circulation: the one transformers 5 writes
(`model.vision_tower.*`, `model.language_model.*`, `lm_head.*`) and the one of the published llava-hf
checkpoints (`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`).
"""

from __future__ import annotations

from valora_jax.config import PRESETS, LlavaConfig, config_from_hf
from valora_jax.models.llava import LlavaForConditionalGeneration
from valora_jax.models.registry import CheckpointNames, Family, auto_processor

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), for processors that ship no chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% else %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

NAMES = CheckpointNames(
    prefixes=(
        (r"^model\.vision_tower\.vision_model\.", "vision_tower."),
        (r"^vision_tower\.vision_model\.", "vision_tower."),
        (r"^model\.vision_tower\.", "vision_tower."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.language_model\.", "language_model."),
        (r"^language_model\.model\.", "language_model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ),
    renames=(
        (r"^vision_tower\.encoder\.layers\.", "vision_tower.layers."),
        (r"^vision_tower\.embeddings\.(patch_embedding|position_embedding)\.weight$", r"vision_tower.\1"),
        (r"^vision_tower\.embeddings\.class_embedding$", "vision_tower.class_embedding"),
        (r"^language_model\.embed_tokens\.weight$", "language_model.embed_tokens.embedding"),
    ),
    ignored=(r"^vision_tower\.post_layernorm\.", r"\.position_ids$", r"\.rotary_emb\.inv_freq$"),
    conv_kernels=("vision_tower.patch_embedding",),
)

LLAVA = Family(
    name="llava",
    architectures=("LlavaForConditionalGeneration",),
    model_types=("llava",),
    config_class=LlavaConfig,
    config_from_hf=config_from_hf,
    model_class=LlavaForConditionalGeneration,
    names=NAMES,
    presets=PRESETS,
    load_processor=auto_processor,
    hf_modules=(
        ("vision_tower.layers.", "model.vision_tower.encoder.layers."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.", "model.language_model."),
        ("lm_head", "lm_head"),
    ),
    chat_template=CHAT_TEMPLATE,
)
