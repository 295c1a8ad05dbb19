"""Encoding and the training loss against hand-built sequences on the golden tiny LLaVA (tests/golden/llava_mha).

The token ids are spelt out from the tiny word-level vocabulary, and the loss is recomputed in numpy from
the model's full-sequence logits: each answer token scored by the logits of the position before it.
"""

import numpy as np
import pytest
from flax import nnx

from tests.train.conftest import marked_image
from train.encoding import AnswerError, Encoder
from train.run import load_base
from train.step import Learner, loss_fn
from train.tasks import Example, Task
from train.trainer import head_indices, model_batch
from valora_jax.adapters.heads import ClassifyHeads
from valora_jax.models.tiny_processor import BOS_ID, EOS_ID, IMAGE_TOKEN_ID, PAD_ID, tiny_vocab


IMAGE_TOKENS = 16  # llava_mha: 32-px images, 8-px patches


def words(text: str) -> list[int]:
    return [tiny_vocab()[w] for w in text.split()]


def prompt_ids(question: str) -> list[int]:
    """`USER: <image>\\n{question} ASSISTANT:` as the tiny tokenizer writes it (lower case, ':' its own word)."""
    return [BOS_ID, *words("user :"), *[IMAGE_TOKEN_ID] * IMAGE_TOKENS, *words(question), *words("assistant :")]


@pytest.fixture(scope="module")
def base(golden_dir):
    return load_base(str(golden_dir / "llava_mha"))


def make_tasks():
    def example(i, answer, label=-1):
        return Example(marked_image(40 * i, 32), answer, label)

    bright = Task("bright", "classify", "accuracy", 0.9, "is the image white ?",
                  [example(0, "no", 0), example(1, "yes", 1)], [example(2, "no", 0)], labels=("no", "yes"))
    where = Task("where", "lm", "accuracy", 0.9, "where is the object ?",
                 [example(3, "black"), example(4, "a white square")], [example(5, "red")])
    return [bright, where]


@pytest.fixture(scope="module")
def encoded(base):
    """(encoder, tasks, a batch of one classify row and two lm rows with answers of 2 and 4 tokens)."""
    model, processor = base
    tasks = make_tasks()
    encoder = Encoder.for_model(model, processor, 32).fitted(tasks)
    rows = [(tasks[0], tasks[0].train[1], 0), (tasks[1], tasks[1].train[0], 1), (tasks[1], tasks[1].train[1], 1)]
    batch = {"image": np.stack([np.asarray(ex.image) for _, ex, _ in rows]),
             "prompt": [task.prompt for task, _, _ in rows], "answer": [ex.answer for _, ex, _ in rows],
             "label": np.array([ex.label for _, ex, _ in rows], np.int32),
             "task": np.array([index for _, _, index in rows], np.int32)}
    return encoder, tasks, batch


def test_rows_are_left_padded_prompts_then_answer_and_eos_with_the_answer_masked_in(encoded):
    encoder, tasks, batch = encoded
    answers = [[], words("black") + [EOS_ID], words("a white square") + [EOS_ID]]
    rows = [prompt_ids("is the image white ?"), prompt_ids("where is the object ?") + answers[1],
            prompt_ids("where is the object ?") + answers[2]]
    assert encoder.length == len(rows[2]) and encoder.answer_window == 4

    arrays = encoder.encode(batch, lm_rows=np.array([False, True, True]))
    length = encoder.length
    for r, (row, answer) in enumerate(zip(rows, answers)):
        pad = length - len(row)
        assert arrays["input_ids"][r].tolist() == [PAD_ID] * pad + row
        assert arrays["attention_mask"][r].tolist() == [False] * pad + [True] * len(row)
        assert arrays["position_ids"][r].tolist() == [0] * pad + list(range(len(row)))
        assert arrays["target_mask"][r].tolist() == [False] * (length - len(answer)) + [True] * len(answer)
    assert arrays["pixel_values"].shape == (3, 3, 32, 32)


def test_loss_is_the_answer_tokens_cross_entropy_from_the_position_before_and_the_head_cross_entropy(base, encoded):
    model, _ = base
    encoder, tasks, batch = encoded
    heads = ClassifyHeads(model.config.text.hidden_size, {"bright": ("no", "yes")}, rngs=nnx.Rngs(3))
    learner = Learner(model, heads)
    arrays = model_batch(batch, encoder, head_indices(tasks, heads), model)
    loss = float(nnx.jit(loss_fn, static_argnums=2)(learner, arrays, encoder.answer_window))

    @nnx.jit
    def forward(model, arrays):
        hidden, _ = model.hidden_states(arrays["input_ids"], arrays["pixel_values"], arrays["attention_mask"],
                                        arrays["position_ids"])
        return hidden, model.logits(hidden)

    hidden, logits = forward(model, {k: arrays[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                                            "position_ids")})
    logits = np.asarray(logits, np.float64)  # every position's next-token logits

    def cross_entropy(scores, target):
        return np.log(np.exp(scores - scores.max()).sum()) + scores.max() - scores[target]

    kernel, bias = np.asarray(heads.kernel[...], np.float64), np.asarray(heads.bias[...], np.float64)
    expected = [cross_entropy(np.asarray(hidden[0, -1], np.float64) @ kernel + bias, 1)]  # row 0: label "yes"
    for r in (1, 2):
        ids = arrays["input_ids"][r]
        answer_positions = np.flatnonzero(arrays["target_mask"][r])
        expected.append(np.mean([cross_entropy(logits[r, t - 1], ids[t]) for t in answer_positions]))
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)


def test_answers_the_tokenizer_cannot_represent_are_an_error_naming_task_and_words(base, encoded, caplog):
    encoder, tasks, _ = encoded
    encoder.check_answers(tasks)  # every word is in the tiny vocabulary
    lm, classify = tasks[1], tasks[0]
    unknown_lm = Task("birds", "lm", "accuracy", 0.5, "what bird ?", [Example(lm.train[0].image, "a Sparrow")],
                      [Example(lm.train[0].image, "two robins .")])
    with pytest.raises(AnswerError, match=r"task 'birds': 'Sparrow', 'robins'"):
        encoder.check_answers([classify, unknown_lm])
    unknown_labels = Task("kind", "classify", "accuracy", 0.5, "what is it ?", classify.train, classify.val,
                          labels=("sparrow", "YES"))
    encoder.check_answers([unknown_labels])  # a head answers a classify task: only a warning
    assert "task 'kind': 'sparrow'" in caplog.text
