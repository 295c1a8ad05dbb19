"""`python -m serve.batch`: the OpenAI Batch format in and out, bad rows failing alone, and the demo's
check that serving a run's adapters reproduces the training report's scores."""

import base64
import io
import json
import textwrap

import pytest
from PIL import Image
from safetensors.numpy import load_file

import train.cli
import train.served
from serve.batch import main, parse_lora_modules

pytestmark = [pytest.mark.xdist_group("batch_llava_mha"), pytest.mark.usefixtures("root_logging")]


def data_url(array) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(custom_id, model, text, image=None, **body):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **body}}


def test_batch_file_rows_in_order_with_bad_rows_failing_alone(golden_dir, tmp_path):
    ref = load_file(str(golden_dir / "mixed_batch.outputs.safetensors"))
    image = data_url(ref["images"][0])
    rows = [
        chat("a", "peft_lora", "what colour is the circle ?", image, max_tokens=16),
        "{not json",
        chat("unknown", "nope", "what ?"),
        chat("http", "llava_mha", "what ?", "http://example.com/cat.png"),
        chat("broken-image", "llava_mha", "what ?", "data:image/png;base64," + base64.b64encode(b"png?").decode()),
        chat("too-long", "llava_mha", " ".join(["what"] * 200)),
        chat("two", "llava_mha", "what colour is the circle ?", image, max_tokens=4, n=2),
        {"custom_id": "completion", "method": "POST", "url": "/v1/completions",
         "body": {"model": "peft_lora", "prompt": "user : what colour ? assistant :", "max_tokens": 3,
                  "temperature": 0}},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(golden_dir / "llava_mha"), "--lora-modules", f"peft_lora={golden_dir / 'peft_lora'}",
                 "--max-lora-rank", "8", "--max-model-len", "64", "-i", str(source), "-o", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["custom_id"] for row in got] == ["a", None, "unknown", "http", "broken-image", "too-long", "two",
                                                 "completion"]
    statuses = [row["response"]["status_code"] if row["response"] else None for row in got]
    assert statuses == [200, None, 404, 400, 400, 400, 200, 200]
    for row, words in zip(got[1:6], ("not JSON", "does not exist", "not fetched", "does not decode", "context length")):
        assert words in row["error"]["message"], (row, words)
    # the chat template renders "USER: <image>\n{text} ASSISTANT:", the prompt of the golden mixed batch's row 0
    answer = got[0]["response"]["body"]
    assert answer["object"] == "chat.completion" and answer["model"] == "peft_lora"
    assert answer["usage"]["prompt_tokens"] == ref["input_ids_0"].shape[1]
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 16
    two = got[6]["response"]["body"]
    assert len(two["choices"]) == 2 and two["choices"][0]["message"] == two["choices"][1]["message"]
    assert got[7]["response"]["body"]["object"] == "text_completion"


def test_lora_modules_take_vllms_two_forms():
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == {"a": "/x", "b": "/y"}
    for bad in (["a"], ["=x"], ['{"name": "a"}'], ["a=/x", "a=/y"]):
        with pytest.raises(Exception, match="lora-modules"):
            parse_lora_modules(bad)


SHORT_SUITE = """
    tasks:
      - source: embedded/colour
        requirement: 0.0
        n_train: 8
        n_val: 6
      - source: embedded/location
        requirement: 0.0
        n_train: 8
        n_val: 6
"""


def test_served_answers_reproduce_the_training_reports_scores(golden_dir, tmp_path, capsys):
    """What `make demo` does after training, on a shortened suite: serve.batch over the validation examples
    of every task through one mixed-adapter run, scored like the report."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(textwrap.dedent(SHORT_SUITE))
    out = tmp_path / "run"
    model = str(golden_dir / "llava_mha")
    train.cli.main(["--model", model, "--tasks", str(tasks), "--out", str(out), "--steps", "3", "--batch-size", "4",
                    "--rank", "4", "--eval-batch-size", "4", "--order", "colour", "location"])
    served = out / "served"
    modules = (served / "lora_modules.txt").read_text().split()
    requests = [json.loads(line) for line in (served / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == 12 and {r["body"].get("classify") for r in requests} == {"colour", None}
    assert main(["--model", model, "--lora-modules", *modules, "--max-lora-rank", "4",
                 "-i", str(served / "requests.jsonl"), "-o", str(served / "responses.jsonl")]) == 0
    capsys.readouterr()
    assert train.served.main([str(out)]) == 0, capsys.readouterr().out
    report = {row["name"]: row["adapter_score"] for row in json.loads((out / "report.json").read_text())["tasks"]}
    assert train.served.served_scores(served) == pytest.approx(report, abs=1e-12)
    assert 0 < report["colour"] < 1  # some head answers right and some wrong: the agreement is per example
