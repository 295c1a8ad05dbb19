"""What the engine tests of every model family share: random adapters saved for the pool, the reference
tokens of one request generated alone by `Generator` with its adapter attached, and a run of requests
arriving over engine steps (the test drives `engine.step()` itself, so arrivals are the same under every
policy)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from valora_jax.adapters import AdapterConfig, AdapterParam, attach, load_adapter, save_adapter
from valora_jax.generation import Generator
from valora_jax.loading import load_pretrained

# What a processor returns that `Generator.generate` takes.
GENERATE_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def save_random_adapter(model_dir, config: AdapterConfig, path, seed: int, std: float = 0.3):
    """An adapter of `config` on the model in `model_dir` with N(0, std) weights (never zero), saved at `path`."""
    model, _ = load_pretrained(model_dir)
    attach(model, config, nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in sorted(nnx.to_flat_state(nnx.state(model, AdapterParam)), key=lambda kv: str(kv[0])):
        var.set_value(std * rng.standard_normal(var.shape).astype(np.float32))
    save_adapter(model, path)
    return path


class Alone:
    """Each request generated alone (batch 1, greedy, float32) by `Generator` on the model in `model_dir`
    with its adapter (a directory of `adapters`, or None for the base) attached: one model and Generator
    per adapter, built when first needed.

    Greedy tokens are a prefix of a longer greedy run, so one length (`longest`) serves every request and
    each Generator compiles its decode loop once."""

    def __init__(self, model_dir, adapters, *, max_len: int, longest: int):
        self.model_dir, self.adapters, self.max_len, self.longest = model_dir, adapters, max_len, longest
        self._generators = {}

    def generator(self, adapter: str | None):
        if adapter not in self._generators:
            model, processor = load_pretrained(self.model_dir)
            if adapter is not None:
                load_adapter(model, self.adapters[adapter])
            self._generators[adapter] = (Generator(model, max_len=self.max_len), processor)
        return self._generators[adapter]

    def tokens(self, adapter: str | None, prompt: str, images, max_tokens: int) -> list[int]:
        """The greedy tokens of `prompt` with `images` (PIL, possibly none) up to (not including) EOS."""
        generator, processor = self.generator(adapter)
        inputs = processor(text=[prompt], images=list(images) or None, return_tensors="np")
        tokens = generator.generate(**{k: inputs[k] for k in GENERATE_INPUTS if k in inputs},
                                    max_new_tokens=self.longest)[0][:max_tokens]
        eos = generator.config.eos_token_id
        return tokens[: list(tokens).index(eos)].tolist() if eos in tokens else tokens.tolist()


def run(engine, work, make_request, modes: set | None = None):
    """Submit each `(arrival step, *args)` of `work` as `make_request(*args)` at its arrival step and step
    the engine until every request has finished; the results in order. `modes` collects the steps' modes."""
    handles, step = [], 0
    while len(handles) < len(work) or not all(h.done for h in handles):
        handles += [engine.submit(make_request(*w[1:])) for w in work[len(handles):] if w[0] <= step]
        engine.step()
        if modes is not None:
            modes.add(engine.mode)
        step += 1
        assert step < 500, "the engine makes no progress"
    return [h.result(0) for h in handles]


def assert_as_alone(results, expected, max_tokens, label=""):
    """Each result finished normally with exactly its request's tokens alone, and the right finish reason."""
    for i, (result, want, limit) in enumerate(zip(results, expected, max_tokens, strict=True)):
        assert result.finish_reason in ("stop", "length") and result.error is None, (i, label, result)
        assert result.token_ids == want, (i, label)
        assert result.finish_reason == ("stop" if len(want) < limit else "length"), (i, label)
