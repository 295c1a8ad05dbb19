"""The job of `python -m train`: tasks in, the fewest adapters that meet their requirements out.

Steps: load the base model and its processor, build the tasks, score the base model, run the greedy
fusion (train.fusion) with a fresh adapter trained per candidate group, copy each accepted group's
adapter to `<out>/adapters/<name>`, write the report.

Before `--out` is touched, the task file is validated, the data read, the model loaded and the answers
checked against its tokenizer (train.run_folder: a folder holding a run is refused unless --resume or
--overwrite; with --overwrite the previous run is deleted only then).

Layout of `--out`:
    run.json                    the settings and task file the run started with (what --resume reads)
    base_scores.json            the base model's scores (kept for --resume)
    trainings/<group>/          one per group trained: checkpoints/ (Orbax), adapter/ (save_adapter +
                                head.safetensors/head.json), result.json (scores, trainable parameters)
    adapters/<adapter_i>/       the accepted adapters (copies of their group's adapter/)
    metrics.jsonl, report.json, report.md, accuracy.png

`--resume` reuses every finished training (its result.json) and continues an unfinished one from its
latest checkpoint, and logs which; because fusion is deterministic given the scores, the resumed job
retraces the same path and ends with the same adapters.

Over many processes (train.distributed) every process runs the whole job and only the first writes the
folder; a barrier after each write keeps the others from reading a file before it exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any


from train.distributed import barrier, is_primary
from train.encoding import Encoder
from train.evaluate import Evaluator
from train.fusion import FusionResult, fuse_tasks
from train.report import MetricsLog, Report, build_report, print_report, write_report
from train.run_folder import check_usable, clear, previous_run, write_json, write_record
from train.served import LORA_MODULES, REQUESTS, RESPONSES, write_requests
from train.task_config import DEFAULT_TASKS_FILE, TaskConfigError, build_task, load_task_specs
from train.tasks import Task
from train.trainer import TrainConfig, new_learner, train_adapter
from valora_jax import load_pretrained
from valora_jax.adapters import AdapterConfig, count_trainable, detach, save_adapter
from valora_jax.models.tiny import TINY, tiny_base

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
# Task image side for families without a fixed input size (Qwen-VL's processor takes any size): 224 pixels
# are 16 x 16 patches of 14, 64 decoder tokens per image at spatial merge 2.
DYNAMIC_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class JobConfig:
    out: pathlib.Path
    model: str = TINY
    tasks: pathlib.Path = DEFAULT_TASKS_FILE
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    eval_batch_size: int = 50
    order: tuple[str, ...] | None = None
    image_size: int | None = None  # side of the task images; None: the model's own (DYNAMIC_IMAGE_SIZE for Qwen-VL)
    resume: bool = False
    overwrite: bool = False
    flags: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the settings run.json records
    tasks_text: str | None = None  # the task file's content; None: read `tasks`

    def __post_init__(self):
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


def load_base(model: str):
    """(model, processor) of `tiny` (seeded-random weights, in-memory processor) or a local HF directory of a
    supported family (LLaVA, Qwen2-VL, Qwen2.5-VL)."""
    if model == TINY:
        return tiny_base()
    base, processor = load_pretrained(model)
    if processor is None:
        raise FileNotFoundError(f"{model} has no processor files (tokenizer, image processor); training needs them")
    return base, processor


class TowerError(ValueError):
    """--towers names a part the model does not have."""


def adapter_for_model(adapter: AdapterConfig, model) -> AdapterConfig:
    """`adapter` with its towers checked against the model's (no towers: all of them)."""
    towers = tuple(getattr(model, "POOL_TOWERS", ()))
    unknown = [t for t in adapter.towers if t not in towers]
    if unknown:
        raise TowerError(f"--towers {' '.join(unknown)}: not a part of this model; its parts are {' '.join(towers)}")
    return adapter if adapter.towers else dataclasses.replace(adapter, towers=towers)


def group_key(tasks: Sequence[Task]) -> str:
    return "+".join(task.name for task in tasks)


