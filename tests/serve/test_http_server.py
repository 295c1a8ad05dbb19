"""The HTTP layer against a deterministic fake engine (tests/serve/fake_engine.py), on a live 127.0.0.1 server,
driven by the official `openai` client and by raw HTTP: answers, streaming framing, errors and their
statuses, API keys, overload, runtime adapter loading, metrics, 64 concurrent streams, disconnects.
The fake's answers are computed independently of the server (`expected_answer`)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serve.engine import GenerationRequest, SamplingParams
from serve.http import ServerSettings, create_app
from tests.serve.fake_engine import FakeEngine, expected_answer
from tests.serve.live_server import LiveServer


def data_url(size=(8, 6), colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(text: str, image: str | None = None) -> list[dict]:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]


def engine_request(adapter, text, image_size=None, max_tokens=16, stop=(), seed=None, temperature=0.0):
    """The engine request the server should make of a chat request built by `chat_messages`."""
    content = [{"type": "text", "text": text}]
    images = []
    if image_size is not None:
        content.insert(0, {"type": "image"})
        images = [Image.new("RGB", image_size)]
    return GenerationRequest(adapter=adapter, messages=[{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": content}],
                             images=images, sampling=SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                                                    stop=tuple(stop), seed=seed))


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("media")
    Image.new("RGB", (5, 7)).save(directory / "ok.png")
    return directory


@pytest.fixture(scope="module")
def engine():
    with FakeEngine() as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine, media_dir):
    settings = ServerSettings(allow_runtime_lora_updating=True, allowed_local_media_path=media_dir,
                              model_root="/models/fake", lora_paths={"a": "/adapters/a"})
    with LiveServer(create_app(engine, settings)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path, body=None, *, content=None, headers=None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


# --------------------------------------------------------------------------------------------- answers
def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(client):
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"fake-base", "a", "b"}
    assert cards["fake-base"].parent is None and cards["fake-base"].root == "/models/fake"
    assert cards["a"].parent == "fake-base" and cards["a"].root == "/adapters/a"
    assert cards["b"].parent == "fake-base"
    assert cards["a"].classify_tasks == ["colour"]


@pytest.mark.parametrize("model", ["a", "b", "fake-base"])
def test_chat_with_an_image_answers_what_the_engine_generates(client, model):
    reply = client.chat.completions.create(model=model, messages=chat_messages("what is it?", data_url((8, 6))),
                                           temperature=0, max_tokens=5)
    text, reason = expected_answer(engine_request(None if model == "fake-base" else model, "what is it?",
                                                  (8, 6), max_tokens=5))
    assert reply.choices[0].message.content == text and text
    assert reply.choices[0].finish_reason == reason
    assert reply.model == model and reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.usage.completion_tokens == len(text.split())
    assert reply.usage.prompt_tokens == len("system: be brief\nuser: <image> what is it?".split()) + 4


def test_stop_strings_and_max_completion_tokens_reach_the_engine(client):
    full, _ = expected_answer(engine_request("a", "hello", max_tokens=16))
    stop = full.split()[1][:3]
    reply = client.chat.completions.create(model="a", messages=chat_messages("hello"), temperature=0,
                                           max_completion_tokens=16, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(model="a", messages=chat_messages("hello"), temperature=0,
                                           max_completion_tokens=2)
    assert reply.choices[0].finish_reason == "length" and len(reply.choices[0].message.content.split()) == 2


def collect_stream(stream) -> tuple[dict[int, str], dict[int, str], list]:
    texts, reasons, chunks = {}, {}, []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, chunks


def test_streaming_chat_equals_non_streaming_with_usage_last(client):
    kwargs = dict(model="b", messages=chat_messages("stream me", data_url()), temperature=0, max_tokens=12, n=2)
    whole = client.chat.completions.create(**kwargs)
    texts, reasons, chunks = collect_stream(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert {chunk.id for chunk in chunks} == {chunks[0].id}


def test_sse_framing_ends_with_done(server):
    body = {"model": "a", "prompt": "frame", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert [p["object"] for p in payloads] == ["text_completion"] * len(payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_of_text_and_token_ids(client):
    reply = client.completions.create(model="fake-base", prompt="one two", max_tokens=4, temperature=0, n=2)
    text = expected_answer(GenerationRequest(prompt="one two", sampling=SamplingParams(max_tokens=4)))[0]
    assert [(c.index, c.text) for c in reply.choices] == [(0, text), (1, text)]
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 2 * len(text.split())
    by_ids = client.completions.create(model="a", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == expected_answer(
        GenerationRequest(adapter="a", prompt_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4)))[0]
    texts, _, _ = collect_stream(client.completions.create(model="a", prompt=[5, 6, 7], max_tokens=4,
                                                           temperature=0, stream=True))
    assert texts == {0: by_ids.choices[0].text}


def test_seeded_sampling_is_repeatable(client):
    kwargs = dict(model="a", messages=chat_messages("sample"), temperature=0.8, seed=7, max_tokens=8)
    first, second = (client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    assert first == second == expected_answer(engine_request("a", "sample", max_tokens=8, seed=7,
                                                             temperature=0.8))[0]
    assert first != expected_answer(engine_request("a", "sample", max_tokens=8, seed=8, temperature=0.8))[0]


def test_logprobs_of_the_sampled_tokens(client):
    chat = client.chat.completions.create(model="a", messages=chat_messages("lp"), temperature=0, max_tokens=3,
                                          logprobs=True)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    assert [entry.logprob for entry in content] == [-0.25, -0.5, -0.75]
    text = client.completions.create(model="a", prompt="lp", max_tokens=3, temperature=0, logprobs=0)
    assert text.choices[0].logprobs.token_logprobs == [-0.25, -0.5, -0.75]
    assert text.choices[0].logprobs.text_offset[0] == 0


def test_classify_task_answers_its_label(client):
    reply = client.chat.completions.create(model="a", messages=chat_messages("which colour?", data_url()),
                                           extra_body={"classify": "colour"})
    assert reply.choices[0].message.content.startswith("colour-")
    assert reply.usage.completion_tokens == 0
    texts, _, _ = collect_stream(client.chat.completions.create(
        model="a", messages=chat_messages("which colour?", data_url()), extra_body={"classify": "colour"},
        stream=True))
    assert texts == {0: reply.choices[0].message.content}
    with pytest.raises(openai.BadRequestError, match="no classify task"):
        client.chat.completions.create(model="b", messages=chat_messages("x"), extra_body={"classify": "colour"})


def test_local_image_files_only_under_the_allowed_directory(client, media_dir, tmp_path):
    reply = client.chat.completions.create(model="a", messages=chat_messages("file", f"file://{media_dir}/ok.png"),
                                           temperature=0, max_tokens=4)
    assert reply.choices[0].message.content == expected_answer(engine_request("a", "file", (5, 7), 4))[0]
    Image.new("RGB", (5, 7)).save(tmp_path / "outside.png")
    with pytest.raises(openai.BadRequestError, match="outside the allowed media directory"):
        client.chat.completions.create(model="a", messages=chat_messages("f", str(tmp_path / "outside.png")))


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=chat_messages("hi"))
    error = assert_error(post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404, "`nope`")
    assert error["code"] == "model_not_found" and error["param"] == "model"


BAD_BODIES = {
    "missing model": ({"messages": chat_messages("x")}, "'model'"),
    "missing messages": ({"model": "a"}, "messages"),
    "empty messages": ({"model": "a", "messages": []}, "messages"),
    "wrong-typed max_tokens": ({"model": "a", "messages": chat_messages("x"), "max_tokens": "many"}, "max_tokens"),
    "temperature out of range": ({"model": "a", "messages": chat_messages("x"), "temperature": 200}, "temperature"),
    "top_p zero": ({"model": "a", "messages": chat_messages("x"), "top_p": 0}, "top_p"),
    "role not a string": ({"model": "a", "messages": [{"role": 5, "content": "x"}]}, "role"),
    "unknown part": ({"model": "a", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
                     "unsupported message part"),
    "undecodable image": ({"model": "a", "messages": chat_messages("x", "data:image/png;base64,aGVsbG8=")},
                          "does not decode"),
    "not base64": ({"model": "a", "messages": chat_messages("x", "data:image/png;base64,@@@")}, "base64"),
    "http url": ({"model": "a", "messages": chat_messages("x", "https://example.com/cat.png")}, "not fetched"),
    "prompt too long": ({"model": "a", "messages": chat_messages("word " * 60)}, "exceeds"),
    "top_logprobs": ({"model": "a", "messages": chat_messages("x"), "logprobs": True, "top_logprobs": 2},
                     "top_logprobs"),
    "empty prompt": ({"model": "a", "prompt": []}, "prompt"),
    "several prompts": ({"model": "a", "prompt": ["one", "two"]}, "prompt"),
    "stream not a boolean": ({"model": "a", "prompt": "x", "stream": "yes"}, "'stream'"),
    "logprobs > 0": ({"model": "a", "prompt": "x", "logprobs": 2}, "logprobs"),
    "n out of range": ({"model": "a", "prompt": "x", "n": 0}, "'n'"),
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_input_is_400_with_an_error_object(server, name):
    body, needle = BAD_BODIES[name]
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    assert_error(post(server, path, body), 400, needle)


def test_malformed_json_and_non_object_bodies_are_400(server):
    assert_error(post(server, "/v1/chat/completions", content=b'{"model": "a", "messages": [',
                      headers={"content-type": "application/json"}), 400, "not valid JSON")
    assert_error(post(server, "/v1/completions", ["a", "x"]), 400, "JSON object")


def test_bad_requests_do_not_disturb_others(client, server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            good = [aclient.chat.completions.create(model="a", messages=chat_messages(f"good {i}"), temperature=0,
                                                    max_tokens=6) for i in range(6)]
            bad = [aclient.chat.completions.create(model="a", messages=chat_messages("x", "data:image/png;base64,"
                                                                                     "aGVsbG8=")) for _ in range(6)]
            return await asyncio.gather(*good, *bad, return_exceptions=True)

    results = asyncio.run(main())
    for i, reply in enumerate(results[:6]):
        assert reply.choices[0].message.content == expected_answer(engine_request("a", f"good {i}",
                                                                                  max_tokens=6))[0]
    assert all(isinstance(r, openai.BadRequestError) for r in results[6:])


def test_api_key_is_required_on_v1_paths_only(engine):
    with LiveServer(create_app(engine, ServerSettings(api_key="sesame"))) as server:
        body = {"model": "a", "prompt": "x", "max_tokens": 2}
        error = assert_error(post(server, "/v1/completions", body), 401, "API key")
        assert error["code"] == "invalid_api_key"
        assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(post(server, "/v1/completions", content=b"{", headers={"Authorization": "Bearer x"}), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(**body).choices[0].text
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200


def test_overload_is_429_with_retry_after_and_a_dead_engine_503(media_dir):
    with FakeEngine(max_num_seqs=2, max_waiting=3) as engine, LiveServer(create_app(engine)) as server:
        engine.paused.set()

        async def flood():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                body = {"model": "a", "prompt": "load", "max_tokens": 2, "temperature": 0}
                tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(3)]
                while engine.stats().waiting < 3:
                    await asyncio.sleep(0.01)
                refused = await http.post("/v1/completions", json=body)
                engine.paused.clear()
                return refused, await asyncio.gather(*tasks)

        refused, accepted = asyncio.run(flood())
        assert_error(refused, 429, "waiting")
        assert refused.headers["Retry-After"] == "2"
        assert [r.status_code for r in accepted] == [200, 200, 200]
        assert httpx.get(server.url + "/health").status_code == 200
        engine.kill()
        assert httpx.get(server.url + "/health").status_code == 503
        dead = post(server, "/v1/completions", {"model": "a", "prompt": "x"})
        assert_error(dead, 503, "died")


def test_a_request_failing_in_the_engine_mid_stream_ends_with_an_error_event(media_dir):
    with FakeEngine(step_s=0.01) as engine, LiveServer(create_app(engine)) as server:
        body = {"model": "a", "prompt": "doomed request", "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            engine.kill()
            rest = [line for line in lines if line]
        assert json.loads(rest[-2].removeprefix("data: "))["error"]["message"] == "the engine has died"
        assert rest[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------ runtime adapters
def test_load_use_unload_then_404(client, server, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path)})
    assert loaded.status_code == 200 and "c" in loaded.text
    cards = {card.id: card for card in client.models.list().data}
    assert cards["c"].parent == "fake-base" and cards["c"].root == str(tmp_path)
    reply = client.chat.completions.create(model="c", messages=chat_messages("new"), temperature=0, max_tokens=4)
    assert reply.choices[0].message.content == expected_answer(engine_request("c", "new", max_tokens=4))[0]
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path)}), 400,
                 "already loaded")
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="c", messages=chat_messages("new"))
    assert "c" not in {card.id for card in client.models.list().data}
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}), 404, "'c'")


def test_loading_a_missing_adapter_names_it_and_changes_nothing(client, server, tmp_path):
    before = [card.id for card in client.models.list().data]
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "ghost", "lora_path": str(tmp_path / "no")}),
                 404, "ghost")
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "fake-base", "lora_path": str(tmp_path)}),
                 400, "base model")
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "x"}), 400, "lora_path")
    assert [card.id for card in client.models.list().data] == before


def test_runtime_updating_is_off_unless_allowed(engine, tmp_path):
    with LiveServer(create_app(engine)) as server:
        response = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(tmp_path)})
        assert_error(response, 404)


# ----------------------------------------------------------------------------------------------- metrics
def scrape(server) -> dict[str, list]:
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def sample_value(families, family, sample_name, **labels) -> float:
    values = [s.value for s in families.get(family, []) if s.name == sample_name
              and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(values)


def test_metrics_parse_and_move_as_requests_run(client):
    with FakeEngine(max_num_seqs=1) as engine, LiveServer(create_app(engine)) as server:
        before = scrape(server)
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                     "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info", "valora:loaded_adapters",
                     "valora:mode_info", "valora:mode_switches", "valora:requests",
                     "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds"):
            assert name in before, name
        assert sample_value(before, "valora:loaded_adapters", "valora:loaded_adapters") == 2
        engine.paused.set()

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                tasks = [asyncio.create_task(http.post("/v1/completions", json={
                    "model": model, "prompt": "metric", "max_tokens": 4, "temperature": 0}))
                    for model in ("a", "b", "b")]
                while engine.stats().waiting < 3:
                    await asyncio.sleep(0.01)
                engine.paused.clear()
                while engine.stats().running < 1:
                    await asyncio.sleep(0.001)
                engine.paused.set()
                during = scrape(server)
                engine.paused.clear()
                await asyncio.gather(*tasks)
                return during

        during = asyncio.run(run())
        assert sample_value(during, "vllm:num_requests_running", "vllm:num_requests_running") == 1
        assert sample_value(during, "vllm:num_requests_waiting", "vllm:num_requests_waiting",
                            model_name="fake-base") == 2
        assert sample_value(during, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 1.0
        (info,) = during["vllm:lora_requests_info"]
        running = info.labels["running_lora_adapters"]
        assert info.labels["max_lora"] == "8" and running in ("a", "b")
        assert info.labels["waiting_lora_adapters"] == ("b" if running == "a" else "a,b")
        assert abs(info.value - time.time()) < 60
        after = scrape(server)
        assert sample_value(after, "valora:requests", "valora:requests_total", model="b", outcome="length") == 2
        assert sample_value(after, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count",
                            model_name="a") == 1
        assert sample_value(after, "vllm:time_per_output_token_seconds",
                            "vllm:time_per_output_token_seconds_count", model_name="b") == 6
        assert sample_value(after, "vllm:num_requests_waiting", "vllm:num_requests_waiting") == 0
        post(server, "/v1/completions", {"model": "zzz", "prompt": "x"})
        assert sample_value(scrape(server), "valora:requests", "valora:requests_total", model="unknown",
                            outcome="error") == 1


# ----------------------------------------------------------------------------------------- concurrency
def test_64_concurrent_streaming_clients_each_get_their_serial_answer(client, server):
    models = ["a", "b", "fake-base"]
    prompts = [(models[i % 3], f"client {i} asks", 4 + i % 9) for i in range(64)]
    serial = [client.chat.completions.create(model=m, messages=chat_messages(p), temperature=0,
                                             max_tokens=k).choices[0].message.content for m, p, k in prompts]

    async def one(aclient, model, prompt, limit):
        stream = await aclient.chat.completions.create(model=model, messages=chat_messages(prompt), temperature=0,
                                                       max_tokens=limit, stream=True)
        text, reason = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, *p) for p in prompts))

    results = asyncio.run(main())
    assert [text for text, _ in results] == serial
    assert all(reason in ("stop", "length") for _, reason in results)


def test_a_client_that_disconnects_mid_stream_cancels_its_request(server, engine):
    body = {"model": "a", "prompt": "leave early " * 3, "max_tokens": 12, "temperature": 0, "stream": True}
    engine.step_s = 0.05
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            next(response.iter_lines())
        deadline = time.monotonic() + 10
        while not any(r.finish_reason == "cancelled" for r in engine.finished) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.step_s = 0.002
    assert any(r.finish_reason == "cancelled" for r in engine.finished)
