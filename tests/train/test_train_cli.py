"""`python -m train` end to end on a local HF checkpoint and a two-task file: outputs exist and agree, the
fused candidate starts from the accepted adapter, and `--out X --resume` alone reuses the finished run.
Then the run folder's guards, which act before any model loads: a run is never replaced unasked or by a
run that fails validation, and --resume takes the recorded settings."""

import json

import pytest
from PIL import Image

import train.run
from train.cli import job_config, main, parser, recorded_flags
from train.run_folder import RECORD_FILE, write_record

pytestmark = pytest.mark.usefixtures("root_logging")  # main() configures the root logger

def test_job_writes_adapters_and_report(tmp_path, two_tasks, golden_dir, monkeypatch, capsys):
    warm_starts = []
    real_new_learner = train.run.new_learner

    def recording_new_learner(*args, warm_start=None):
        warm_starts.append(warm_start)
        return real_new_learner(*args, warm_start=warm_start)

    monkeypatch.setattr(train.run, "new_learner", recording_new_learner)
    tasks = two_tasks
    out = tmp_path / "out"
    main(["--model", str(golden_dir / "llava_mha"), "--tasks", str(tasks), "--out", str(out), "--steps", "2",
          "--batch-size", "4", "--rank", "2", "--eval-batch-size", "4", "--checkpoint-every", "2"])
    printed = capsys.readouterr().err
    assert "INFO train.run: colour: colour " in printed  # each training's scores print

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
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["tasks_text"] == tasks.read_text() and record["tasks_file"] == str(tasks.resolve())
    assert record["flags"]["steps"] == 2 and record["flags"]["model"] == str((golden_dir / "llava_mha").resolve())

    # the README's resume, as written: the settings come from run.json, every training is reused
    tasks.write_text("tasks: []\n")  # the recorded task file is what resumes, not the file as it is now
    first_report = (out / "report.json").read_text()
    trained = len(warm_starts)
    main(["--out", str(out), "--resume"])
    printed = capsys.readouterr().err
    assert len(warm_starts) == trained  # nothing trained again
    for training in ["colour", "colour+location"] + (["location"] if trained == 3 else []):
        assert f"{training}: reusing the finished training in {out / 'trainings' / training}" in printed
    assert (out / "report.json").read_text() == first_report


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
    (["--data-parallel", "16"], "--data-parallel 16 must be a multiple of the 1 processes and at most their 8 devices"),
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id 2 is not one of"),
])
def test_out_of_range_flags_are_usage_errors(flags, message, capsys, monkeypatch):
    def no_run(config):
        raise AssertionError(f"ran with {config}")

    monkeypatch.setattr(train.run, "run", no_run)
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def a_recorded_run(tasks, *flags) -> tuple:
    """A run folder beside the task file `tasks`, as a started run leaves it (run.json, a result, a report)."""
    out = tasks.parent / "out"
    (out / "trainings" / "colour").mkdir(parents=True)
    write_record(out, recorded_flags(parser().parse_args(["--tasks", str(tasks), *flags])), tasks.resolve(),
                 tasks.read_text())
    (out / "trainings" / "colour" / "result.json").write_text('{"scores": {"colour": 0.5}}')
    (out / "report.json").write_text("{}")
    return out, tasks


def contents(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_folder_holding_a_run_is_refused_and_kept(two_tasks, capsys):
    out, tasks = a_recorded_run(two_tasks)
    before = contents(out)
    with pytest.raises(SystemExit, match="already holds a run .*--resume.*--overwrite"):
        main(["--tasks", str(tasks), "--out", str(out)])
    assert contents(out) == before


def test_overwrite_with_a_bad_task_file_fails_before_touching_the_run(tmp_path, two_tasks):
    out, tasks = a_recorded_run(two_tasks)
    before = contents(out)
    typo = tmp_path / "typo.yaml"
    typo.write_text(tasks.read_text().replace("requirement: 0.7", "requirment: 0.7"))
    with pytest.raises(SystemExit, match="field 'requirment': unknown"):
        main(["--tasks", str(typo), "--out", str(out), "--overwrite"])
    assert contents(out) == before


def test_resume_takes_the_recorded_settings_and_a_conflicting_flag_is_named(two_tasks, capsys, monkeypatch):
    out, tasks = a_recorded_run(two_tasks, "--steps", "7", "--rank", "4", "--towers", "language_model")
    started = []
    monkeypatch.setattr(train.run, "run", started.append)
    main(["--out", str(out), "--resume", "--steps", "7"])  # a flag equal to the record is fine
    (config,) = started
    assert (config.train.steps, config.adapter.rank, config.adapter.towers) == (7, 4, ("language_model",))
    assert config.resume and config.tasks == tasks.resolve() and config.tasks_text == tasks.read_text()

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--resume", "--rank", "8"])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--rank 8 conflicts with the run being resumed" in message
    assert "(--rank 4, recorded in" in message


def test_resume_runs_as_many_processes_as_the_run_it_continues(two_tasks):
    out, _ = a_recorded_run(two_tasks)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["flags"]["processes"] == 1
    record["flags"]["processes"] = 2
    (out / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="ran as 2 processes and this job has 1; resume it with 2"):
        main(["--out", str(out), "--resume"])


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "holds no run to resume"),
    (["--resume", "--overwrite"], "give one"),
])
def test_resume_needs_a_recorded_run_and_excludes_overwrite(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "empty"), *flags])
    assert message in f"{exit_info.value.code} {capsys.readouterr().err}"
