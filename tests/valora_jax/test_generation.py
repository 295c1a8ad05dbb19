"""Generation mechanics beyond greedy parity: compilation reuse, EOS, sampling filters, buckets."""

import jax
import numpy as np
import pytest
from flax import nnx

from valora_jax.config import preset
from valora_jax.generation import Generator, SamplingConfig, bucket_length, left_pad, sample
from valora_jax.models.llava import LlavaForConditionalGeneration


@pytest.fixture(scope="module")
def tiny_generator():
    cfg = preset("tiny")
    return Generator(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)), max_len=48, min_bucket=16)


def prompts(rng, vocab, lengths):
    ids = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(ids, bool)
    for row, n in enumerate(lengths):  # right-padded on purpose: generate re-packs to the left
        ids[row, :n] = rng.integers(10, vocab, n)
        mask[row, :n] = True
    return ids, mask


def test_same_bucket_never_recompiles(tiny_generator):
    rng = np.random.default_rng(0)
    vocab = tiny_generator.config.text.vocab_size
    def run(lengths):
        ids, mask = prompts(rng, vocab, lengths)
        tiny_generator.generate(ids, attention_mask=mask, max_new_tokens=8)

    run([5, 9])
    compiled = tiny_generator.compiled_programs()
    for lengths in ([3, 16], [12, 1], [7, 7]):  # all in the 16-token bucket
        run(lengths)
    assert tiny_generator.compiled_programs() == compiled
    run([20, 3])  # 32-token bucket
    assert tiny_generator.compiled_programs() > compiled


def test_rows_stop_at_eos(tiny_generator):
    rng = np.random.default_rng(1)
    ids, mask = prompts(rng, tiny_generator.config.text.vocab_size, [6, 4])
    free = tiny_generator.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=-1)
    eos = int(free[0, 1])  # pretend row 0's second token is EOS
    stopped = tiny_generator.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos)
    pad = tiny_generator.config.pad_token_id
    for row in range(2):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else free.shape[1]
        expected = np.concatenate([free[row, :end], np.full(free.shape[1] - end, pad)])
        np.testing.assert_array_equal(stopped[row], expected)


def test_prompt_longer_than_cache_is_refused(tiny_generator):
    ids = np.ones((1, 40), np.int32)
    with pytest.raises(ValueError, match="exceeds the cache length"):
        tiny_generator.generate(ids, max_new_tokens=8)


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 256, np.float32))
    keys = jax.random.split(jax.random.key(0), 4)
    top2 = np.asarray(sample(logits, keys[0], SamplingConfig(temperature=1.0, top_k=2)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sample(logits, keys[1], SamplingConfig(temperature=1.0, top_p=0.7)))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    unfiltered = np.asarray(sample(logits, keys[2], SamplingConfig(temperature=1.0)))
    assert {0, 1, 2} <= set(unfiltered.tolist())  # unfiltered: beyond the nucleus and the top 2 too
    greedy = np.asarray(sample(logits, keys[3], SamplingConfig()))
    assert (greedy == 0).all()


def test_sampling_is_reproducible_for_a_key(tiny_generator):
    rng = np.random.default_rng(2)
    ids, mask = prompts(rng, tiny_generator.config.text.vocab_size, [5, 5])
    cfg = SamplingConfig(temperature=1.0, top_k=20)
    a = tiny_generator.generate(ids, attention_mask=mask, max_new_tokens=6, sampling=cfg, key=jax.random.key(3))
    b = tiny_generator.generate(ids, attention_mask=mask, max_new_tokens=6, sampling=cfg, key=jax.random.key(3))
    np.testing.assert_array_equal(a, b)


def test_bucket_and_left_pad():
    assert [bucket_length(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    ids, mask = left_pad(np.array([[7, 8, 0], [9, 0, 0]]), np.array([[1, 1, 0], [1, 0, 0]]), 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 0, 7, 8], [0, 0, 0, 9]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])


def test_invalid_sampling_settings_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
