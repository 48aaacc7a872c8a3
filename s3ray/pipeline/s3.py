"""The Synthesis Step by Step loop (METHOD.md), one function per step, each resumable.

    rationales -> seed synthesis -> [train student -> test -> mine errors -> extrapolate errors] x R -> train

then the baselines the report compares against: an equal-budget seed-only student and a student trained on
the real validation rows alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from s3ray.config import S3Config
from s3ray.data.load import card_labels, load_rows, split_holdout
from s3ray.models import resolve_student, resolve_teacher
from s3ray.pipeline.rundir import RunDir
from s3ray.synthesis.collect import SynthesisStats, collect_examples, collect_rationales, rows_to_table
from s3ray.synthesis.dedup import Deduplicator
from s3ray.synthesis.plan import cap_errors, plan_ees, plan_rationales, plan_seed
from s3ray.tasks import make_task, task_class

log = logging.getLogger("s3ray")


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
    from s3ray.config import ConfigError
    from s3ray.data.load import DataError

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
        if cfg.teacher.engine != "openai":
            teacher_path = resolve_teacher(cfg.teacher.model)
        else:
            teacher_path = cfg.teacher.model
        student_path = resolve_student(cfg.student.model)
    return RunInputs(task, val, test, contexts, teacher_path, student_path)


class StopRun(Exception):
    """Raised after the step named by `stop_after` finished (a planned pause; resume continues)."""


def _timed(run: RunDir, step: str, fn, stop_after: str | None = None):
    """Run `fn` unless the manifest says `step` is done; record its result and time."""
    if run.done(step):
        log.info("[resume] %s already done, skipping", step)
        return run.result(step)
    log.info("== %s", step)
    t0 = time.time()
    result = run.finish(step, fn(), time.time() - t0)
    if stop_after == step:
        raise StopRun(step)
    return result


class S3Steps:
    """The loop's steps as plain methods over one run's context; `run_s3` orders and records them."""

    def __init__(self, cfg: S3Config, inputs: RunInputs, run: RunDir, teacher):
        self.cfg, self.inputs, self.run, self.teacher = cfg, inputs, run, teacher
        self.task, self.syn, self.seed = inputs.task, cfg.synthesis, cfg.run.seed
        # Real data as Parquet: Ray Data streams validation inference from it.
        self.val_path = run.write_parquet("data/validation.parquet", _real_table(inputs.validation))
        if inputs.test:
            run.write_parquet("data/test.parquet", _real_table(inputs.test))

    def generate(self, planned, desc: str):
        return self.teacher.generate([p.request for p in planned], desc=desc)

    def rows(self, files: list[str]) -> list[dict]:
        return [row for f in files for row in self.run.read_parquet(f)]

    def new_dedup(self, rows_so_far: list[dict]) -> Deduplicator:
        """Synthetic rows must differ from each other and must not copy a real validation/test row."""
        d = Deduplicator(self.syn.near_duplicate_threshold)
        d.protect(self.task.dedup_text(r) for r in self.inputs.validation + (self.inputs.test or []))
        for r in rows_so_far:
            d.add(self.task.dedup_text(r))
        return d

    def _synthesize(self, planned, rows_so_far, rel: str, desc: str) -> dict:
        rows, stats = collect_examples(planned, self.generate(planned, desc), self.task,
                                       self.new_dedup(rows_so_far), self.teacher.model_name)
        if not rows and rel.endswith("round_0.parquet"):
            raise RuntimeError(
                f"seed synthesis kept no rows out of {stats.requested} requests (dropped: {dict(stats.dropped)}, "
                f"failed calls: {stats.failed_calls}); check the teacher model and prompts"
            )
        self.run.write_parquet(rel, rows_to_table(rows, self.task))
        log.info("%s: kept %d of %d (%s)", desc, stats.kept, stats.requested, dict(stats.dropped) or "no drops")
        return {"path": rel, "rows": len(rows), "stats": stats.to_dict()}

    # Step 1
    def write_rationales(self) -> dict:
        planned = plan_rationales(self.task, self.syn.num_rationales, self.cfg.teacher.sampling, self.seed)
        got, stats = collect_rationales(planned, self.generate(planned, "rationales"), self.task,
                                        self.syn.num_rationales)
        empty = [lab for lab, rs in got.items() if not rs]
        if empty:
            log.warning("no usable rationales for labels %s: their seed prompts go without", empty)
        return {"rationales": got, "stats": stats.to_dict()}

    # Step 2
    def synthesize_seed(self, rationales: dict[str, list[str]]) -> dict:
        planned = plan_seed(self.task, self.syn.seed_examples, rationales, self.syn.rationales_per_example,
                            self.inputs.contexts, self.cfg.teacher.sampling, self.seed)
        return self._synthesize(planned, [], "rounds/round_0.parquet", "seed synthesis")

    # Step 3 (and every baseline student)
    def train(self, rows: list[dict], val_rows: list[dict], name: str) -> dict:
        from s3ray.student import evaluate_student, train_student

        res = train_student(rows, val_rows, self.task, self.cfg.student, self.inputs.student_path,
                            self.run.path / "students" / name, seed=self.seed, desc=f"student {name}")
        out = {"checkpoint": res.checkpoint, "best_epoch": res.best_epoch, "val": res.val_metrics,
               "history": res.history, "n_train": res.n_train, "train_seconds": res.train_seconds}
        if self.inputs.test:
            out["test"] = evaluate_student(res.checkpoint, self.inputs.test, self.task, self.cfg.student).metrics
        return out

    # Step 4
    def mine_errors(self, checkpoint: str, round_: int) -> dict:
        from s3ray.mining import mine_errors

        res = mine_errors(checkpoint, self.val_path, self.task, self.cfg.student, self.cfg.mining,
                          self.run.path / "mining" / f"round{round_}")
        return {"errors_path": res.errors_path, "n_rows": res.n_rows, "n_errors": res.n_errors,
                "n_hard": res.n_hard, "metrics": res.metrics}

    # Step 5
    def extrapolate_errors(self, mined: dict, rows_so_far: list[dict], round_: int) -> dict:
        from s3ray.mining import read_errors

        errors = read_errors(mined["errors_path"])  # one row per id
        errors = cap_errors(errors, self.syn.max_ees_per_round, self.seed, round_)
        planned = plan_ees(self.task, errors, self.syn.ees_per_error, round_, self.cfg.teacher.sampling, self.seed)
        return self._synthesize(planned, rows_so_far, f"rounds/round_{round_}.parquet",
                                f"error extrapolation {round_}")

    # Equal-budget baseline
    def synthesize_extra_seed(self, rationales: dict[str, list[str]], target: int) -> dict:
        """More seed rows (same prompts, continued numbering) until seed + extra == the final S3 set size."""
        seed_rows = self.run.read_parquet("rounds/round_0.parquet")
        dedup = self.new_dedup(seed_rows)  # a seed-only run never saw the EES rows
        have, extra, total = len(seed_rows), [], SynthesisStats()
        start = self.syn.seed_examples
        for _attempt in range(5):
            need = target - have - len(extra)
            if need <= 0:
                break
            kept, asked = total.kept or len(seed_rows), total.requested or self.syn.seed_examples
            n = math.ceil(need / max(0.2, kept / max(1, asked)) * 1.15) + 2  # expected drops, plus a margin
            planned = plan_seed(self.task, n, rationales, self.syn.rationales_per_example, self.inputs.contexts,
                                self.cfg.teacher.sampling, self.seed, start=start)
            start += n
            rows, stats = collect_examples(planned, self.generate(planned, "equal-budget seed"), self.task, dedup,
                                           self.teacher.model_name)
            total.add(stats)
            extra.extend(rows)
        extra = extra[: max(0, target - have)]
        surplus = total.kept - len(extra)  # the last batch overshoots; say so instead of reporting it as kept
        if surplus > 0:
            total.dropped["beyond_equal_budget"] += surplus
            total.kept = len(extra)
        self.run.write_parquet("baseline/extra_seed.parquet", rows_to_table(extra, self.task))
        if have + len(extra) < target:
            log.warning("equal-budget baseline: only %d of %d seed rows after 5 attempts", have + len(extra), target)
        return {"path": "baseline/extra_seed.parquet", "rows": len(extra), "target": min(target, have + len(extra)),
                "stats": total.to_dict()}

    def train_equal_budget(self) -> dict:
        rows = self.rows(["rounds/round_0.parquet", "baseline/extra_seed.parquet"])
        target = self.run.result("baseline/equal_budget/synthesis")["target"]
        return self.train(rows[:target], self.inputs.validation, "equal_budget")

    # Real-data baseline: its epoch is picked on held-out validation rows, never on test.
    def train_real_validation(self) -> dict:
        tr, hold = split_holdout(self.inputs.validation, self.cfg.baselines.real_holdout_fraction, self.seed)
        out = self.train(tr, hold, "real_validation")
        out["holdout_rows"] = len(hold)
        return out


def run_s3(cfg: S3Config, resume: bool = False, inputs: RunInputs | None = None,
           stop_after: str | None = None) -> dict:
    """Run (or resume) the whole S3 loop and its baselines; returns the report dict.

    `stop_after` names a step (as in manifest.json, e.g. "round1/synthesis") after which the run pauses;
    `resume=True` continues it later.
    """
    from s3ray.pipeline.report import write_report
    from s3ray.runtime import init_ray, set_cache_dirs

    inputs = inputs or prepare_inputs(cfg)
    run = RunDir(cfg.run.output_dir, cfg.model_dump(mode="json"), resume)
    set_cache_dirs(run.path / "cache")
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    from s3ray.teacher.pool import TeacherPool

    # Replicas start at the first request the generation cache can't answer.
    teacher = TeacherPool(cfg.teacher, inputs.teacher_path, run_seed=cfg.run.seed,
                          cache_path=run.path / "teacher_cache.sqlite", model_name=cfg.teacher.model,
                          lazy_start=True)
    s3 = S3Steps(cfg, inputs, run, teacher)
    step = partial(_timed, run, stop_after=stop_after)
    rounds = cfg.synthesis.rounds
    try:
        rationales: dict[str, list[str]] = {}
        if cfg.uses_rationales and inputs.task.labels:
            rationales = step("rationales", s3.write_rationales)["rationales"]
        step("round0/synthesis", partial(s3.synthesize_seed, rationales))
        round_files = ["rounds/round_0.parquet"]

        for r in range(rounds):
            rows = s3.rows(round_files)
            student = step(f"round{r}/train", partial(s3.train, rows, inputs.validation, f"round{r}"))
            mined = step(f"round{r}/mine", partial(s3.mine_errors, student["checkpoint"], r))
            step(f"round{r + 1}/synthesis", partial(s3.extrapolate_errors, mined, rows, r + 1))
            round_files.append(f"rounds/round_{r + 1}.parquet")

        final_rows = s3.rows(round_files)
        run.write_parquet("final/train.parquet", rows_to_table(final_rows, inputs.task))
        if cfg.baselines.equal_budget:  # its extra seed rows need the teacher: generate them before release
            step("baseline/equal_budget/synthesis", partial(s3.synthesize_extra_seed, rationales, len(final_rows)))
        teacher.shutdown()  # frees its CPUs/GPUs for the students
        step(f"round{rounds}/train", partial(s3.train, final_rows, inputs.validation, f"round{rounds}"))

        if cfg.baselines.equal_budget:
            step("baseline/equal_budget/train", s3.train_equal_budget)
        if cfg.baselines.real_validation:
            step("baseline/real_validation/train", s3.train_real_validation)
    except StopRun as stop:
        log.info("stopped after %s as asked; continue with --resume", stop)
    finally:
        teacher.shutdown()
    return write_report(run, cfg)


def _real_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows)
