"""Chat templates: a checkpoint without its own renders its family's format (LLaVA-1.5's, Qwen-VL's ChatML,
as the published processors write them); one of its own, or the caller's, wins."""

import pytest

from valora_jax import chat, load_pretrained
from valora_jax.models.tiny import tiny_base

QWEN_CHATML = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n"
               "<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_default_is_chatml(golden_dir, name):
    model, processor = load_pretrained(golden_dir / name)
    template = chat.chat_template(model, processor)
    assert chat.image_prompt(processor.tokenizer, template, "Describe it.") == QWEN_CHATML
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render(processor.tokenizer, conversation, template) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_llava_default_and_overrides():
    model, processor = tiny_base()
    template = chat.chat_template(model, processor)
    assert chat.image_prompt(processor.tokenizer, template, "what shape ?") == "USER: <image>\nwhat shape ? ASSISTANT:"
    override = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat.chat_template(model, processor, override) == override
    processor.tokenizer.chat_template = "{{ 'own' }}"
    try:
        assert chat.chat_template(model, processor) == "{{ 'own' }}"
    finally:
        processor.tokenizer.chat_template = None
