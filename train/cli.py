"""Command line of `python -m train`: flags -> JobConfig. `python -m train --help` documents every flag.

With `--resume` the settings come from the run folder's record (train.run_folder), so
`python -m train --out X --resume` needs no other flag; a flag given anyway must equal the recorded
value, and one that differs is a usage error naming it.

Many hosts: every process runs the same command (train.distributed), with --coordinator-address,
--num-processes and --process-id or with what the launcher (Cloud TPU, SLURM, Open MPI) puts in the
environment. run.json records the number of processes; a resume must run as many.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
from typing import Any

import jax
from tqdm.contrib.logging import logging_redirect_tqdm

from train.data import DataError
from train.distributed import initialize, is_primary
from train.encoding import AnswerError
from train.run import TINY, JobConfig, TowerError
from train.run_folder import RECORD_FILE, RunFolderError, read_record
from train.task_config import DEFAULT_TASKS_FILE, TaskConfigError
from train.trainer import TrainConfig
from valora_jax.adapters import AdapterConfig, SnellaConfig

DEFAULT_OUT = pathlib.Path("runs/default")
# The embedded default adapts every projection of every part of the model (LLaVA's language model, vision
# tower and projector; Qwen-VL's vision encoder and decoder): the tiny base is random, so the vision side
# must learn features too, not only the language model. The names cover both families.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # decoders
                   "out_proj", "fc1", "fc2",  # CLIP layers (q/k/v shared with the decoder's names)
                   "linear_1", "linear_2",  # LLaVA's projector
                   "qkv", "proj", "mlp.0", "mlp.2")  # Qwen-VL's vision blocks (and gated MLPs above), merger
SERIAL_TARGETS = ("self_attn", "attn")  # decoder and CLIP blocks; Qwen-VL's vision blocks
# Settings added to run.json after its first format, with the values that reproduce runs recorded without them.
ADDED_FLAGS = {"image_size": None}
# Where and how to run, not what: never part of run.json (the number of processes is, as `processes`).
NOT_RECORDED = ("out", "resume", "overwrite", "coordinator_address", "num_processes", "process_id")
# Problems with the user's input: printed as one message, not a traceback.
INPUT_ERRORS = (RunFolderError, TaskConfigError, DataError, AnswerError, TowerError, FileNotFoundError)


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
                        "HF directory of LLaVA, Qwen2-VL or Qwen2.5-VL (config.json, *.safetensors, processor files)")
    p.add_argument("--tasks", type=pathlib.Path, default=DEFAULT_TASKS_FILE,
                   help="YAML task file (format: train/task_config.py; the default is the embedded suite)")
    p.add_argument("--adapter", choices=("lora", "serial_lora", "snella"), default="lora", help="adapter kind")
    # Rank 32 for the embedded default: at 16 the dominant-colour task reached 0.91 in 150 steps, at 32 0.97.
    p.add_argument("--rank", type=int, default=32, help="adapter rank")
    p.add_argument("--alpha", type=float, default=64.0, help="LoRA / Serial LoRA scale numerator (scale = alpha/rank)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter input (LoRA, Serial LoRA)")
    p.add_argument("--towers", nargs="+", default=None,
                   help="model parts that get adapters (default: all; LLaVA: language_model vision_tower "
                        "multi_modal_projector; Qwen-VL: visual language_model)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side in pixels of the task images (default: the model's input size; 224 for Qwen-VL, "
                        "which takes any size)")
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
    hosts = p.add_argument_group(
        "many hosts", "Run the same command on every host, with these flags (as jax.distributed.initialize takes "
                      "them) or without them under a launcher that sets them in the environment (Cloud TPU, SLURM's "
                      "srun, Open MPI's mpirun). --data-parallel then counts the devices of all hosts, --batch-size "
                      "is the global batch, and --out must be a folder every host sees.")
    hosts.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                       help="address and free port of process 0, where the processes meet")
    hosts.add_argument("--num-processes", type=int, default=None, help="number of processes of the job")
    hosts.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes - 1")
    return p


def adapter_config(args: argparse.Namespace) -> AdapterConfig:
    targets = SERIAL_TARGETS if args.adapter == "serial_lora" else ALL_PROJECTIONS
    return AdapterConfig(kind=args.adapter, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets,
                         towers=tuple(args.towers or ()), snella=SnellaConfig(total_steps=max(args.steps, 2)))


def job_config(args: argparse.Namespace) -> JobConfig:
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    if args.batch_size % args.data_parallel:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --data-parallel {args.data_parallel}")
    processes, devices = jax.process_count(), jax.device_count()
    if args.data_parallel % processes or args.data_parallel > devices:
        raise ValueError(f"--data-parallel {args.data_parallel} must be a multiple of the {processes} processes and at "
                         f"most their {devices} devices (each process takes an equal share)")
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                        checkpoint_every=args.checkpoint_every, seed=args.seed,
                        data_parallel=args.data_parallel)
    return JobConfig(out=args.out, model=args.model, tasks=pathlib.Path(args.tasks), adapter=adapter_config(args),
                     train=train, eval_batch_size=args.eval_batch_size,
                     order=tuple(args.order) if args.order else None, image_size=args.image_size, resume=args.resume,
                     overwrite=args.overwrite, flags=recorded_flags(args))


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of `args` as run.json records them: JSON values, paths absolute, and the job's number
    of processes."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    flags["processes"] = jax.process_count()
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
    recorded, given = {**ADDED_FLAGS, **record["flags"]}, recorded_flags(args)
    missing = sorted(set(given) - set(recorded))
    if missing:
        raise RunFolderError(f"--resume: {args.out / RECORD_FILE} lacks the settings {', '.join(missing)} "
                             "(not written by this version of python -m train)")
    if given["processes"] != recorded["processes"]:
        raise RunFolderError(f"--resume: the run in {args.out} ran as {recorded['processes']} processes and this job "
                             f"has {given['processes']}; resume it with {recorded['processes']} (each process saved "
                             "its own data position)")
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
    if args.num_processes is not None and args.num_processes < 1:
        cli.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or args.process_id + 1):
        cli.error(f"--process-id {args.process_id} is not one of 0 .. --num-processes - 1")
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    # Importing Orbax has already configured the root logger, so only force=True applies this. The job's
    # own modules log at INFO (progress, scores, reuse) on the first process; other libraries and the
    # other processes only warnings (Orbax is chatty).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("train").setLevel(logging.INFO if is_primary() else logging.WARNING)
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
