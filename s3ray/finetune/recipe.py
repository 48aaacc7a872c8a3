"""The chained run: plan -> fine-tune -> export -> annotate or generate -> report, each step recorded in
the run directory's manifest so `--resume` skips what finished (and the fine-tune resumes from its last
Ray Train checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import pyarrow as pa

from s3ray.config import ConfigError
from s3ray.data.load import DataError, card_labels, load_rows, read_table
from s3ray.finetune.config import (
    FinetuneConfig,
    deepspeed_config,
    load_finetune_config,
    model_dir,
    require_fit,
)
from s3ray.pipeline.rundir import RunDir, holds_run
from s3ray.tasks import make_task

ANNOTATE_CHUNK = 256  # pool rows per Scorer call: one saved part of the annotate step

log = logging.getLogger("s3ray.finetune")


def print_plan(cfg: FinetuneConfig) -> int:
    from s3ray.finetune.config import plan_for

    plan, text = plan_for(cfg)
    print(text)
    print("DeepSpeed config:")
    print(json.dumps(deepspeed_config(cfg, cfg.hardware.gpus_per_node * cfg.hardware.nodes), indent=2))
    return 0 if plan.fits else 1


def run_from_cli(path: str, overrides: list[str], plan_only: bool = False, resume: bool = False) -> int:
    cfg = load_finetune_config(path, overrides)
    if plan_only and cfg.training.method == "none":
        print("training.method=none: no fine-tune, model.path is used as is (nothing to plan)")
        return 0
    if plan_only:
        return print_plan(cfg)
    if cfg.training.method != "none":
        require_fit(cfg)
    rep = run_recipe(cfg, resume=resume)
    print(json.dumps(rep, indent=2, default=str))
    return 0


def _task_and_rows(cfg: FinetuneConfig, split: str, path: str | None, size: int | None):
    card_source = path or cfg.data.train or cfg.data.pool
    labels = cfg.task.labels or (card_labels(card_source) if card_source else None)
    task = make_task(cfg.task, labels)
    if path is None:
        return task, []
    return task, load_rows(path, task, split, cfg.task.field_map, size=size, seed=cfg.run.seed)


def _finetune_step(cfg: FinetuneConfig, rd: RunDir, resume: bool) -> dict:
    from s3ray.finetune.train import finetune_teacher

    if cfg.training.method == "none":
        return {"export_dir": model_dir(cfg), "skipped": "training.method=none: model.path is the teacher as is"}
    if not cfg.data.train:
        raise ConfigError("data.train: the labelled rows to fine-tune on are required")
    task, rows = _task_and_rows(cfg, "train", cfg.data.train, cfg.data.train_size)
    res = finetune_teacher(cfg, rows, task, rd.path, resume=resume)
    losses = [h["loss"] for h in res.history]
    return {"export_dir": res.export_dir, "steps": res.steps, "n_examples": res.n_examples,
            "dropped_too_long": res.dropped_too_long, "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "wall_seconds": res.wall_seconds}


def _annotate_step(cfg: FinetuneConfig, rd: RunDir, export_dir: str) -> dict:
    from s3ray.finetune.annotate import annotated_rows, annotation_report, calibrated

    if not cfg.data.pool:
        raise ConfigError("mode=annotate needs data.pool (the unlabelled rows to label)")
    task, _ = _task_and_rows(cfg, "train", None, None)
    pool = _pool_rows(cfg, task)
    anns, chunks = _annotations(cfg, rd, task, pool, export_dir)
    prior = None
    if cfg.annotate.calibrate == "pool_mean":
        anns, prior = calibrated(anns)
    rep = {**annotation_report(task, pool, anns, cfg.annotate.threshold), "chunks": chunks,
           "calibrate": cfg.annotate.calibrate, "label_prior_logprob": prior}
    kept = annotated_rows(task, pool, anns, cfg.annotate.threshold)
    rep["rows"] = rd.write_parquet("annotated.parquet", pa.Table.from_pylist(kept)) if kept else None
    return rep


def _annotations(cfg: FinetuneConfig, rd: RunDir, task, pool: list[dict], export_dir: str) -> tuple[list, dict]:
    """The teacher's annotation of every pool row, and how many chunks were scored now and reused. The pool
    is scored ANNOTATE_CHUNK rows at a time by `serve.replicas` Scorer actors; each finished chunk is written
    to annotate_parts/ at once, so a resumed step scores only the chunks not written yet (scoring is
    deterministic: the result equals an uninterrupted run's)."""
    from tqdm.auto import tqdm

    from s3ray.finetune.annotate import Annotation

    parts = rd.path / "annotate_parts"
    parts.mkdir(exist_ok=True)
    starts = range(0, len(pool), ANNOTATE_CHUNK)
    # Named by row range: a part written with another chunk size is never mistaken for one of these.
    part = {k: parts / f"rows-{k:08d}-{min(k + ANNOTATE_CHUNK, len(pool)):08d}.json" for k in starts}
    todo = [k for k in starts if not part[k].is_file()]
    with tqdm(total=len(pool), desc="annotate", unit="row", dynamic_ncols=True) as bar:
        bar.update(len(pool) - sum(len(pool[k : k + ANNOTATE_CHUNK]) for k in todo))
        for k, anns in _score_on_replicas(cfg, rd, task, pool, todo, export_dir):
            tmp = part[k].with_suffix(".tmp")
            tmp.write_text(json.dumps(anns))
            os.replace(tmp, part[k])
            bar.update(len(anns))
    out = [Annotation(**a) for k in starts for a in json.loads(part[k].read_text())]
    return out, {"scored": len(todo), "reused": len(starts) - len(todo)}


def _score_on_replicas(cfg: FinetuneConfig, rd: RunDir, task, pool: list[dict], todo: list[int], export_dir: str):
    """(chunk start, annotations) for every chunk in `todo`, as the Scorer actors finish them."""
    if not todo:
        return
    import ray
    from ray.util import ActorPool

    from s3ray.finetune.annotate import Scorer

    model = _served_model(cfg, rd, export_dir)
    s = cfg.serve
    gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    actor = ray.remote(Scorer).options(num_cpus=s.cpus_per_replica, num_gpus=s.tensor_parallel_size if gpu else 0,
                                       resources=s.resources or None, max_restarts=0)
    threads = None if gpu else max(1, int(s.cpus_per_replica))
    actors = [actor.remote(model, task, cfg.annotate.batch_size, threads) for _ in range(min(s.replicas, len(todo)))]
    try:
        yield from ActorPool(actors).map_unordered(
            lambda a, k: a.score.remote(k, pool[k : k + ANNOTATE_CHUNK]), todo)
    finally:
        for a in actors:
            ray.kill(a)


def _served_model(cfg: FinetuneConfig, rd: RunDir, export_dir: str) -> str:
    """What replicas load: an embedded teacher used as is by name (each node resolves its own copy), else the
    export. Starts Ray if needed; on several nodes, first proves every node sees the run directory."""
    import ray

    from s3ray.finetune.train import require_shared_output_dir
    from s3ray.runtime import init_ray

    if not ray.is_initialized():
        init_ray(cfg.ray.address, cfg.ray.num_cpus)
    if cfg.training.method == "none" and cfg.model.path.startswith("embedded:"):
        return cfg.model.path
    require_shared_output_dir(rd.path)  # replicas on other nodes load the export from it
    return export_dir


def _pool_rows(cfg: FinetuneConfig, task) -> list[dict]:
    """Pool rows need the task's input fields; a gold label is kept when present (for agreement)."""
    table = read_table(cfg.data.pool).to_pylist()
    rows = [{cfg.task.field_map.get(k, k): v for k, v in r.items()} for r in table]
    for i, r in enumerate(rows):
        missing = [f for f in task.fields if not isinstance(r.get(f), str) or not r[f].strip()]
        if missing:
            raise DataError(f"data.pool ({cfg.data.pool}) row {i}: fields {missing} are missing or empty")
    random.Random(cfg.run.seed).shuffle(rows)
    return rows[: cfg.data.pool_size] if cfg.data.pool_size else rows


def _generate_step(cfg: FinetuneConfig, rd: RunDir, export_dir: str) -> dict:
    """New pairs from the teacher pool serving `export_dir` (`serve:`); its answers are cached in the run
    directory, so a resumed step sends only the requests not answered yet."""
    from s3ray.finetune.generate import generate_rows, generation_jobs
    from s3ray.teacher.teacher import make_teacher

    task, rows = _task_and_rows(cfg, "train", cfg.data.train, cfg.data.train_size)
    contexts = _pool_rows(cfg, task) if cfg.data.pool and task.type != "classification" else rows
    g = cfg.generate
    jobs = generation_jobs(task, contexts, g.per_label, cfg.run.seed)
    with make_teacher(cfg.serve.teacher(export_dir), export_dir, run_seed=cfg.run.seed,
                      cache_path=rd.path / "teacher_cache.sqlite",
                      node_model_path=_served_model(cfg, rd, export_dir)) as teacher:
        new, dropped = generate_rows(teacher, task, jobs, g.temperature, g.top_p, g.max_tokens, cfg.run.seed)
        stats = teacher.stats()
    path = rd.write_parquet("generated.parquet", pa.Table.from_pylist(new)) if new else None
    return {"requested": len(jobs), "kept": len(new), "dropped": dict(dropped), "rows": path,
            "teacher": {"cached": stats.cached, "sent": stats.sent, "prompt_tokens": stats.prompt_tokens,
                        "output_tokens": stats.output_tokens, "seconds": round(stats.seconds, 2)}}


def _student_step(cfg: FinetuneConfig, rd: RunDir, rows_path: str | None) -> dict:
    """Train the student (s3ray.student.train_student) on the teacher's rows, or with mode=none on the gold
    data.train rows; report its validation score and, with data.test, its test score (the S3 loop's
    evaluate_student, so the numbers compare with `s3ray run`'s)."""
    from s3ray.models import resolve_student
    from s3ray.student import evaluate_student, train_student

    task, val = _task_and_rows(cfg, "validation", cfg.data.validation, None)
    keep = (*task.fields, "label", "answer_start")
    if cfg.mode == "none":
        rows = _task_and_rows(cfg, "train", cfg.data.train, cfg.data.train_size)[1]
    elif rows_path is None:
        return {"skipped": "the teacher produced no rows"}
    else:
        rows = rd.read_parquet(Path(rows_path).name)
    rows = [{k: r[k] for k in keep if k in r} for r in rows]
    res = train_student(rows, val, task, cfg.student, resolve_student(cfg.student.model), rd.path / "student",
                        cfg.run.seed, desc="finetuned-teacher student")
    out = {"checkpoint": res.checkpoint, "n_train": res.n_train, "best_epoch": res.best_epoch,
           "val_metrics": res.val_metrics, "train_seconds": res.train_seconds}
    if cfg.data.test:
        test = _task_and_rows(cfg, "test", cfg.data.test, None)[1]
        out["test_metrics"] = evaluate_student(res.checkpoint, test, task, cfg.student).metrics
    return out


def preflight(cfg: FinetuneConfig) -> None:
    """Every config and data mistake the run would hit, found before any model loads: the memory plan,
    the labelled rows, the pool, and labels for annotation."""
    from s3ray.finetune.train import check_can_train

    if cfg.training.method != "none":
        check_can_train(cfg)
    elif cfg.model.path:
        model_dir(cfg)  # the teacher used as is must be there (an earlier run's export, say)
    else:
        raise ConfigError("training.method=none uses model.path as the teacher: set model.path")
    if not cfg.data.train and (cfg.training.method != "none" or cfg.mode == "none"):
        raise ConfigError("data.train: the labelled rows to fine-tune on (or, with mode=none, to train the "
                          "student on) are required")
    task, _ = _task_and_rows(cfg, "train", cfg.data.train, cfg.data.train_size)
    if cfg.mode == "generate" and cfg.training.method == "none":
        from transformers import AutoTokenizer

        from s3ray.finetune.formats import has_chat_template

        if not has_chat_template(AutoTokenizer.from_pretrained(model_dir(cfg), trust_remote_code=False)):
            raise ConfigError(f"mode=generate serves model.path ({cfg.model.path}) as is, and its tokenizer has no "
                              "chat template for the teacher pool's prompts: fine-tune it first (the export "
                              "carries the layout it was trained on) or use an instruction-tuned model")
    if cfg.mode == "annotate":
        if not cfg.data.pool:
            raise ConfigError("mode=annotate needs data.pool (the unlabelled rows to label)")
        if not task.labels:
            raise ConfigError("mode=annotate needs task.labels (or a card.json with labels beside data.train)")
        _pool_rows(cfg, task)
    if cfg.student is not None:
        _task_and_rows(cfg, "validation", cfg.data.validation, None)
        if cfg.data.test:
            _task_and_rows(cfg, "test", cfg.data.test, None)


def run_recipe(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """fine-tune -> annotate | generate -> report.json, each step skipped on --resume once recorded."""
    preflight(cfg)
    # A fine-tune stopped before the recipe recorded anything still resumes from its Ray Train checkpoints.
    started = holds_run(Path(cfg.run.output_dir).expanduser())
    rd = RunDir(cfg.run.output_dir, cfg.model_dump(), resume=resume and started)
    steps = [("finetune", lambda: _finetune_step(cfg, rd, resume))]
    if cfg.mode == "annotate":
        steps.append(("annotate", lambda: _annotate_step(cfg, rd, rd.result("finetune")["export_dir"])))
    elif cfg.mode == "generate":
        steps.append(("generate", lambda: _generate_step(cfg, rd, rd.result("finetune")["export_dir"])))
    if cfg.student is not None:
        made = cfg.mode if cfg.mode != "none" else None
        steps.append(("student", lambda: _student_step(cfg, rd, rd.result(made)["rows"] if made else None)))
    for name, fn in steps:
        if rd.done(name):
            log.info("%s: done in an earlier run, skipped", name)
            continue
        t0 = time.perf_counter()
        rd.finish(name, fn(), time.perf_counter() - t0)
    report = {"name": cfg.run.name, "mode": cfg.mode, "steps": {k: v["result"] for k, v in rd.steps().items()}}
    Path(rd.file("report.json")).write_text(json.dumps(report, indent=2, default=str))
    rd.close()
    return report
