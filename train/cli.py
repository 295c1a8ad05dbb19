"""Command line of `python -m train`: flags -> JobConfig. `python -m train --help` documents every flag.

With `--resume` the settings come from the run folder's record (train.run_folder), so
`python -m train --out X --resume` needs no other flag; a flag given anyway must equal the recorded
value, and one that differs is a usage error naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from train.data import DataError
from train.encoding import AnswerError
from train.run import TINY, JobConfig
from train.run_folder import RECORD_FILE, RunFolderError, read_record
from train.task_config import DEFAULT_TASKS_FILE, TaskConfigError
from train.trainer import TrainConfig
from valora_jax.adapters import AdapterConfig, SnellaConfig

DEFAULT_OUT = pathlib.Path("runs/default")
# The embedded default adapts every projection of all three parts of the tiny LLaVA: its base is random,
# so the vision tower and projector must learn features too, not only the language model.
ALL_TOWERS = ("language_model", "vision_tower", "multi_modal_projector")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # decoder
                   "out_proj", "fc1", "fc2",  # CLIP layers (q/k/v shared with the decoder's names)
                   "linear_1", "linear_2")  # projector
SERIAL_TARGETS = ("self_attn",)
NOT_RECORDED = ("out", "resume", "overwrite")  # where and how to run, not what: never part of run.json
# Problems with the user's input: printed as one message, not a traceback.
INPUT_ERRORS = (RunFolderError, TaskConfigError, DataError, AnswerError, FileNotFoundError)


def parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Accuracy-aware adapter generation: train LoRA-family adapters for vision tasks and fuse "
                    "tasks into as few adapters as their accuracy requirements allow (VaLoRA's greedy fusion "
                    "with rollback). With no flags, runs the embedded default on the tiny model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=TINY,
                   help="'tiny' (the built-in tiny LLaVA, seeded-random weights, no files) or the path of a local "
                        "HF LLaVA directory (config.json, *.safetensors, processor files)")
    p.add_argument("--tasks", type=pathlib.Path, default=DEFAULT_TASKS_FILE,
                   help="YAML task file (format: train/task_config.py; the default is the embedded suite)")
    p.add_argument("--adapter", choices=("lora", "serial_lora", "snella"), default="lora", help="adapter kind")
    # Rank 32 for the embedded default: at 16 the dominant-colour task reached 0.91 in 150 steps, at 32 0.97.
    p.add_argument("--rank", type=int, default=32, help="adapter rank")
    p.add_argument("--alpha", type=float, default=64.0, help="LoRA / Serial LoRA scale numerator (scale = alpha/rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input (LoRA, Serial LoRA)")
    p.add_argument("--towers", nargs="+", default=list(ALL_TOWERS),
                   help="model parts that get adapters (language_model, vision_tower, multi_modal_projector)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                   help="output folder: adapters/, report.json, report.md, accuracy.png, metrics.jsonl, checkpoints")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the run in --out with the settings recorded in its {RECORD_FILE} (no other flag "
                        "needed; one given must match): reuse finished trainings, resume an unfinished one from its "
                        "latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (deleted once the new run's task file, data and model have "
                        "loaded); without it such a folder is refused")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help="seed of the data (embedded tasks, shuffling) and of adapter initialisation")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per adapter training")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global training batch size")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warmup steps before cosine decay")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm,
                   help="clip each step's gradient to this global norm (> 0; 0: no clipping)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between Orbax checkpoints (adapter, optimizer, data position)")
    p.add_argument("--data-parallel", type=int, default=defaults.data_parallel,
                   help="devices to split each batch over (a data-parallel mesh); must divide --batch-size")
    p.add_argument("--eval-batch-size", type=int, default=JobConfig.eval_batch_size, help="validation batch size")
    p.add_argument("--order", nargs="+", default=None,
                   help="fusion order (every task name once); default: classify tasks first, strictest first "
                        "(train.fusion.fusion_order)")
    return p


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    targets = SERIAL_TARGETS if args.adapter == "serial_lora" else ALL_PROJECTIONS
    return AdapterConfig(kind=args.adapter, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                         towers=tuple(args.towers), snella=SnellaConfig(total_steps=max(args.steps, 2)))


def job_config(args: argparse.Namespace) -> JobConfig:
    if args.batch_size % args.data_parallel:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --data-parallel {args.data_parallel}")
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                        checkpoint_every=args.checkpoint_every, seed=args.seed,
                        data_parallel=args.data_parallel)
    return JobConfig(out=args.out, model=args.model, tasks=pathlib.Path(args.tasks), adapter=adapter_config(args),
                     train=train, eval_batch_size=args.eval_batch_size,
                     order=tuple(args.order) if args.order else None, resume=args.resume,
                     overwrite=args.overwrite, flags=recorded_flags(args))


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of `args` as run.json records them: JSON values, paths absolute."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    flags["tasks"] = str(pathlib.Path(flags["tasks"]).resolve())
    if flags["model"] != TINY:
        flags["model"] = str(pathlib.Path(flags["model"]).resolve())
    return flags


def given_flags(cli: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations of the flags `argv` names (argparse fills only destinations absent from the namespace)."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in cli._actions})
    return {dest for dest, value in vars(cli.parse_args(argv, probe)).items() if value is not unset}


def resumed_args(cli: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None):
    """(the recorded settings of the run in --out as parsed flags, the task file text); a given flag that
    differs from its recorded value is a usage error naming it."""
    record = read_record(args.out)
    recorded, given = record["flags"], recorded_flags(args)
    missing = sorted(set(given) - set(recorded))
    if missing:
        raise RunFolderError(f"--resume: {args.out / RECORD_FILE} lacks the settings {', '.join(missing)} "
                             "(not written by this version of python -m train)")
    for dest in sorted(given_flags(cli, argv) & set(recorded)):
        if given[dest] != recorded[dest]:
            flag = "--" + dest.replace("_", "-")
            cli.error(f"{flag} {given[dest]} conflicts with the run being resumed in {args.out} ({flag} "
                      f"{recorded[dest]}, recorded in {args.out / RECORD_FILE}); drop it to resume as recorded")
    return argparse.Namespace(**{**vars(args), **recorded}), record["tasks_text"]


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if args.resume and args.overwrite:
        cli.error("--resume continues the run in --out and --overwrite replaces it: give one")
    # Importing Orbax has already configured the root logger, so only force=True applies this. The job's
    # own modules log at INFO (progress, scores, reuse); other libraries only warnings (Orbax is chatty).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO)
    try:
        tasks_text = None
        if args.resume:
            args, tasks_text = resumed_args(cli, args, argv)
        try:
            config = job_config(args)
        except ValueError as error:  # a flag's value out of range: a usage error, not a traceback
            cli.error(str(error))
        from train.run import run

        with logging_redirect_tqdm():  # log lines print above the progress bar instead of through it
            run(dataclasses.replace(config, tasks_text=tasks_text))
    except INPUT_ERRORS as error:
        raise SystemExit(f"error: {error}") from None
