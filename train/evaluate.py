"""Scores of a model (with or without an adapter) on tasks' validation splits.

Classify tasks with a trained head answer in one forward pass: argmax of the head on the last
token's hidden state. Everything else answers in text: greedy decoding with `Generator`, stopped at
EOS, special tokens skipped; for a classify task without a head (the base model), the text must
name one of the task's labels (`train.tasks.label_index`: case and punctuation ignored) to count.
Validation batches have a fixed size (the last one padded by repeating its final row, the padding
dropped afterwards), so each program compiles once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from train.encoding import Encoder, model_inputs
from train.pipeline import eval_dataset
from train.tasks import Task, label_index
from valora_jax.generation import Generator, bucket_length


def padded(batch: dict, size: int) -> dict:
    """`batch` grown to `size` rows by repeating its last row."""
    missing = size - len(batch["prompt"])
    if missing <= 0:
        return batch
    return {k: (v + [v[-1]] * missing) if isinstance(v, list) else np.concatenate([v, np.repeat(v[-1:], missing, 0)])
            for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=0)
def head_predictions(graphdef, state, arrays: dict) -> jax.Array:
    learner = nnx.merge(graphdef, state)
    hidden, _ = learner.model.hidden_states(arrays["input_ids"], arrays["pixel_values"], arrays["attention_mask"],
                                            arrays["position_ids"])
    return learner.heads(hidden[:, -1], arrays["head_index"]).argmax(axis=-1)


class Evaluator:
    """Evaluates tasks with one encoder and fixed batch size; `learner` is a `trainer.Learner`."""

    def __init__(self, encoder: Encoder, *, batch_size: int):
        self.encoder, self.batch_size = encoder, batch_size

    def _batches(self, task: Task):
        for batch in eval_dataset(task, 0, batch_size=self.batch_size, image_size=self.encoder.image_size):
            yield len(batch["prompt"]), self.encoder.encode(padded(batch, self.batch_size),
                                                            lm_rows=np.zeros(self.batch_size, bool))

    def head_answers(self, learner, task: Task) -> list[int]:
        graphdef, state = nnx.split(learner)
        head = np.int32(learner.heads.tasks.index(task.name))
        out = []
        for n, arrays in self._batches(task):
            arrays = model_inputs(learner.model, arrays)
            arrays["head_index"] = np.full(self.batch_size, head, np.int32)
            arrays.pop("target_mask")
            out += [int(p) for p in np.asarray(head_predictions(graphdef, state, arrays))[:n]]
        return out

    def text_answers(self, model: nnx.Module, task: Task) -> list[str]:
        max_new = self.encoder.answer_window
        generator = Generator(model, max_len=bucket_length(self.encoder.length) + max_new)
        tokenizer = self.encoder.processor.tokenizer
        out = []
        for n, arrays in self._batches(task):
            tokens = generator.generate(arrays["input_ids"], arrays["pixel_values"], arrays["attention_mask"],
                                        image_grid_thw=arrays.get("image_grid_thw"), max_new_tokens=max_new,
                                        eos_token_id=self.encoder.eos_token_id)
            out += [text.strip() for text in tokenizer.batch_decode(tokens[:n], skip_special_tokens=True)]
        return out

    def score(self, task: Task, model: nnx.Module, learner=None) -> float:
        """`task`'s metric: through its head when `learner` has one for it, else from decoded text."""
        if task.head == "classify" and learner is not None and learner.heads is not None:
            return task.score(self.head_answers(learner, task))
        answers = self.text_answers(model, task)
        if task.head == "classify":
            return task.score([label_index(task.labels, a) for a in answers])
        return task.score(answers)

    def scores(self, tasks: Sequence[Task], model: nnx.Module, learner=None) -> dict[str, float]:
        return {task.name: self.score(task, model, learner) for task in tasks}
