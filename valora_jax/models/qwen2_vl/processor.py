"""A torch-free Qwen-VL processor: the tokenizer and `Qwen2VLImageProcessorPil` from a model directory.

transformers 5.17's `Qwen2VLProcessor` insists on a video processor that imports torchvision; this one
does what it does for images: each `<|image_pad|>` of the text becomes as many image tokens as its image
has merged patches, and the image processor's flattened patches and `image_grid_thw` come along.
"""

from __future__ import annotations

import pathlib

import numpy as np

IMAGE_PAD = "<|image_pad|>"


class QwenVLProcessor:
    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD

    def __call__(self, text: str | list[str], images=None, *, padding: bool = True,
                 return_tensors: str = "np") -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask`, and with images `pixel_values` and `image_grid_thw` (numpy arrays)."""
        if return_tensors != "np":
            raise ValueError(f"this processor returns numpy arrays (return_tensors='np'), not {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        counts = iter(())
        if images is not None:
            vision = self.image_processor(images=images, return_tensors="np")
            out = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(axis=1) // merge).tolist())
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                n = next(counts, None)
                if n is None:
                    raise ValueError(f"more {self.image_token} in the text than images")
                pieces.append(self.image_token * n + part)
            expanded.append("".join(pieces))
        if next(counts, None) is not None:
            raise ValueError(f"more images than {self.image_token} in the text")
        tokens = self.tokenizer(expanded, padding=padding, return_tensors="np")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **out}

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)


def load_processor(model_dir: str | pathlib.Path) -> QwenVLProcessor:
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    return QwenVLProcessor(AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
                           Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True))