class Job:
    """One run of the job; `train_and_eval` is the fusion callback."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.out = config.out
        check_usable(self.out, resume=config.resume, overwrite=config.overwrite)
        try:
            tasks_text = config.tasks.read_text(encoding="utf-8") if config.tasks_text is None else config.tasks_text
        except OSError as error:
            raise TaskConfigError(f"{config.tasks}: cannot read task file: {error}") from None
        specs = load_task_specs(config.tasks, tasks_text)  # a typo fails here, before the model or any data loads
        self.model, processor = load_base(config.model)
        self.adapter = adapter_for_model(config.adapter, self.model)
        self.image_size = config.image_size or getattr(self.model.config.vision, "image_size", DYNAMIC_IMAGE_SIZE)
        self.tasks = [build_task(spec, image_size=self.image_size, seed=config.train.seed) for spec in specs]
        self.encoder = Encoder.for_model(self.model, processor, self.image_size).fitted(self.tasks)
        self.encoder.check_answers(self.tasks)
        self.evaluator = Evaluator(self.encoder, batch_size=config.eval_batch_size)
        barrier("loaded")  # every process has checked --out before the first one changes it
        if not config.resume and is_primary():  # everything loaded: the run starts here
            if config.overwrite and previous_run(self.out):
                logger.warning("--overwrite: deleting the previous run in %s", self.out)
                clear(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            write_record(self.out, config.flags, config.tasks.resolve(), tasks_text)
        self.metrics = MetricsLog(self.out / "metrics.jsonl") if is_primary() else None
        barrier("run folder ready")

    def base_scores(self) -> dict[str, float]:
        path = self.out / "base_scores.json"
        if path.exists():
            logger.info("reusing the base model's scores in %s", path)
            return json.loads(path.read_text())
        scores = self.evaluator.scores(self.tasks, self.model)
        if is_primary():
            write_json(path, scores)
        return scores

    def training_dir(self, group: Sequence[Task]) -> pathlib.Path:
        return self.out / "trainings" / group_key(group)

    def train_and_eval(self, group: Sequence[Task]) -> dict[str, float]:
        """Train an adapter on `group`, save it, and return its validation score per task.

        A group of one task starts from a fresh adapter. A larger group is always the open adapter's
        accepted group plus one task (train.fusion), so its adapter starts from that group's trained
        adapter and heads: VaLoRA adds the task to the current adapter and retrains it on the union,
        which keeps what the earlier tasks learned instead of relearning it in a share of the steps.
        """
        directory = self.training_dir(group)
        result_path = directory / RESULT_FILE
        if result_path.exists():
            logger.info("%s: reusing the finished training in %s", group_key(group), directory)
            return json.loads(result_path.read_text())["scores"]
        config = self.config
        warm_start = self.training_dir(group[:-1]) / "adapter" if len(group) > 1 else None
        learner = new_learner(self.model, self.tasks, self.adapter, config.train.seed, warm_start=warm_start)
        try:
            losses = train_adapter(learner, group, self.encoder, config.train, checkpoint_dir=directory / "checkpoints",
                                   metrics=self.metrics, name=group_key(group), resume=config.resume)
            learner.eval()  # input dropout off while scoring
            scores = self.evaluator.scores(group, self.model, learner)
            classify = [task.name for task in group if task.head == "classify"]
            trainable = count_trainable(self.model)
            if classify:
                trainable += learner.heads.parameter_count(classify)
            if is_primary():
                self.metrics.append(step=config.train.steps, adapter=group_key(group),
                                    loss=losses[-1] if losses else float("nan"), lr=0.0, examples_per_s=0.0,
                                    eval_scores=scores)
                save_adapter(self.model, directory / "adapter", base_model=config.model)
                if classify:
                    learner.heads.save(directory / "adapter", classify)
        finally:
            detach(self.model)
        logger.info("%s: %s", group_key(group), ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        if is_primary():
            write_json(result_path, {"scores": scores, "trainable_parameters": trainable})
        barrier(f"{group_key(group)} saved")  # the next group may start from this adapter
        return scores

    def publish(self, fusion: FusionResult) -> dict[str, int]:
        """Copy each accepted adapter to adapters/<name> (the first process); returns trainable parameters
        per adapter."""
        by_name = {task.name: task for task in self.tasks}
        trainable = {}
        for adapter in fusion.adapters:
            source = self.training_dir([by_name[name] for name in adapter.tasks])
            if is_primary():
                shutil.copytree(source / "adapter", self.out / "adapters" / adapter.name, dirs_exist_ok=True)
            trainable[adapter.name] = json.loads((source / RESULT_FILE).read_text())["trainable_parameters"]
        return trainable

    def run(self) -> Report:
        base = self.base_scores()
        fusion = fuse_tasks(self.tasks, self.train_and_eval, order=self.config.order)
        report = build_report(self.tasks, base, fusion, kind=self.adapter.kind, rank=self.adapter.rank,
                              trainable_parameters=self.publish(fusion))
        if is_primary():
            write_report(report, self.out)
            served = write_requests(self.out, self.tasks, report, image_size=self.image_size,
                                    max_tokens=self.encoder.answer_window)
            print_report(report)
            logger.info("to serve the adapters on the validation examples: python -m serve.batch --model %s "
                        "--lora-modules %s -i %s -o %s; then python -m train.served %s", self.config.model,
                        (served / LORA_MODULES).read_text().strip(), served / REQUESTS, served / RESPONSES,
                        self.out)
        return report


def run(config: JobConfig) -> Report:
    return Job(config).run()
