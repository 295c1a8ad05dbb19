"""The serving engine on the golden tiny LLaVA: results do not depend on batching, under every policy.

Reference: each request generated alone (batch 1) by `Generator` on the base model with its adapter
attached (`load_adapter`), greedy, float32. The engine runs 24 requests for 4 adapters (three PEFT
LoRAs, one Serial LoRA) and the base model, with prompts of different lengths, different output
lengths, and arrivals spread over the run (the test drives `engine.step()` itself, so the arrival
pattern is the same for every policy). Qwen-VL's engine test: test_engine_qwen.py.
"""

import jax
import numpy as np
import pytest
from PIL import Image

from serve.engine import GenerationRequest, RequestError, SamplingParams
from serve.engine.engine import Engine
from serve.policy import POLICIES, make_policy
from tests.serve.engine_runs import Alone, assert_as_alone, save_random_adapter
from tests.serve.engine_runs import run as run_work
from valora_jax.adapters import AdapterConfig

pytestmark = pytest.mark.xdist_group("engine_llava_mha")  # one worker builds the engine and the references

PEFT = ("peft_lora", "peft_lora_vision", "peft_lora_mlp")
WORDS = "what colour is the circle in this picture how many red shapes are there answer with one word".split()
MAX_LEN = 64


@pytest.fixture(scope="module")
def adapters(golden_dir, tmp_path_factory):
    """name -> directory: the three golden PEFT LoRAs and a Serial LoRA saved by `save_adapter`."""
    out = {name: golden_dir / name for name in PEFT}
    serial = AdapterConfig(kind="serial_lora", rank=4, alpha=8, towers=("language_model", "vision_tower"))
    out["serial"] = save_random_adapter(golden_dir / "llava_mha", serial, tmp_path_factory.mktemp("serial") / "serial",
                                        seed=3)
    return out


