"""Pipeline batches -> model arrays: chat-templated token ids, pixel values and what the loss needs.

Every row is one user turn of the image and the task's prompt, rendered with the model's chat template
(`valora_jax.chat`: its processor's own, else its family's: `USER: <image>\\n{prompt} ASSISTANT:` for
LLaVA-1.5, ChatML for Qwen-VL) and expanded by the model's processor; serving renders chat requests the
same way. lm rows append the answer tokens and EOS, which are the only positions the loss reads;
classify rows stop after the prompt, and their head reads the last position. Rows are left-padded to a
fixed length, so the jitted step sees one shape, and carry positions counted from their first real
token, as generation assigns them, so what is trained is what is decoded. `model_inputs` turns encoded
arrays into what the model's jitted entry takes (Qwen-VL: vision inputs, an unpadded attention group per
image, and M-RoPE positions, from the model's `generation_inputs`).

An answer is usable only if the tokenizer represents it: a word it maps to an unknown token trains to a
tiny loss on `<unk>` and can never be decoded, so `Encoder.check_answers` rejects such lm tasks before
training and warns about such classify labels (a word-level vocabulary such as the `tiny` preset's is
where this happens).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from train.metrics import normalize_answer
from train.tasks import Task
from valora_jax import chat

logger = logging.getLogger(__name__)

NAMED_WORDS = 10  # unrepresentable words an error names per task


class AnswerError(ValueError):
    """Answers of a task that the tokenizer cannot represent."""


def positions_of(attention_mask: np.ndarray) -> np.ndarray:
    """Position of each token counted from its row's first real token (0 on padding)."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Encodes batches for one processor.

    `template` is the chat template prompts are rendered with and `image_size` the side of the task
    images; `length` is the fixed padded sequence length and `answer_window` the most answer tokens (EOS
    included) of any lm row: the loss and generation only need that many final positions.
    """

    processor: object
    eos_token_id: int
    pad_token_id: int
    template: str
    image_size: int
    length: int = 0
    answer_window: int = 1

    @classmethod
    def for_model(cls, model, processor, image_size: int) -> Encoder:
        """The encoder of `model`'s processor, chat template and special tokens (not yet `fitted`)."""
        cfg = model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        return cls(processor, cfg.eos_token_id, pad, chat.chat_template(model, processor), image_size)

    def chat_prompt(self, prompt: str) -> str:
        """The templated text of one task prompt (the image placeholder not yet expanded)."""
        return chat.image_prompt(self.processor.tokenizer, self.template, prompt)

    def fitted(self, tasks: Sequence[Task]) -> Encoder:
        """This encoder with `length` and `answer_window` large enough for every example of `tasks`."""
        prompt_lengths = {}
        length, window = 0, 1
        for task in tasks:
            for example in (*task.train, *task.val):
                prompt = task.prompt_of(example)
                if prompt not in prompt_lengths:
                    prompt_lengths[prompt] = len(self.prompt_ids(prompt))
                answer = len(self.answer_ids(example.answer)) if task.head == "lm" else 0
                length, window = max(length, prompt_lengths[prompt] + answer), max(window, answer)
        return dataclasses.replace(self, length=length, answer_window=window)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of one templated prompt (the processor expands <image> only when given an image)."""
        blank = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        return self._processed([prompt], blank[None])[0][0]

    def _processed(self, prompts, images) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        """(token ids per row without padding, the processor's image arrays) from one processor call."""
        out = self.processor(text=[self.chat_prompt(p) for p in prompts], images=list(images), padding=True,
                             return_tensors="np")
        ids = [[int(i) for i in row[mask.astype(bool)]] for row, mask in zip(out["input_ids"], out["attention_mask"])]
        vision = {"pixel_values": np.asarray(out["pixel_values"], np.float32)}
        if "image_grid_thw" in out:
            vision["image_grid_thw"] = np.asarray(out["image_grid_thw"], np.int64)
        return ids, vision

    def unrepresentable(self, text: str) -> list[str]:
        """Words of `text` that do not survive encoding and decoding (compared as the metrics compare)."""
        tokenizer = self.processor.tokenizer
        bad = []
        for word in text.split():
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if normalize_answer(tokenizer.decode(ids, skip_special_tokens=True)) != normalize_answer(word):
                bad.append(word)
        return bad

    def check_answers(self, tasks: Sequence[Task]) -> None:
        """Raise AnswerError naming each lm task and the words of its answers the tokenizer cannot represent.

        A classify task answers through its head, so unrepresentable label names only cost the base model's
        score (it answers in text and could never match them): a warning names them.
        """
        problems = []
        for task in tasks:
            texts = task.labels if task.head == "classify" else {ex.answer for ex in (*task.train, *task.val)}
            words = sorted({word for text in texts for word in self.unrepresentable(text)})
            if not words:
                continue
            more = f" and {len(words) - NAMED_WORDS} more" if len(words) > NAMED_WORDS else ""
            named = f"task {task.name!r}: {', '.join(map(repr, words[:NAMED_WORDS]))}{more}"
            if task.head == "lm":
                problems.append(named)
            else:
                logger.warning("%s: label words the tokenizer cannot represent; the base model's text answers can "
                               "never match them, so its score for the task is 0", named)
        if problems:
            raise AnswerError("answers the tokenizer cannot represent (they would train on <unk> and never be "
                              "decoded; use the tokenizer's words or another model):\n  " + "\n  ".join(problems))

    def answer_ids(self, answer: str) -> list[int]:
        ids = self.processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        return [int(i) for i in ids] + [self.eos_token_id]

    def encode(self, batch: dict, lm_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Model inputs for a pipeline batch; `lm_rows` (bool per row) says which rows answer in text.

        Returns input_ids, attention_mask, position_ids (B, L), the processor's pixel_values (and
        image_grid_thw, Qwen-VL), and `target_mask` (B, L), True where the token at that position is an
        answer token the previous position must predict.
        """
        n = len(batch["prompt"])
        input_ids = np.full((n, self.length), self.pad_token_id, np.int32)
        target_mask = np.zeros((n, self.length), bool)
        attention_mask = np.zeros((n, self.length), bool)
        all_prompt_ids, vision = self._processed(batch["prompt"], batch["image"])
        for row, (prompt_ids, answer, is_lm) in enumerate(zip(all_prompt_ids, batch["answer"], lm_rows)):
            answer_ids = self.answer_ids(answer) if is_lm else []
            ids = prompt_ids + answer_ids
            if len(ids) > self.length:
                raise ValueError(f"row of {len(ids)} tokens exceeds the encoder length {self.length}")
            input_ids[row, self.length - len(ids):] = ids
            attention_mask[row, self.length - len(ids):] = True
            if answer_ids:
                target_mask[row, self.length - len(answer_ids):] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": positions_of(attention_mask),
            "target_mask": target_mask,
            **vision,
        }


def model_inputs(model, arrays: dict) -> dict:
    """Encoded `arrays` as the model's jitted entry (`hidden_states`) takes them: unchanged for LLaVA; for a
    family that prepares its inputs on the host (Qwen-VL's `generation_inputs`), its vision inputs in the
    exact layout (a group per row's image, unpadded: the groups shard with their rows) and its M-RoPE
    positions, `image_grid_thw` consumed."""
    prepare = getattr(model, "generation_inputs", None)
    if prepare is None:
        return arrays
    out = dict(arrays)
    grid = out.pop("image_grid_thw", None)
    out["pixel_values"], out["position_ids"] = prepare(out["input_ids"], out["attention_mask"], out["pixel_values"],
                                                       grid, exact=True)
    return out
