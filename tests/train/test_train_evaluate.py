"""Validation scoring against hand-computed predictions on the golden tiny LLaVA (tests/golden/llava_mha).

References: a classify head applied in numpy to the last prompt token's hidden state, and greedy decoding
by full forward passes over the unpadded prompt (no KV cache, no left padding), one token at a time.
The evaluator runs batches of 3 over 5 validation examples, so its last batch is padded.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import marked_image
from train.encoding import Encoder
from train.evaluate import Evaluator
from train.run import load_base
from train.step import Learner
from train.tasks import Example, Task, label_index
from valora_jax.adapters.heads import ClassifyHeads


BATCH = 3
VALUES = (0, 60, 120, 180, 250)  # five validation images: BATCH does not divide them


def val_examples(answer="a white square"):
    return [Example(marked_image(v, 32), answer, 0) for v in VALUES]


@pytest.fixture(scope="module")
def setup(golden_dir):
    model, processor = load_base(str(golden_dir / "llava_mha"))
    labels = ("no", "yes", "circle")
    kind = Task("kind", "classify", "accuracy", 0.5, "is the image white ?", val_examples("no"), val_examples("no"),
                labels=labels)
    where = Task("where", "lm", "accuracy", 0.5, "where is the object ?", val_examples(), val_examples())
    encoder = Encoder.for_model(model, processor, 32).fitted([kind, where])
    return model, encoder, Evaluator(encoder, batch_size=BATCH), kind, where


@nnx.jit
def full_hidden(model, input_ids, pixel_values):
    hidden, _ = model.hidden_states(input_ids, pixel_values)
    return hidden


def prompt_arrays(encoder, task):
    """(prompt ids without padding (n, prompt length), pixel values) of the task's validation examples."""
    batch = {"image": np.stack([ex.image for ex in task.val]), "prompt": [task.prompt] * len(task.val),
             "answer": [ex.answer for ex in task.val]}
    arrays = encoder.encode(batch, lm_rows=np.zeros(len(task.val), bool))
    real = arrays["attention_mask"][0]  # one prompt: every row has the same length
    return arrays["input_ids"][:, real], arrays["pixel_values"]


def greedy_texts(model, encoder, task) -> list[str]:
    """Greedy answers by full forward passes: tokens appended after the prompt, logits read at the last one.

    Rows are right-padded to a fixed length so one program serves every step; causal attention keeps the
    padding after a position from reaching it.
    """
    ids, pixel_values = prompt_arrays(encoder, task)
    n, prompt_length = ids.shape
    steps = encoder.answer_window
    tokens = np.full((n, prompt_length + steps), encoder.pad_token_id, np.int32)
    tokens[:, :prompt_length] = ids
    for step in range(steps):
        at = prompt_length + step
        hidden = full_hidden(model, tokens, pixel_values)[:, at - 1]
        tokens[:, at] = np.asarray(model.logits(hidden)).argmax(-1)
    texts = []
    for row in tokens[:, prompt_length:].tolist():
        row = row[:row.index(encoder.eos_token_id)] if encoder.eos_token_id in row else row
        texts.append(encoder.processor.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def test_head_predictions_are_the_argmax_of_the_head_on_the_last_prompt_token(setup):
    model, encoder, evaluator, kind, _ = setup
    heads = ClassifyHeads(model.config.text.hidden_size, {"kind": kind.labels}, rngs=nnx.Rngs(7))
    heads.bias.set_value(heads.bias[...] * 0 + np.array([0.0, 0.5, -0.5], np.float32))
    learner = Learner(model, heads)
    ids, pixel_values = prompt_arrays(encoder, kind)
    last = np.asarray(full_hidden(model, ids, pixel_values)[:, -1], np.float64)
    expected = (last @ np.asarray(heads.kernel[...], np.float64) + np.asarray(heads.bias[...])).argmax(-1).tolist()
    assert len(set(expected)) > 1  # predictions that differ per image: position or argmax mistakes show

    assert evaluator.head_answers(learner, kind) == expected
    labelled = dataclasses.replace(kind, val=[dataclasses.replace(ex, label=i % 3) for i, ex in enumerate(kind.val)])
    hits = [p == i % 3 for i, p in enumerate(expected)]
    assert evaluator.score(labelled, model, learner) == pytest.approx(np.mean(hits))


def test_text_answers_are_greedy_decoding_and_scored_by_normalized_exact_match(setup):
    model, encoder, evaluator, _, where = setup
    expected = greedy_texts(model, encoder, where)
    assert len(set(expected)) > 1 and all(expected)
    assert evaluator.text_answers(model, where) == expected

    # rows 0, 2, 4 answered right (in upper case, with a full stop), rows 1 and 3 wrong
    answers = [text.upper() + " ." if i % 2 == 0 else "no" for i, text in enumerate(expected)]
    scored = dataclasses.replace(where, val=[dataclasses.replace(ex, answer=a) for ex, a in zip(where.val, answers)])
    assert evaluator.score(scored, model) == pytest.approx(3 / 5)


def test_a_classify_task_without_its_head_is_scored_by_the_label_its_text_names(setup):
    model, encoder, evaluator, kind, _ = setup
    texts = greedy_texts(model, encoder, kind)
    labels = tuple(dict.fromkeys(texts))  # the texts the base model answers, each a label
    assert len(labels) > 2
    task = dataclasses.replace(kind, labels=labels, val=[
        dataclasses.replace(ex, label=0 if i < 2 else len(labels) - 1) for i, ex in enumerate(kind.val)])
    hits = [label_index(labels, text) == ex.label for text, ex in zip(texts, task.val)]
    assert 0 < np.mean(hits) < 1
    assert evaluator.score(task, model) == pytest.approx(np.mean(hits))
