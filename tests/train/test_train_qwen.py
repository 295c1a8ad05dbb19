"""`python -m train` on a Qwen2-VL directory: prompts from its chat template, the training batch's vision
inputs (an attention group per image) and M-RoPE positions equal to the model's own preparation, and the
whole job (fusion, data parallel over two devices, adapters on both towers, report, served requests,
which `serve.batch` answers with the report's scores)."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import serve.batch
import train.served
from train.cli import main
from train.encoding import Encoder, model_inputs
from train.run import load_base
from train.tasks import Example, Task

pytestmark = pytest.mark.usefixtures("root_logging")  # main() configures the root logger

# A template in the tiny word-level vocabulary (the family's ChatML default has tokens it lacks).
TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : {% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
            "{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
SIZE = 16  # 4 x 4 patches of 4 pixels: 4 decoder tokens per image

@pytest.fixture(scope="module")
def qwen_dir(golden_dir, tmp_path_factory):
    """The tiny Qwen2-VL checkpoint with a chat template of its own."""
    directory = tmp_path_factory.mktemp("qwen2_vl")
    shutil.copytree(golden_dir / "qwen2_vl", directory, dirs_exist_ok=True)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


def test_encoded_batch_gives_the_models_own_logits(qwen_dir):
    """Prompts render with the directory's template; `model_inputs` (a vision group per image, M-RoPE
    positions) gives the logits the model computes from the processor's arrays itself."""
    model, processor = load_base(str(qwen_dir))
    encoder = Encoder.for_model(model, processor, SIZE)
    assert encoder.chat_prompt("what colour ?") == (
        "user : <|vision_start|><|image_pad|><|vision_end|>what colour ? assistant :")
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8), "red") for _ in range(4)]
    task = Task("colour", "lm", "accuracy", 0.5, "what colour ?", examples[:3], examples[3:])
    encoder = encoder.fitted([task])
    batch = {"image": np.stack([ex.image for ex in task.train]), "prompt": [task.prompt] * 3,
             "answer": [ex.answer for ex in task.train], "label": np.full(3, -1, np.int32)}
    arrays = encoder.encode(batch, lm_rows=np.ones(3, bool))
    assert arrays["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    want = np.asarray(model(arrays["input_ids"], arrays["pixel_values"], arrays["image_grid_thw"],
                            arrays["attention_mask"]))
    prepared = model_inputs(model, arrays)
    assert prepared["pixel_values"].pixel_values.shape[:2] == (3, 16)  # a group per image, unpadded
    assert prepared["position_ids"].shape == (3, *arrays["input_ids"].shape)
    hidden, _ = model.hidden_states(prepared["input_ids"], prepared["pixel_values"], prepared["attention_mask"],
                                    prepared["position_ids"])
    got = np.asarray(model.logits(hidden))
    keep = arrays["attention_mask"].astype(bool)
    assert np.abs(got - want)[keep].max() <= 1e-5 * np.abs(want[keep]).max()


def test_job_trains_qwen_adapters_on_both_towers_and_serves_them(qwen_dir, tmp_path, two_tasks, capsys):
    tasks = two_tasks
    out = tmp_path / "out"
    main(["--model", str(qwen_dir), "--tasks", str(tasks), "--out", str(out), "--steps", "3", "--batch-size", "4",
          "--rank", "2", "--eval-batch-size", "4", "--checkpoint-every", "3", "--image-size", str(SIZE),
          "--data-parallel", "2"])
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["colour", "location"]
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["loss"]) for line in losses)
    for adapter in report["adapters"]:
        saved = out / "adapters" / adapter["name"]
        config = json.loads((saved / "adapter_config.json").read_text())
        weights = load_file(saved / "adapter_model.safetensors")
        assert any(".visual." in k for k in weights) and any(".language_model." in k for k in weights), config
        assert all(np.isfinite(v).all() for v in weights.values())
    requests = [json.loads(line) for line in (out / "served" / "requests.jsonl").read_text().splitlines()]
    assert len(requests) == 8 and {r["body"]["model"] for r in requests} <= {a["name"] for a in report["adapters"]}
    record = json.loads((out / "run.json").read_text())
    assert record["flags"]["image_size"] == SIZE and record["flags"]["towers"] is None
    # Served as `make demo` serves: serve.batch renders the chat requests with the same template, and every
    # task scores as the report says.
    served = out / "served"
    modules = (served / "lora_modules.txt").read_text().split()
    assert serve.batch.main(["--model", str(qwen_dir), "--lora-modules", *modules, "--max-lora-rank", "2",
                             "-i", str(served / "requests.jsonl"), "-o", str(served / "responses.jsonl")]) == 0
    capsys.readouterr()
    assert train.served.main([str(out)]) == 0, capsys.readouterr().out
    scores = {row["name"]: row["adapter_score"] for row in report["tasks"]}
    assert train.served.served_scores(served) == pytest.approx(scores, abs=1e-12)


def test_a_tower_the_model_lacks_is_a_clear_error(qwen_dir, tmp_path, two_tasks):
    tasks = two_tasks
    with pytest.raises(SystemExit, match="--towers vision_tower: not a part of this model; its parts are visual "
                                         "language_model"):
        main(["--model", str(qwen_dir), "--tasks", str(tasks), "--out", str(tmp_path / "out"),
              "--towers", "vision_tower"])
