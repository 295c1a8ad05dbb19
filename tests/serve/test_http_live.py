"""The server over the real engine: the tiny LLaVA of tests/golden/llava_mha with two PEFT adapters made by
`make golden`, on a live 127.0.0.1 server, driven by the official `openai` client. Greedy answers through
HTTP equal `serve.batch`'s for the same bodies (the HTTP layer adds nothing and loses nothing),
streaming equals non-streaming, concurrent clients over both adapters and the base each get their serial
answer, models are listed with their parent, adapters load and unload at runtime, and `python -m serve`
starts, serves and stops on SIGTERM. Few requests, short outputs: each new adapter / batch shape compiles.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file, save_file

from serve.batch import run_batch
from serve.engine import Engine
from serve.http import ServerSettings, create_app
from tests.serve.live_server import LiveServer
from tests.serve.test_serve_cli import ROOT, free_port

# One engine for the module, in one xdist worker: its compilations are the module's cost.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("http_live")]

MODEL = ROOT / "tests/golden/llava_mha"
ADAPTERS = {"lora": str(ROOT / "tests/golden/peft_lora"), "lora_mlp": str(ROOT / "tests/golden/peft_lora_mlp")}
MODELS = ["lora", "lora_mlp", "llava_mha"]
MAX_TOKENS = 6


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def question(index: int) -> str:
    return f"what is in picture {index}?"


def openai_messages(index: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(index))}},
                                         {"type": "text", "text": question(index)}]}]


@pytest.fixture(scope="module")
def engine():
    # policy "unmerged": the answers do not depend on the policy, and merging would compile more programs.
    with Engine.from_pretrained(str(MODEL), lora_modules=ADAPTERS, max_num_seqs=4, policy="unmerged") as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(engine) -> dict[tuple[str, int], str]:
    """`serve.batch`'s greedy answer to each (model, picture) the tests ask about: the same bodies through
    the same engine, without HTTP."""
    lines = [json.dumps({"custom_id": model, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "messages": openai_messages(i), "temperature": 0,
                                  "max_tokens": MAX_TOKENS}}) for i, model in enumerate(MODELS)]
    rows = run_batch(engine, lines, progress=False)
    assert [row["error"] for row in rows] == [None] * len(MODELS), rows
    answers = {(model, i): rows[i]["response"]["body"]["choices"][0]["message"]["content"]
               for i, model in enumerate(MODELS)}
    assert all(answers.values())
    return answers


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(allow_runtime_lora_updating=True, model_root=str(MODEL), lora_paths=ADAPTERS)
    with LiveServer(create_app(engine, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_with_an_image_for_two_adapters_and_the_base(client, reference):
    for i, model in enumerate(MODELS):
        reply = client.chat.completions.create(model=model, messages=openai_messages(i), temperature=0,
                                               max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == reference[model, i], model
        assert reply.usage.completion_tokens <= MAX_TOKENS and reply.usage.prompt_tokens > 16
        chunks = list(client.chat.completions.create(model=model, messages=openai_messages(i), temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference[model, i], model
        assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert len({reference[model, i] for i, model in enumerate(MODELS)}) == 3


def test_models_are_listed_with_the_base_as_parent(client):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == set(MODELS)
    assert cards["llava_mha"].parent is None
    assert {cards[name].parent for name in ADAPTERS} == {"llava_mha"}
    assert cards["lora"].root == ADAPTERS["lora"]


def test_64_concurrent_streams_over_both_adapters_and_the_base_get_their_serial_answers(server, reference):
    asked = [(MODELS[k % 3], k % 3) for k in range(64)]

    async def one(aclient, model, index):
        stream = await aclient.chat.completions.create(model=model, messages=openai_messages(index),
                                                       temperature=0, max_tokens=MAX_TOKENS, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, model, i) for model, i in asked))

    assert asyncio.run(main()) == [reference[model, i] for model, i in asked]


def test_errors_from_the_engine_keep_their_status(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=openai_messages(0))
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="lora", prompt="word " * 200, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="does not decode"):
        client.chat.completions.create(model="lora", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}])


def test_load_use_unload_then_404(client, server, tmp_path):
    missing = httpx.post(server.url + "/v1/load_lora_adapter",
                         json={"lora_name": "ghost", "lora_path": str(tmp_path / "none")}, timeout=60)
    assert missing.status_code == 404 and "'ghost'" in missing.json()["error"]["message"], missing.text
    broken, misfit = tmp_path / "broken", tmp_path / "misfit"
    shutil.copytree(ADAPTERS["lora"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(ADAPTERS["lora"], misfit)  # every lora_A 8 inputs wider than the base's projection
    tensors = load_file(misfit / "adapter_model.safetensors")
    save_file({k: np.zeros((v.shape[0], v.shape[1] + 8), v.dtype) if "lora_A" in k else v
               for k, v in tensors.items()}, misfit / "adapter_model.safetensors")
    for name, path, needle in (("broken", broken, "broken"), ("misfit", misfit, "expected")):
        response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                              timeout=60)
        assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    assert {card.id for card in client.models.list().data} == set(MODELS)

    loaded = httpx.post(server.url + "/v1/load_lora_adapter",
                        json={"lora_name": "again", "lora_path": ADAPTERS["lora"]}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert {card.id: card.parent for card in client.models.list().data}["again"] == "llava_mha"
    reply = client.chat.completions.create(model="again", messages=openai_messages(0), temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == client.chat.completions.create(
        model="lora", messages=openai_messages(0), temperature=0, max_tokens=MAX_TOKENS).choices[0].message.content
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="again", messages=openai_messages(0))


def scrape(server) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}


def finished(families, model: str) -> float:
    return sum(s.value for s in families["valora:requests"] if s.name == "valora:requests_total"
               and s.labels["model"] == model and s.labels["outcome"] in ("stop", "length"))


def test_metrics_count_what_ran(client, server):
    before = scrape(server)
    client.chat.completions.create(model="lora_mlp", messages=openai_messages(1), temperature=0,
                                   max_tokens=MAX_TOKENS)
    families = scrape(server)
    assert finished(families, "lora_mlp") == finished(before, "lora_mlp") + 1
    (info,) = families["vllm:lora_requests_info"]
    assert info.labels["max_lora"] == "8"
    assert [s.value for s in families["valora:loaded_adapters"]] == [2]


def test_python_m_serve_starts_serves_and_stops_on_sigterm():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "serve", "--model", str(MODEL), "--lora-modules", f"lora={ADAPTERS['lora']}",
         "--port", str(port), "--api-key", "k"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.1)
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("llava_mha", None), ("lora", "llava_mha")]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in output, output
