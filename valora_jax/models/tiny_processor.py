"""The embedded default's processor: a word-level tokenizer and a CLIP image processor built in memory.

The `tiny` preset must run with no files and no downloads, so its HF processor (the same
`LlavaProcessor` class a real checkpoint directory gives) is assembled here from a fixed vocabulary.
Words outside the vocabulary become `<unk>`; the embedded task suite uses only these words.
"""

from __future__ import annotations

import functools

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_TOKEN_ID = range(len(SPECIAL_TOKENS))

TINY_VOCAB_WORDS: tuple[str, ...] = (
    # punctuation and chat roles
    "?", ".", ",", ":", "user", "assistant",
    # question words and glue
    "what", "which", "how", "many", "where", "is", "are", "the", "a", "an", "of", "in", "this", "that",
    "there", "image", "picture", "scene", "object", "objects", "shape", "shapes", "colour", "color",
    "dominant", "count", "number", "digit", "handwritten", "box", "location", "locate", "find", "answer",
    "with", "one", "word", "give", "bounding", "x0", "y0", "x1", "y1", "and", "or", "yes", "no", "none",
    # shapes
    "circle", "square", "triangle", "star", "cross", "ring", "rectangle", "diamond",
    # colours
    "red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple", "white", "black", "gray",
) + tuple(str(n) for n in range(100))


@functools.cache
def tiny_vocab() -> dict[str, int]:
    """Token -> id, specials first (so their ids are the module constants above)."""
    tokens = list(SPECIAL_TOKENS) + list(dict.fromkeys(TINY_VOCAB_WORDS))
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer():
    """A `PreTrainedTokenizerFast` over `tiny_vocab()`: lower-cased, split on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Split("<image>", "isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def tiny_processor(image_size: int, patch_size: int, select_strategy: str = "default"):
    """The `LlavaProcessor` of the embedded default: prompts with `<image>` expand to the patch count."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=1,
    )