def workload(seed: int = 0):
    """24 (arrival step, adapter, prompt, image, max_tokens), 8 arriving per step; one adapter has 13 of them."""
    rng = np.random.default_rng(seed)
    names = ["peft_lora"] * 13 + ["serial"] * 3 + ["peft_lora_vision"] * 3 + ["peft_lora_mlp"] * 2 + [None] * 3
    rng.shuffle(names)
    out = []
    for i, name in enumerate(names):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 10))))
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        prompt = f"user : <image> {text} ? assistant :"
        out.append((i // 8, name, prompt, image, int(rng.integers(3, 12))))
    return out


def request(name, prompt, image, max_tokens):
    return GenerationRequest(adapter=name, prompt=prompt, images=[] if image is None else [Image.fromarray(image)],
                             sampling=SamplingParams(max_tokens=max_tokens))


@pytest.fixture(scope="module")
def expected(golden_dir, adapters):
    """Each request alone with its adapter attached: the tokens up to (not including) EOS."""
    alone = Alone(golden_dir / "llava_mha", adapters, max_len=MAX_LEN, longest=max(w[4] for w in workload()))
    return [alone.tokens(name, prompt, [] if image is None else [Image.fromarray(image)], max_tokens)
            for _, name, prompt, image, max_tokens in workload()]


@pytest.fixture(scope="module")
def engine(golden_dir, adapters):
    return Engine.from_pretrained(str(golden_dir / "llava_mha"), lora_modules=adapters, max_loras=3, max_lora_rank=8,
                                  max_num_seqs=4, max_model_len=MAX_LEN)


def run(engine, work):
    return run_work(engine, work, request)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_outputs_do_not_depend_on_batching_or_policy(engine, expected, policy):
    engine.policy = make_policy(policy)
    before = engine.switches
    results = run(engine, workload())
    assert_as_alone(results, expected, [w[4] for w in workload()], policy)
    if policy != "unmerged":
        assert engine.switches > before, f"{policy} never switched on a workload skewed to one adapter"
    engine.pool.unmerge()


def test_a_run_of_mixed_requests_compiles_nothing_new(engine, expected):
    engine.policy = make_policy("valora")
    run(engine, workload())
    programs = engine.compiled_programs()
    engine.policy = make_policy("dlora")
    run(engine, workload(seed=0))
    engine.pool.unmerge()
    assert engine.compiled_programs() == programs


def test_bad_requests_fail_alone(engine, expected):
    engine.policy = make_policy("unmerged")
    bad = [
        (GenerationRequest(adapter="nope", prompt="user : what ? assistant :"), 404, "does not exist"),
        (GenerationRequest(prompt="user : <image> what ? assistant :", images=[b"not an image"]), 400, "decode"),
        (GenerationRequest(prompt=" ".join(["what"] * 70)), 400, "context length"),
        (GenerationRequest(prompt="   "), 400, "empty"),
        (GenerationRequest(prompt="user : what ?", sampling=SamplingParams(top_p=0.0)), 400, "top_p"),
        (GenerationRequest(prompt="user : what ?", sampling=SamplingParams(temperature=-1)), 400, "temperature"),
        (GenerationRequest(prompt="user : <image> what ?"), 400, "image"),
        (GenerationRequest(adapter="peft_lora", prompt="user : what ?", classify="shape"), 404, "classify head"),
    ]
    for req, status, words in bad:
        with pytest.raises(RequestError, match=words) as err:
            engine.submit(req)
        assert err.value.status == status
    results = run(engine, workload()[:6])
    assert [r.token_ids for r in results] == expected[:6]


def test_cancel_frees_the_slot_and_unload_waits_for_running_requests(engine, expected):
    engine.policy = make_policy("unmerged")
    long = engine.submit(request("peft_lora_mlp", "user : what colour ? assistant :", None, 40))
    engine.step()
    assert engine.stats().running == 1
    with pytest.raises(RequestError, match="in use by 1 running"):
        engine.unload_adapter("peft_lora_mlp")
    long.cancel()
    engine.step()
    assert long.result(0).finish_reason == "cancelled" and engine.stats().running == 0
    waiting = engine.submit(request("peft_lora_mlp", "user : what ? assistant :", None, 3))
    engine.unload_adapter("peft_lora_mlp")
    engine.step()
    assert waiting.result(0).finish_reason == "error" and waiting.result(0).status == 404
    with pytest.raises(RequestError, match="does not exist") as err:
        engine.submit(request("peft_lora_mlp", "user : what ? assistant :", None, 3))
    assert err.value.status == 404


def test_sharded_engine_gives_one_devices_outputs(golden_dir, adapters, expected):
    """Tensor parallel (and decode slots over data) on an 8-CPU-device mesh: the same greedy tokens."""
    from valora_jax.sharding import make_mesh

    mesh = make_mesh(data=2, model=4)
    sharded = Engine.from_pretrained(str(golden_dir / "llava_mha"), lora_modules=adapters, max_loras=3,
                                     max_lora_rank=8, max_num_seqs=4, max_model_len=MAX_LEN, mesh=mesh,
                                     policy="unmerged")
    q = sharded.model.language_model.layers[0].self_attn.q_proj
    assert q.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert q.slots.b[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
    work = workload()[:8]
    results = run(sharded, work)
    assert [r.token_ids for r in results] == expected[:8]


def test_stop_strings_streamed_text_and_events(engine, expected):
    """Events carry the text incrementally and end with the Result; a stop string cuts the output there."""
    engine.policy = make_policy("unmerged")
    i = next(k for k, tokens in enumerate(expected) if len(tokens) >= 4)
    _, name, prompt, image, max_tokens = workload()[i]
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True)
    full = decode(expected[i])
    handle = engine.submit(request(name, prompt, image, max_tokens))
    while not handle.done:
        engine.step()
    events = list(handle)
    assert "".join(e.text for e in events[:-1]) == full == events[-1].text
    assert [e.token_id for e in events[:-1]] == expected[i]
    stop = decode(expected[i][2:3]).strip()
    cut = full[:full.find(stop)]
    req = request(name, prompt, image, max_tokens)
    req.sampling = SamplingParams(max_tokens=max_tokens, stop=(stop,))
    handle = engine.submit(req)
    while not handle.done:
        engine.step()
    result = handle.result(0)
    assert result.finish_reason == "stop" and result.text == cut and stop not in result.text
    assert result.token_ids == expected[i][:len(result.token_ids)] and len(result.token_ids) <= 3


def test_an_image_past_pils_decompression_limit_is_a_400(monkeypatch):
    """PIL refuses images whose pixel count could exhaust memory (a decompression bomb): a 400 naming it."""
    import io

    from serve.engine.engine import _open_image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels: more than twice the limit
    with pytest.raises(RequestError, match="the image is too large") as refused:
        _open_image(buffer.getvalue())
    assert refused.value.status == 400
