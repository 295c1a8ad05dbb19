"""Chat prompts: which template renders a model's conversations, and the one-image prompt of a task.

A model's template is its processor's own chat template when it ships one, else its family's default
(`Family.chat_template`: LLaVA-1.5's conversation format, Qwen-VL's ChatML), unless the caller
overrides it. Training (`train.encoding`) and serving (`serve.engine`) render prompts through the same
functions, so a served chat request reads exactly the prompt its adapter was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from valora_jax.models.registry import family_of


def chat_template(model, processor, override: str | None = None) -> str:
    """The Jinja template for `model`'s conversations: `override`, the processor's own, or the family's."""
    own = getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                               "chat_template", None)
    return override or own or family_of(model.config).chat_template


def render(tokenizer, messages: Sequence[Mapping], template: str) -> str:
    """The prompt text of `messages` (OpenAI-style roles; content a string or a list of `{"type": "text",
    "text": ...}` / `{"type": "image"}` parts), ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), chat_template=template, add_generation_prompt=True,
                                         tokenize=False)


def image_prompt(tokenizer, template: str, text: str) -> str:
    """One user turn of an image followed by `text`, rendered for generation: a task's prompt."""
    return render(tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                  template)
