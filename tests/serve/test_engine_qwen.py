"""The serving engine on Qwen-VL (the golden tiny random Qwen2.5-VL and Qwen2-VL checkpoints: patch 4, merge 2).

Reference, as for LLaVA (test_engine.py): each request generated alone (batch 1) by `Generator` on the
base model with its adapter attached, greedy, float32. The engine runs 10 requests for three adapters
(two LoRAs, one of them on the vision tower too, and a Serial LoRA on the decoder) and the base model,
given as prompts, token ids and chat messages (the family's ChatML template: the checkpoint ships none),
with images of three sizes (two of them in one patch bucket, one in the next), one prompt with two
images, text-only prompts, arrivals over four steps.
"""

import base64
import io
import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from serve.batch import main as batch_main
from serve.engine import GenerationRequest, RequestError, SamplingParams
from serve.engine.engine import Engine
from serve.policy import POLICIES, make_policy
from tests.serve.engine_runs import Alone, assert_as_alone, run, save_random_adapter
from valora_jax import chat
from valora_jax.adapters import AdapterConfig
from valora_jax.adapters.heads import ClassifyHeads, load_heads

pytestmark = pytest.mark.xdist_group("engine_qwen")  # one worker builds the engine and the references

MAX_LEN = 96
REF_LEN = 144  # the reference's cache: its prompt buckets are not capped at MAX_LEN - max_tokens as the engine's
DECODER = ("language_model",)
ADAPTERS = {
    "lora_a": AdapterConfig(kind="lora", rank=4, alpha=8, towers=DECODER, targets=("q_proj", "v_proj")),
    "lora_b": AdapterConfig(kind="lora", rank=2, alpha=4, towers=("visual", *DECODER),
                            targets=("qkv", "o_proj", "up_proj", "down_proj")),
    "serial": AdapterConfig(kind="serial_lora", rank=2, alpha=2, towers=DECODER, targets=("self_attn",)),
}
HEAD = {"colour": ("red", "green", "blue", "yellow")}
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
# (arrival step, adapter, prompt kind, text, image sizes (height, width), max_tokens); lora_a has 5 of 10.
# 16x16 and 24x16 pixels are 16 and 24 patches (patch bucket 64), 48x40 is 120 (bucket 128).
WORKLOAD = [
    (0, "lora_a", "prompt", "what colour is the circle", [(16, 16)], 6),
    (0, "lora_a", "messages", "how many shapes are there", [(24, 16)], 4),
    (0, None, "prompt", "what is in this picture", [], 5),
    (1, "lora_a", "prompt_ids", "where is the square", [(48, 40)], 5),
    (1, "serial", "messages", "which shape is red", [(16, 16), (24, 16)], 6),
    (1, "lora_a", "prompt", "count the objects", [], 3),
    (2, "lora_b", "prompt", "find the blue star", [(24, 16)], 5),
    (2, "lora_a", "messages", "answer with one word", [(16, 16)], 6),
    (2, None, "messages", "what colour is the ring", [(48, 40)], 4),
    (3, "lora_b", "prompt", "is there a green cross", [(48, 40)], 4),
]


