"""The Synthesis Step by Step loop (docs/method.md), one method per step, each resumable.

    rationales -> seed synthesis -> [train student -> test -> mine errors -> extrapolate errors] x R -> train

then the baselines the report compares against: an equal-budget seed-only student and a student trained on
the real validation rows alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from s3ray.capacity import CapacityPlan, check_capacity
from s3ray.config import ConfigError, S3Config, StudentConfig
from s3ray.data.load import DataError, card_labels, load_rows, split_holdout
from s3ray.mining import mine_errors, read_errors
from s3ray.models import portable, resolve_student
from s3ray.pipeline import steps
from s3ray.pipeline.mirror import CacheSync, sigterm_unwinds
from s3ray.pipeline.report import write_report
from s3ray.pipeline.rundir import RunDir
from s3ray.pipeline.steps import MiningResult, RationalesResult, StepFailed, StudentResult, SynthesisResult
from s3ray.runtime import alive_nodes, init_ray, set_cache_dirs
from s3ray.storage import check_visible_from_all_nodes
from s3ray.student import evaluate_student, train_student
from s3ray.synthesis import stream
from s3ray.synthesis.collect import SynthesisStats, collect_examples, collect_rationales, rows_to_table
from s3ray.synthesis.dedup import Deduplicator
from s3ray.synthesis.plan import (
    Planned,
    balanced_counts,
    cap_errors,
    iter_ees,
    iter_seed,
    plan_rationales,
    plan_seed,
)
from s3ray.tasks import make_task, task_class
from s3ray.teacher.teacher import make_teacher, teacher_model_path

log = logging.getLogger("s3ray")
R = TypeVar("R")
VALIDATION_FILE = "data/validation.parquet"


@dataclass
class RunInputs:
    """Everything checked before any expensive work starts."""

    task: object
    validation: list[dict]
    test: list[dict] | None
    contexts: list[dict] | None
    teacher_path: str
    student_path: str


def prepare_inputs(cfg: S3Config, resolve_models: bool = True) -> RunInputs:
    """Load and validate data and models; raises DataError/ModelNotFound/ConfigError with the fix."""
    for name in ("validation", "test", "contexts"):
        path = getattr(cfg.data, name)
        if path and not Path(path).expanduser().exists():
            raise DataError(f"data.{name}: {path} does not exist (paths are relative to where s3ray runs)")
    labels = cfg.task.labels
    if task_class(cfg.task.type).needs_labels and not labels:
        labels = card_labels(cfg.data.validation)
        if not labels:
            raise ConfigError(
                "task.labels is not set and no card.json with labels sits beside data.validation; "
                "set task.labels: [label_a, label_b, ...]"
            )
    task = make_task(cfg.task, labels, cfg.synthesis)
    if cfg.synthesis.ees_balance != "none" and not task.labels:
        raise ConfigError("synthesis.ees_balance: per-label quotas need labels, and this task has none; "
                          "set synthesis.ees_balance: none")
    seed = cfg.run.seed
    val = load_rows(cfg.data.validation, task, "validation", cfg.task.field_map, cfg.data.validation_size, seed)
    test = None
    if cfg.data.test:
        test = load_rows(cfg.data.test, task, "test", cfg.task.field_map, cfg.data.test_size, seed)
    contexts = None
    if task.context_fields:
        contexts = val
        if cfg.data.contexts:
            contexts = load_rows(cfg.data.contexts, task, "contexts", cfg.task.field_map, None, seed)
    teacher_path = student_path = ""
    if resolve_models:
        teacher_path = teacher_model_path(cfg.teacher)
        student_path = resolve_student(cfg.student.model)
    return RunInputs(task, val, test, contexts, teacher_path, student_path)


class StopRun(Exception):
    """Raised after the step named by `stop_after` finished (a planned pause; resume continues)."""


class StepRecorder:
    """Runs a step unless the manifest says it is done, and records its typed result and time."""

    def __init__(self, run: RunDir, stop_after: str | None = None, after_step: Callable[[], None] | None = None):
        self.run, self.stop_after, self.after_step = run, stop_after, after_step

    def __call__(self, step: steps.Step[R], fn: Callable[..., R], *args) -> R:
        """`fn(*args)`, or the result recorded for `step` by an earlier attempt of this run."""
        if self.run.done(step.name):
            log.info("[resume] %s already done, skipping", step)
            return step.load(self.run.result(step.name))
        log.info("== %s", step)
        t0 = time.time()
        result = fn(*args)
        recorded = dataclasses.asdict(result)
        self.run.finish(step.name, recorded, time.time() - t0, outputs=self.run.outputs_in(recorded))
        if self.after_step is not None:
            self.after_step()  # e.g. push the teacher cache to the run's object store
        if self.stop_after == step.name:
            raise StopRun(step.name)
        return result


def student_epochs(cfg: StudentConfig, n_rows: int) -> int:
    """`student.epochs`, raised when `student.min_steps` asks for more optimizer steps than that gives."""
    if not cfg.min_steps:
        return cfg.epochs
    per_epoch = math.ceil(n_rows / (cfg.batch_size * cfg.num_workers))
    return min(max(cfg.epochs, math.ceil(cfg.min_steps / max(1, per_epoch))), max(cfg.epochs, cfg.max_epochs))


def check_failed_calls(stats: SynthesisStats, limit: float, desc: str) -> None:
    """Too many teacher calls still failed after their retries: fail the step before it is recorded, so a
    resume asks the teacher again for just those (successful calls are answered by the cache)."""
    if stats.requested and stats.failed_calls > limit * stats.requested:
        raise StepFailed(
            f"{desc}: {stats.failed_calls} of {stats.requested} teacher calls failed (more than "
            f"synthesis.max_failed_call_fraction={limit}); fix the teacher, then --resume: only the failed "
            "calls are made again"
        )


class S3Steps:
    """The loop's steps as plain methods over one run's context; `run_s3` orders and records them."""

    def __init__(self, cfg: S3Config, inputs: RunInputs, run: RunDir, teacher,
                 capacity: CapacityPlan | None = None):
        self.cfg, self.inputs, self.run, self.teacher = cfg, inputs, run, teacher
        self.capacity = capacity or CapacityPlan()  # whether students and mining need the teacher released
        self.task, self.syn, self.seed = inputs.task, cfg.synthesis, cfg.run.seed
        # Real data as Parquet: Ray Data streams validation inference from it.
        self.val_path = run.write_parquet_once(VALIDATION_FILE, partial(_real_table, inputs.validation))
        if inputs.test:
            run.write_parquet_once("data/test.parquet", partial(_real_table, inputs.test))

    def generate(self, planned, desc: str):
        return self.teacher.generate([p.request for p in planned], desc=desc)

    def rows(self, files: list[str]) -> list[dict]:
        return [row for f in files for row in self.run.read_parquet(f)]

    def new_dedup(self, prior_files: list[str]) -> Deduplicator:
        """Synthetic rows must differ from each other (and from the rows in `prior_files`, read a batch at a
        time) and must not copy a real validation/test row."""
        d = Deduplicator(self.syn.near_duplicate_threshold)
        d.protect(self.task.dedup_text(r) for r in self.inputs.validation + (self.inputs.test or []))
        for row in stream.iter_parquet_rows(self.run.abs(f) for f in prior_files):
            d.add(self.task.dedup_text(row))
        return d

    def _synthesize(self, planned: Iterable[Planned], prior_files: list[str], rel: str, desc: str,
                    may_be_empty: bool = True) -> SynthesisResult:
        """Stream `planned` through the teacher into the step's parts, then merge them into `rel`
        (synthesis/stream.py: lazy planning, bounded blocks, parts kept across a crash)."""
        parts = stream.StepParts(self.run.abs(rel).with_suffix(".parts"),
                                 stream.aligned_shard_size(self.teacher, self.syn.corpus_shard_size))
        block = stream.block_size(self.teacher, self.cfg.teacher.max_in_flight, self.cfg.teacher.replicas)
        limit = self.syn.max_failed_call_fraction
        stats, n_parts = stream.stream_step(planned, self.teacher, self.task, self.new_dedup(prior_files), parts,
                                            block, lambda st, where: check_failed_calls(st, limit, where), desc)
        if not stats.kept and not may_be_empty:
            raise StepFailed(
                f"{desc} kept no rows out of {stats.requested} requests (dropped: {dict(stats.dropped)}, "
                f"failed calls: {stats.failed_calls}); check the teacher model and prompts"
            )
        parts.merge_into(self.run.abs(rel), self.task, n_parts)
        log.info("%s: kept %d of %d (%s)", desc, stats.kept, stats.requested, dict(stats.dropped) or "no drops")
        by_label = self.label_counts(rel) if stats.kept else {}
        return SynthesisResult(path=rel, rows=stats.kept, stats=stats.to_dict(), by_label=by_label)

    def label_counts(self, rel: str) -> dict[str, int] | None:
        """Rows per label in one round file (None for tasks without labels)."""
        if not self.task.labels:
            return None
        labels = pq.read_table(self.run.abs(rel), columns=["label"]).column("label").to_pylist()
        return dict(sorted(Counter(labels).items()))

    # Step 1
    def write_rationales(self) -> RationalesResult:
        planned = plan_rationales(self.task, self.syn.num_rationales, self.cfg.teacher.sampling, self.seed)
        got, stats = collect_rationales(planned, self.generate(planned, "rationales"), self.task,
                                        self.syn.num_rationales)
        check_failed_calls(stats, self.syn.max_failed_call_fraction, "rationales")
        empty = [lab for lab, rs in got.items() if not rs]
        if empty:
            log.warning("no usable rationales for labels %s: their seed prompts go without", empty)
        return RationalesResult(rationales=got, stats=stats.to_dict())

    # Step 2
    def synthesize_seed(self, rationales: dict[str, list[str]]) -> SynthesisResult:
        planned = iter_seed(self.task, self.syn.seed_examples, rationales, self.syn.rationales_per_example,
                            self.inputs.contexts, self.cfg.teacher.sampling, self.seed)
        return self._synthesize(planned, [], steps.round_file(0), "seed synthesis", may_be_empty=False)

    # Step 3 (and every baseline student)
    def train(self, rows: list[dict], val_rows: list[dict], name: str) -> StudentResult:
        cfg = self.cfg.student.model_copy(update={"epochs": student_epochs(self.cfg.student, len(rows))})
        if self.capacity.release_for_training:  # its GPUs go to the students; the cache answers it back later
            self.teacher.release()
        rel = f"students/{name}"
        res = train_student(rows, val_rows, self.task, cfg, self.inputs.student_path, self.run.path / rel,
                            seed=self.seed, desc=f"student {name}",
                            storage_uri=self.run.uri_of(rel) if self.run.remote else None)
        test = None
        if self.inputs.test:
            test = evaluate_student(res.checkpoint, self.inputs.test, self.task, cfg).metrics
        return StudentResult(checkpoint=self.run.rel(res.checkpoint), best_epoch=res.best_epoch, epochs=cfg.epochs,
                             val=res.val_metrics, history=res.history, n_train=res.n_train,
                             train_seconds=res.train_seconds, test=test)

    # Step 4
    def mine_errors(self, student: StudentResult, round_: int) -> MiningResult:
        if self.capacity.release_for_mining:
            self.teacher.release()
        # Workers on any node read the checkpoint and validation rows and write their parts via the run storage.
        rel = f"mining/round{round_}"
        res = mine_errors(self.run.uri_of(student.checkpoint), self.run.uri_of(VALIDATION_FILE), self.task,
                          self.cfg.student, self.cfg.mining, self.run.uri_of(rel), resources=self.cfg.student.resources)
        self.run.pull(f"{rel}/errors")  # the driver's copy, which the manifest records
        return MiningResult(errors_path=f"{rel}/errors", n_rows=res.n_rows, n_errors=res.n_errors,
                            n_hard=res.n_hard, metrics=res.metrics)

    # Step 5
    def extrapolate_errors(self, mined: MiningResult, round_files: list[str], round_: int) -> SynthesisResult:
        errors = read_errors(str(self.run.abs(mined.errors_path)))  # one row per id
        errors = cap_errors(errors, self.syn.max_ees_per_round, self.seed, round_)
        counts = None
        if self.syn.ees_balance == "per_label":
            counts = balanced_counts(errors, self.task.labels, self.syn.ees_per_error, self.seed, round_)
        planned = iter_ees(self.task, errors, self.syn.ees_per_error, round_, self.cfg.teacher.sampling, self.seed,
                           counts)
        return self._synthesize(planned, round_files, steps.round_file(round_), f"error extrapolation {round_}")

    # Equal-budget baseline
    def synthesize_extra_seed(self, rationales: dict[str, list[str]], target: int) -> SynthesisResult:
        """More seed rows (same prompts, continued numbering) until seed + extra == the final S3 set size."""
        dedup = self.new_dedup([steps.round_file(0)])  # a seed-only run never saw the EES rows
        have, extra, total = stream.parquet_rows(self.run.abs(steps.round_file(0))), [], SynthesisStats()
        start = self.syn.seed_examples
        for _attempt in range(5):
            need = target - have - len(extra)
            if need <= 0:
                break
            kept, asked = total.kept or have, total.requested or self.syn.seed_examples
            n = math.ceil(need / max(0.2, kept / max(1, asked)) * 1.15) + 2  # expected drops, plus a margin
            planned = plan_seed(self.task, n, rationales, self.syn.rationales_per_example, self.inputs.contexts,
                                self.cfg.teacher.sampling, self.seed, start=start)
            start += n
            rows, stats = collect_examples(planned, self.generate(planned, "equal-budget seed"), self.task, dedup,
                                           self.teacher.model_name)
            total.add(stats)
            extra.extend(rows)
        check_failed_calls(total, self.syn.max_failed_call_fraction, "equal-budget seed synthesis")
        extra = extra[: max(0, target - have)]
        surplus = total.kept - len(extra)  # the last batch overshoots; say so instead of reporting it as kept
        if surplus > 0:
            total.dropped["beyond_equal_budget"] += surplus
            total.kept = len(extra)
        self.run.write_parquet(steps.EXTRA_SEED_FILE, rows_to_table(extra, self.task))
        if have + len(extra) < target:
            log.warning("equal-budget baseline: only %d of %d seed rows after 5 attempts", have + len(extra), target)
        return SynthesisResult(path=steps.EXTRA_SEED_FILE, rows=len(extra), stats=total.to_dict(),
                               target=min(target, have + len(extra)))

    def train_equal_budget(self, extra: SynthesisResult) -> StudentResult:
        rows = self.rows([steps.round_file(0), steps.EXTRA_SEED_FILE])
        return self.train(rows[: extra.target], self.inputs.validation, "equal_budget")

    # Students that see real rows: their epoch is picked on held-out validation rows, never on test.
    def train_with_real_rows(self, synthetic: list[dict], name: str) -> StudentResult:
        tr, hold = split_holdout(self.inputs.validation, self.cfg.baselines.real_holdout_fraction, self.seed)
        out = self.train(synthetic + tr, hold, name)
        out.holdout_rows = len(hold)
        return out


def run_s3(cfg: S3Config, resume: bool = False, inputs: RunInputs | None = None,
           stop_after: str | None = None) -> dict:
    """Run (or resume) the whole S3 loop and its baselines; returns the report dict.

    `stop_after` names a step (as in manifest.json, e.g. "round1/synthesis") after which the run pauses;
    `resume=True` continues it later.
    """
    if stop_after:
        try:
            steps.check_step_name(stop_after, cfg)
        except ValueError as e:
            raise ConfigError(f"--stop-after: {e}") from None
    inputs = inputs or prepare_inputs(cfg)
    run = RunDir(cfg.run.output_dir, cfg.model_dump(mode="json"), resume, local_dir=cfg.run.local_dir)
    set_cache_dirs(run.path / "cache")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    capacity = check_capacity(cfg)  # before any generation (`s3ray run` checks a remote cluster earlier)
    node_teacher, inputs = _models_for_every_node(cfg, inputs, run)
    cache_path = run.path / "teacher_cache.sqlite"
    sync = CacheSync(cache_path, run.uri_of("teacher_cache.sqlite")) if run.remote else None
    # The backend starts at the first request the generation cache can't answer.
    teacher = make_teacher(cfg.teacher, inputs.teacher_path, run_seed=cfg.run.seed, cache_path=cache_path,
                           model_name=cfg.teacher.model, node_model_path=node_teacher)
    try:
        with sigterm_unwinds():  # `ray job stop`: the finally below still pushes the cache
            _run_steps(S3Steps(cfg, inputs, run, teacher, capacity), StepRecorder(run, stop_after, sync and sync.push))
    except StopRun as stop:
        log.info("stopped after %s as asked; continue with --resume", stop)
    finally:
        if sync is not None:
            sync.stop()  # first: a stopped job may have seconds before it is killed
        teacher.close()
    report = write_report(run)
    run.close()  # on an error, the lock goes with the RunDir object (or the process)
    return report


def needs_staging(output_dir: str, remote: bool) -> bool:
    """Whether local model folders must be staged under the run storage for other nodes (an object store, or
    a cluster of several nodes); on several nodes, first prove that every node sees `output_dir`."""
    multi = len(alive_nodes()) > 1
    if multi:  # as written: `~/runs/x` is each node's own home
        check_visible_from_all_nodes(output_dir)
    return remote or multi


def _models_for_every_node(cfg: S3Config, inputs: RunInputs, run: RunDir) -> tuple[str, RunInputs]:
    """What replicas and workers load, whichever node they run on: embedded models by name, local folders
    staged under the run storage when it is an object store or the cluster has several nodes. Before any
    generation, a multi-node run also proves every node sees its storage (storage.StorageError if not)."""
    stage = needs_staging(cfg.run.output_dir, run.remote)
    teacher = inputs.teacher_path
    if cfg.teacher.engine != "openai":
        teacher = portable(cfg.teacher.model, inputs.teacher_path, run.uri, stage)
    student = portable(cfg.student.model, inputs.student_path, run.uri, stage)
    return teacher, dataclasses.replace(inputs, student_path=student)


def _run_steps(s3: S3Steps, step: StepRecorder) -> None:
    """The paper's loop, then the baselines, in the order the manifest records them."""
    cfg, inputs, rounds = s3.cfg, s3.inputs, s3.cfg.synthesis.rounds
    rationales: dict[str, list[str]] = {}
    if cfg.uses_rationales and inputs.task.labels:
        rationales = step(steps.RATIONALES, s3.write_rationales).rationales
    step(steps.synthesis(0), s3.synthesize_seed, rationales)
    round_files = [steps.round_file(0)]

    for r in range(rounds):
        rows = s3.rows(round_files)
        student = step(steps.train(r), s3.train, rows, inputs.validation, f"round{r}")
        mined = step(steps.mine(r), s3.mine_errors, student, r)
        step(steps.synthesis(r + 1), s3.extrapolate_errors, mined, list(round_files), r + 1)
        round_files.append(steps.round_file(r + 1))

    stream.merge_parquet([s3.run.abs(f) for f in round_files], s3.run.abs(steps.FINAL_TRAIN_FILE), inputs.task)
    s3.run.push(steps.FINAL_TRAIN_FILE)  # rebuilt from the rounds on every start, so no step records it
    final_rows = s3.rows(round_files)  # the student trains on rows in memory
    extra = None
    if cfg.baselines.equal_budget:  # its extra seed rows need the teacher: generate them before release
        extra = step(steps.EQUAL_BUDGET_SYNTHESIS, s3.synthesize_extra_seed, rationales, len(final_rows))
    s3.teacher.release()  # frees its CPUs/GPUs for the students (it comes back if a later step needs it)
    step(steps.train(rounds), s3.train, final_rows, inputs.validation, f"round{rounds}")

    if extra is not None:
        step(steps.EQUAL_BUDGET_TRAIN, s3.train_equal_budget, extra)
    if cfg.baselines.real_validation:
        step(steps.REAL_VALIDATION_TRAIN, s3.train_with_real_rows, [], "real_validation")
    if cfg.baselines.s3_plus_real:
        step(steps.S3_PLUS_REAL_TRAIN, s3.train_with_real_rows, final_rows, "s3_plus_real")


def _real_table(rows: list[dict]):
    return pa.Table.from_pylist(rows)
