"""The `--out` folder of `python -m train`: what marks a run there, its recorded settings, and who may use it.

A folder holds a run once any of RUN_ENTRIES exists in it. A new run never destroys one it has not
started: without `--resume` or `--overwrite` a folder holding a run is refused before anything is
loaded, and with `--overwrite` the previous run is deleted only after the new one's task file, data and
model have loaded (train.run). Other files in the folder are never touched.

`run.json` records how the run was started: the command-line settings (`flags`, the argparse
destinations of train.cli except --out, --resume, --overwrite and the host flags, plus `processes`, the
job's number of processes) and the task file's path and text, so `--resume` needs no other flag and
re-reads the very task list the run started with.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

RECORD_FILE = "run.json"
RUN_ENTRIES = (RECORD_FILE, "base_scores.json", "trainings", "adapters", "metrics.jsonl", "report.json", "report.md",
               "accuracy.png", "served")
RECORD_FORMAT = 1


class RunFolderError(RuntimeError):
    """`--out` cannot be used as asked (a run to keep, nothing to resume, a flag that contradicts the run)."""


def previous_run(out: pathlib.Path) -> list[str]:
    """The entries of RUN_ENTRIES present in `out`."""
    return [name for name in RUN_ENTRIES if (out / name).exists()]


def check_usable(out: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """Raise RunFolderError unless `out` may be used: a recorded run to resume, or no run (or `overwrite`)."""
    if resume:
        read_record(out)
        return
    found = previous_run(out)
    if found and not overwrite:
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(found)}); nothing was changed. Continue it with "
            f"`python -m train --out {out} --resume`, replace it with --overwrite, or choose another --out.")


def clear(out: pathlib.Path) -> None:
    """Delete the run in `out` (its RUN_ENTRIES only)."""
    for name in RUN_ENTRIES:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def write_json(path: pathlib.Path, value: Any) -> None:
    """Write `value` as JSON through a temporary file and a rename, so a crash never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


def write_record(out: pathlib.Path, flags: Mapping[str, Any], tasks_file: pathlib.Path, tasks_text: str) -> None:
    write_json(out / RECORD_FILE,
               {"format": RECORD_FORMAT, "flags": dict(flags), "tasks_file": str(tasks_file), "tasks_text": tasks_text})


def read_record(out: pathlib.Path) -> dict[str, Any]:
    """The record of the run in `out` (`flags`, `tasks_file`, `tasks_text`)."""
    path = out / RECORD_FILE
    if not path.is_file():
        raise RunFolderError(f"--resume: {out} holds no run to resume (no {RECORD_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RunFolderError(f"--resume: cannot read {path}: {error}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise RunFolderError(f"--resume: {path} is not a run record of format {RECORD_FORMAT}")
    return record
