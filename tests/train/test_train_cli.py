"""`python -m train` end to end on a local HF checkpoint and a two-task file: outputs exist and agree, and the
fused candidate starts from the accepted adapter."""

import json
import textwrap

import pytest
from PIL import Image

import train.run
from train.cli import job_config, main, parser


def test_job_writes_adapters_and_report(tmp_path, golden_dir, monkeypatch):
    warm_starts = []
    real_new_learner = train.run.new_learner

    def recording_new_learner(*args, warm_start=None):
        warm_starts.append(warm_start)
        return real_new_learner(*args, warm_start=warm_start)

    monkeypatch.setattr(train.run, "new_learner", recording_new_learner)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(textwrap.dedent("""
        tasks:
          - source: embedded/colour
            requirement: 0.0  # always met, so fusion tries colour + location
            n_train: 8
            n_val: 4
          - source: embedded/location
            requirement: 0.7
            n_train: 8
            n_val: 4
    """))
    out = tmp_path / "out"
    main(["--model", str(golden_dir / "llava_mha"), "--tasks", str(tasks), "--out", str(out), "--steps", "2",
          "--batch-size", "4", "--rank", "2", "--eval-batch-size", "4", "--checkpoint-every", "2"])

    # colour alone, then colour + location starting from colour's adapter (then location alone if rolled back)
    assert warm_starts[:2] == [None, out / "trainings" / "colour" / "adapter"]
    assert warm_starts[2:] in ([], [None])
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["colour", "location"]
    adapters = {a["name"]: a for a in report["adapters"]}
    for task in report["tasks"]:
        assert set(task) >= {"name", "metric", "requirement", "base_score", "adapter_score", "adapter"}
        assert 0.0 <= task["adapter_score"] <= 1.0
        assert task["name"] in adapters[task["adapter"]]["tasks"]
    for name, adapter in adapters.items():
        assert adapter["kind"] == "lora" and adapter["rank"] == 2 and adapter["trainable_parameters"] > 0
        saved = out / "adapters" / name
        assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
        assert ("colour" in adapter["tasks"]) == (saved / "head.safetensors").is_file()  # classify head saved
    assert "| colour |" in (out / "report.md").read_text()
    Image.open(out / "accuracy.png").verify()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["adapter"] for line in lines} >= {"colour"} and all("loss" in line for line in lines)


def test_max_grad_norm_flag_defaults_to_one_and_zero_turns_clipping_off():
    assert job_config(parser().parse_args([])).train.max_grad_norm == 1.0
    assert job_config(parser().parse_args(["--max-grad-norm", "0"])).train.max_grad_norm is None


@pytest.mark.parametrize("flags, message", [
    (["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--warmup", "-2"], "warmup and weight_decay must be >= 0"),
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
    (["--rank", "0"], "rank must be >= 1"),
])
def test_out_of_range_flags_are_usage_errors(flags, message, capsys, monkeypatch):
    def no_run(config):
        raise AssertionError(f"ran with {config}")

    monkeypatch.setattr(train.run, "run", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
