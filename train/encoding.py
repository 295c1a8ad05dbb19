"""Pipeline batches -> model arrays: chat-templated token ids, pixel values and what the loss needs.

Every row is `USER: <image>\\n{prompt} ASSISTANT:` (LLaVA-1.5's template) expanded by the model's HF
processor. lm rows append the answer tokens and EOS, which are the only positions the loss reads;
classify rows stop after the prompt, and their head reads the last position. Rows are left-padded to a
fixed length, so the jitted step sees one shape, and carry positions counted from their first real
token, as generation assigns them, so what is trained is what is decoded.

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

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
NAMED_WORDS = 10  # unrepresentable words an error names per task


class AnswerError(ValueError):
    """Answers of a task that the tokenizer cannot represent."""


def chat_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def positions_of(attention_mask: np.ndarray) -> np.ndarray:
    """Position of each token counted from its row's first real token (0 on padding)."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Encodes batches for one processor.

    `length` is the fixed padded sequence length and `answer_window` the most answer tokens (EOS
    included) of any lm row: the loss and generation only need that many final positions.
    """

    processor: object
    eos_token_id: int
    pad_token_id: int
    length: int = 0
    answer_window: int = 1

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
        size = self.processor.image_processor.crop_size["height"]
        blank = np.zeros((size, size, 3), np.uint8)
        return self._processed([prompt], blank[None])[0][0]

    def _processed(self, prompts, images) -> tuple[list[list[int]], np.ndarray]:
        """(token ids per row without padding, pixel values) from one processor call."""
        out = self.processor(text=[chat_prompt(p) for p in prompts], images=list(images), padding=True,
                             return_tensors="np")
        ids = [[int(i) for i in row[mask.astype(bool)]] for row, mask in zip(out["input_ids"], out["attention_mask"])]
        return ids, np.asarray(out["pixel_values"], np.float32)

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

        Returns input_ids, attention_mask, position_ids (B, L), pixel_values, and `target_mask` (B, L),
        True where the token at that position is an answer token the previous position must predict.
        """
        n = len(batch["prompt"])
        input_ids = np.full((n, self.length), self.pad_token_id, np.int32)
        target_mask = np.zeros((n, self.length), bool)
        attention_mask = np.zeros((n, self.length), bool)
        all_prompt_ids, pixel_values = self._processed(batch["prompt"], batch["image"])
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
            "pixel_values": pixel_values,
            "target_mask": target_mask,
        }