def images_of(sizes, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def messages_of(text, n_images):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def prompt_text(engine, kind, text, n_images):
    """The prompt as the engine reads it: raw text with one vision block per image, or the chat rendering."""
    if kind == "messages":
        return chat.render(engine.tokenizer, messages_of(text, n_images), engine.chat_template)
    return f"user : {VISION * n_images} {text} ? assistant :"


def make_request(engine):
    def request(adapter, kind, text, sizes, max_tokens, seed):
        images = images_of(sizes, seed)
        sampling = SamplingParams(max_tokens=max_tokens)
        if kind == "messages":
            return GenerationRequest(adapter=adapter, messages=messages_of(text, len(images)), images=images,
                                     sampling=sampling)
        prompt = prompt_text(engine, kind, text, len(images))
        if kind == "prompt_ids":
            ids = engine.processor(text=[prompt], images=images or None, return_tensors="np")["input_ids"][0]
            return GenerationRequest(adapter=adapter, prompt_ids=ids.tolist(), images=images, sampling=sampling)
        return GenerationRequest(adapter=adapter, prompt=prompt, images=images, sampling=sampling)
    return request


def work():
    """The workload with each request's image seed appended to its arguments."""
    return [(*w, seed) for seed, w in enumerate(WORKLOAD)]


@pytest.fixture(scope="module")
def qwen_dir(golden_dir):
    return golden_dir / "qwen2_5_vl"


@pytest.fixture(scope="module")
def adapters(qwen_dir, tmp_path_factory):
    """name -> directory of `ADAPTERS`, random; lora_a also has a classify head (`HEAD`, random)."""
    root = tmp_path_factory.mktemp("qwen_adapters")
    out = {name: save_random_adapter(qwen_dir, config, root / name, seed=seed)
           for seed, (name, config) in enumerate(ADAPTERS.items())}
    hidden = json.loads((qwen_dir / "config.json").read_text())["text_config"]["hidden_size"]
    heads = ClassifyHeads(hidden, HEAD, rngs=nnx.Rngs(0))
    heads.kernel.set_value(np.random.default_rng(0).standard_normal(heads.kernel.shape).astype(np.float32))
    heads.save(out["lora_a"])
    return out


@pytest.fixture(scope="module")
def engine(qwen_dir, adapters):
    return Engine.from_pretrained(str(qwen_dir), lora_modules=adapters, max_loras=3, max_lora_rank=4,
                                  max_num_seqs=3, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def alone(qwen_dir, adapters):
    return Alone(qwen_dir, adapters, max_len=REF_LEN, longest=max(w[5] for w in WORKLOAD))


@pytest.fixture(scope="module")
def expected(alone, engine):
    return [alone.tokens(adapter, prompt_text(engine, kind, text, len(sizes)), images_of(sizes, seed), max_tokens)
            for _, adapter, kind, text, sizes, max_tokens, seed in work()]


# label -> (policy, its parameters); "valora-starving": every waiting request starves at once
POLICY_RUNS = {name: (name, {}) for name in POLICIES} | {"valora-starving": ("valora", {"starve_after": 0.0})}


@pytest.mark.parametrize("name", sorted(POLICY_RUNS))
def test_outputs_do_not_depend_on_batching_or_policy(engine, expected, name):
    policy, params = POLICY_RUNS[name]
    engine.policy = make_policy(policy, **params)
    before, modes = engine.switches, set()
    results = run(engine, work(), make_request(engine), modes)
    assert_as_alone(results, expected, [w[5] for w in WORKLOAD], name)
    if name == "unmerged":
        assert modes == {"unmerged"}
    else:
        assert engine.switches > before, f"{name} never switched on a workload skewed to one adapter"
    if name == "valora-starving":  # starving requests of other adapters join the merged one's batch
        assert "mixture" in modes, modes
    engine.pool.unmerge()


def test_sharded_engine_gives_one_devices_outputs(qwen_dir, adapters, expected):
    """Tensor parallel (and decode slots over data) on an 8-CPU-device mesh, the hot adapter merged and the
    others (one on the vision tower) in mixture: the greedy tokens of one device."""
    from valora_jax.sharding import make_mesh

    sharded = Engine.from_pretrained(str(qwen_dir), lora_modules=adapters, max_loras=3, max_lora_rank=4,
                                     max_num_seqs=4, max_model_len=MAX_LEN, mesh=make_mesh(data=2, model=4),
                                     policy="valora", policy_params={"starve_after": 0.0})
    qkv = sharded.model.visual.blocks[0].attn.qkv
    assert qkv.slots.b[...].sharding.spec[-1] == "model"
    modes = set()
    results = run(sharded, work()[:7], make_request(sharded), modes)
    assert_as_alone(results, expected[:7], [w[5] for w in WORKLOAD[:7]], "sharded")
    assert "mixture" in modes, modes


# Images of sizes the workload does not have, whose patches and prompts fall in buckets it compiles:
# request 0: 8x32 pixels (16 patches, 4 tokens, as its 16x16), request 3: 40x48 (120 patches, as its 48x40),
# request 6: 32x24 (48 patches, 12 tokens: prompt bucket 32 and patch bucket 64, as its 24x16).
NEW_SIZES = {0: [(8, 32)], 3: [(40, 48)], 6: [(32, 24)]}


def test_new_image_sizes_in_compiled_buckets_compile_nothing(engine, expected):
    """Compiled programs: the workload again under the same (deterministic) policies, with images of new
    sizes in compiled buckets, adds none; the other requests' tokens are unchanged."""
    def one_pass(items):
        results = []
        for policy, params in (POLICY_RUNS["unmerged"], POLICY_RUNS["valora-starving"]):
            engine.policy = make_policy(policy, **params)
            results += run(engine, items, make_request(engine))
            engine.pool.unmerge()
        return results

    one_pass(work())
    programs = engine.compiled_programs()
    resized = [(*w[:4], NEW_SIZES.get(i, w[4]), *w[5:]) for i, w in enumerate(work())]
    results = one_pass(resized)
    assert engine.compiled_programs() == programs
    for i, result in enumerate(results):
        k = i % len(expected)
        assert result.finish_reason in ("stop", "length") and result.error is None, (k, result)
        if k not in NEW_SIZES:
            assert result.token_ids == expected[k], k


def test_image_tokens_that_do_not_match_the_images_are_refused(engine, expected):
    engine.policy = make_policy("unmerged")
    image_pad, image = engine.config.image_token_id, images_of([(16, 16)], 0)  # 16 patches: 4 image tokens
    one_short = engine.processor(text=[prompt_text(engine, "prompt", "what", 1)], images=image,
                                 return_tensors="np")["input_ids"][0].tolist()
    one_short.remove(image_pad)
    bad = [
        (GenerationRequest(prompt=f"user : {VISION} what ? assistant :"), "more <|image_pad|> in the text than images"),
        (GenerationRequest(prompt="user : what ? assistant :", images=image), "more images than"),
        (GenerationRequest(messages=messages_of("what", 0), images=image), "more images than"),
        (GenerationRequest(prompt_ids=one_short, images=image), "3 <|image_pad|> tokens in input_ids but .* gives 4"),
        (GenerationRequest(prompt_ids=[9, image_pad, 11]), "1 <|image_pad|> tokens in input_ids but .* gives 0"),
        (GenerationRequest(prompt_ids=[9, engine.config.video_token_id, 11]), "videos are not supported"),
    ]
    for request, words in bad:
        with pytest.raises(RequestError, match=words.replace("|", r"\|")) as err:
            engine.submit(request)
        assert err.value.status == 400
    results = run(engine, work()[:4], make_request(engine))
    assert [r.token_ids for r in results] == expected[:4]


# Classify prompts: one prompt bucket (16 tokens) and one patch bucket, images of two sizes; the last tokens
# differ (a tiny random model's last hidden state depends mostly on its token).
CLASSIFY = [("what colour is the circle", [(16, 16)]), ("where is the red square", [(8, 32)]),
            ("how many shapes are there", [(16, 16)]), ("find the blue star", [(8, 32)])]


@nnx.jit
def last_hidden(model, ids, vision, mask, positions):
    return model.hidden_states(ids, vision, mask, positions)[0][:, -1]


def test_classify_answers_from_the_head_over_the_prompt_alone(engine, adapters, alone):
    """A classify request's label is its head's argmax over the last hidden state of its prompt alone (images
    and M-RoPE positions included) with its adapter attached."""
    engine.policy = make_policy("unmerged")
    model = alone.generator("lora_a")[0].model
    heads = load_heads(adapters["lora_a"])
    want, handles = [], []
    for seed, (text, sizes) in enumerate(CLASSIFY):
        prompt, images = f"user : {VISION} {text}", images_of(sizes, seed)
        inputs = engine.processor(text=[prompt], images=images, return_tensors="np")
        vision, positions = model.generation_inputs(inputs["input_ids"], inputs["attention_mask"],
                                                    inputs["pixel_values"], inputs["image_grid_thw"])
        hidden = last_hidden(model, inputs["input_ids"], vision, inputs["attention_mask"], positions)
        scores = np.asarray(heads(hidden, np.zeros(1, np.int32)))[0, :len(HEAD["colour"])]
        want.append(HEAD["colour"][int(np.argmax(scores))])
        handles.append(engine.submit(GenerationRequest(adapter="lora_a", prompt=prompt, images=images,
                                                       classify="colour")))
    while not all(h.done for h in handles):
        engine.step()
    assert [h.result(0).label for h in handles] == want
    assert len(set(want)) > 1, "every prompt has the same label: the check cannot tell prompts apart"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_serve_batch_on_a_qwen2_vl_directory(golden_dir, tmp_path, root_logging):
    """`python -m serve.batch --model <Qwen2-VL dir>`: a chat row with an image for an adapter answers what
    `Generator` gives that prompt alone with the adapter attached; a prompt whose image placeholder has no
    image fails alone with a 400."""
    model_dir = golden_dir / "qwen2_vl"
    adapter = save_random_adapter(model_dir, ADAPTERS["lora_a"], tmp_path / "lora_a", seed=7)
    image = images_of([(24, 16)], 5)[0]
    text = "what colour is the circle ?"
    rows = [
        {"custom_id": "image", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "lora_a", "max_tokens": 6, "temperature": 0, "messages": [
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                          {"type": "text", "text": text}]}]}},
        {"custom_id": "no-image", "method": "POST", "url": "/v1/completions",
         "body": {"model": "qwen2_vl", "prompt": f"user : {VISION} what ? assistant :", "max_tokens": 3}},
    ]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert batch_main(["--model", str(model_dir), "--lora-modules", f"lora_a={adapter}", "--max-lora-rank", "4",
                       "--max-model-len", str(MAX_LEN), "-i", str(source), "-o", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["custom_id"] for row in got] == ["image", "no-image"]
    assert got[1]["response"]["status_code"] == 400 and "<|image_pad|>" in got[1]["error"]["message"]

    alone = Alone(model_dir, {"lora_a": adapter}, max_len=REF_LEN, longest=6)
    generator, processor = alone.generator("lora_a")
    prompt = chat.render(processor.tokenizer, messages_of(text, 1), chat.chat_template(generator.model, processor))
    tokens = alone.tokens("lora_a", prompt, [image], 6)
    answer = got[0]["response"]["body"]
    assert got[0]["response"]["status_code"] == 200 and answer["model"] == "lora_a"
    assert answer["usage"]["completion_tokens"] == len(tokens) > 0
    assert answer["choices"][0]["message"]["content"] == processor.tokenizer.decode(tokens, skip_special_tokens=True)
