"""Corpus generation: `s3ray generate`'s streaming path vs `ray.data.llm`, replica scaling, and driver memory.

All in ONE run, on the same prompts (the corpus planner's own seed requests), model, sampling (fixed output
length: ignore_eos) and hardware:

- stream: `Teacher.generate_iter` (what `s3ray generate` feeds its shards from) over the Ray replica pool,
  1 vLLM replica.
- peer: `ray.data.llm.build_llm_processor` (`build_processor` in Ray 2.60) with `vLLMEngineProcessorConfig` with the three CPU-build changes
  (placement_group_config CPU bundle, log_engine_metrics=False, chat_template_stage=False; prompts rendered
  by the same chat template). If it fails, the exception is recorded and raw vLLM `LLM.generate` is the peer.
- scaling: the stream path with 1 replica x N threads vs N replicas x 1 thread (CPU: cpus_per_replica).
- rss: `s3ray generate` in a FRESH process on the tiny test teacher (transformers engine, few new tokens) at
  each --rss-rows size; the driver's peak RSS at each finished shard, and its growth after the first shards.

    python benchmarks/corpus_generation.py --prompts 64 --max-tokens 32 --rss-rows 2000,10000
    python benchmarks/corpus_generation.py --rss-rows 10000,100000 --skip peer scaling   # memory only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))


def corpus_requests(n: int, max_tokens: int):
    """The first n requests `s3ray generate` would send for the SST-2 config, at a fixed output length."""
    import dataclasses

    from s3ray.config import SamplingConfig, SynthesisConfig, TaskConfig
    from s3ray.synthesis.plan import plan_seed
    from s3ray.tasks import make_task

    task = make_task(TaskConfig(type="classification", labels=["negative", "positive"], description="movie review"),
                     ["negative", "positive"], SynthesisConfig())
    rats = {"negative": ["the plot drags"], "positive": ["the acting is superb"]}
    planned = plan_seed(task, n, rats, 1, None, SamplingConfig(max_tokens=max_tokens), run_seed=0)
    return [dataclasses.replace(p.request, sampling=dataclasses.replace(p.request.sampling, ignore_eos=True))
            for p in planned]


def _row(name: str, out_tokens: int, n: int, seconds: float, startup: float, **extra) -> dict:
    row = {"examples": n, "output_tokens": out_tokens, "seconds": round(seconds, 3), "startup_s": round(startup, 1),
           "tokens_per_s": round(out_tokens / seconds, 2), **extra}
    print(f"  {name:18s} {row['tokens_per_s']:9.1f} tok/s ({out_tokens} tokens in {seconds:.1f} s; "
          f"start {startup:.0f} s)", flush=True)
    return row


def bench_stream(cfg, model_path: str, reqs, replicas: int, cpus: float) -> dict:
    from s3ray.teacher.teacher import make_teacher

    cfg = cfg.model_copy(update={"replicas": replicas, "cpus_per_replica": cpus, "engine": "vllm"})
    t0 = time.perf_counter()
    with make_teacher(cfg, model_path, run_seed=0) as teacher:  # no cache: every request reaches the engines
        teacher.generate(reqs[:2 * replicas], desc="start + warm-up", progress=False)
        startup = time.perf_counter() - t0
        block = teacher.chunk_size() * max(1, 256 // teacher.chunk_size())
        t0 = time.perf_counter()
        results = list(teacher.generate_iter(reqs, block, desc="stream"))
        seconds = time.perf_counter() - t0
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"stream: {len(bad)} failed, e.g. {bad[0].error}")
    return _row(f"stream {replicas}x{cpus:g}", sum(r.output_tokens for r in results), len(results), seconds, startup,
                replicas=replicas, cpus_per_replica=cpus)


def bench_ray_data_llm(cfg, model_path: str, reqs) -> dict:
    """The peer: ray.data.llm on the same rendered prompts (total time includes its engine start)."""
    import ray
    import ray.data.llm as rdl
    from ray.data.llm import vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from s3ray.teacher.cpu import vllm_engine_args
    from s3ray.teacher.engines import render_prompt

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [{"prompt": render_prompt(tok, r), "seed": r.sampling.seed} for r in reqs]
    max_tokens = reqs[0].sampling.max_tokens
    config = vLLMEngineProcessorConfig(
        model_source=model_path, batch_size=64, concurrency=1,
        # The teacher's own CPU workaround (no chunked prefill: seeded requests), so both paths run alike.
        engine_kwargs={"max_model_len": cfg.vllm.max_model_len, "enforce_eager": True, "dtype": cfg.dtype,
                       **vllm_engine_args(cfg)},
        placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False, chat_template_stage=False,
        tokenize_stage=True, detokenize_stage=True)
    build = getattr(rdl, "build_llm_processor", None) or rdl.build_processor  # renamed in Ray 2.5x
    proc = build(config, preprocess=lambda row: {
        "prompt": row["prompt"], "sampling_params": {"temperature": 0.9, "top_p": 0.95, "max_tokens": max_tokens,
                                                     "min_tokens": max_tokens, "ignore_eos": True,
                                                     "seed": int(row["seed"])}},
        postprocess=lambda row: {"n": int(row.get("num_generated_tokens") or len(row.get("generated_tokens") or []))})
    t0 = time.perf_counter()
    out = proc(ray.data.from_items(rows)).take_all()
    seconds = time.perf_counter() - t0
    return _row("ray.data.llm", sum(r["n"] for r in out), len(out), seconds, 0.0, note="seconds include engine start")


def bench_rss(rows: int, shard: int, work: Path) -> dict:
    """`s3ray generate` of `rows` rows in a fresh process (tiny teacher, transformers, local backend)."""
    from fixtures_teacher import build_tiny_teacher

    teacher = work / "tiny-teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_teacher(teacher)
    out = work / f"rss-{rows}"
    cfg = {"run": {"name": "rss", "output_dir": str(out), "seed": 0},
           "task": {"type": "classification", "labels": ["negative", "positive"], "description": "movie review"},
           "data": {"validation": str(REPO / "data/sst2/validation.jsonl"), "validation_size": 40},
           "teacher": {"model": str(teacher), "engine": "transformers", "max_in_flight": 64,
                       "sampling": {"max_tokens": 4}, "transformers": {"batch_size": 64}},
           "synthesis": {"corpus_rows": rows, "corpus_shard_size": shard, "min_chars": 1, "num_rationales": 3}}
    (work / f"rss-{rows}.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "s3ray.cli", "generate", str(work / f"rss-{rows}.json"), "--backend",
                    "local"], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    shards = json.loads((out / "corpus_state" / "state.json").read_text())["shards"]
    rss = [s["driver_peak_rss_mb"] for s in shards]
    base = rss[min(1, len(rss) - 1)]  # after the first shard: engine, Ray and imports are loaded
    growth = rss[-1] / base - 1
    print(f"  rss {rows:>8} rows: peak {rss[-1]:.0f} MiB, after shard 1 {base:.0f} MiB, growth {100 * growth:.1f}% "
          f"({seconds:.0f} s)", flush=True)
    return {"rows": rows, "shards": len(rss), "shard_size": shard, "peak_rss_mb_per_shard": rss,
            "growth_after_first_shard": round(growth, 4), "within_10pct": growth <= 0.10, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="teacher (spec or folder)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rss-rows", default="10000,100000", help="corpus sizes for the memory check")
    ap.add_argument("--rss-shard", type=int, default=2000, help="corpus_shard_size for the memory check")
    ap.add_argument("--skip", nargs="*", default=[], choices=["stream", "peer", "scaling", "rss"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "corpus_generation.json"))
    args = ap.parse_args(argv)

    from s3ray.config import TeacherConfig
    from s3ray.runtime import init_ray, set_cache_dirs

    work = Path(tempfile.mkdtemp(prefix="s3bench-corpus-"))
    set_cache_dirs(work / "caches")
    ncpu = len(os.sched_getaffinity(0))
    res: dict = {"benchmark": "corpus_generation", "model": args.model, "prompts": args.prompts,
                 "max_tokens": args.max_tokens, "device": f"CPU ({ncpu} cores, {platform.processor() or 'x86-64'})",
                 "results": {}}
    if not {"stream", "peer", "scaling"} <= set(args.skip):
        from s3ray.models import resolve_teacher

        model_path = resolve_teacher(args.model)
        cfg = TeacherConfig(vllm={"kv_cache_space_gb": 1, "max_model_len": 1024})
        reqs = corpus_requests(args.prompts, args.max_tokens)
        init_ray(num_cpus=ncpu, temp_dir=str(work / "ray"))
        if "stream" not in args.skip:
            res["results"]["stream"] = bench_stream(cfg, model_path, reqs, 1, float(ncpu))
        if "peer" not in args.skip:
            try:
                res["results"]["ray_data_llm"] = bench_ray_data_llm(cfg, model_path, reqs)
            except Exception as e:  # noqa: BLE001 - record exactly why the peer did not run, then fall back
                res["ray_data_llm_error"] = f"{type(e).__name__}: {e}"[:1000]
                from teacher_throughput import bench_vllm_raw

                res["results"]["vllm_raw"] = bench_vllm_raw(cfg.model_copy(update={"cpus_per_replica": ncpu}),
                                                             model_path, reqs)
        if "scaling" not in args.skip and ncpu >= 2:
            res["results"]["scaling_1x2"] = bench_stream(cfg, model_path, reqs, 1, 2.0)
            res["results"]["scaling_2x1"] = bench_stream(cfg, model_path, reqs, 2, 1.0)
        r = res["results"]
        peer = r.get("ray_data_llm") or r.get("vllm_raw")
        if "stream" in r and peer:
            res["stream_over_peer"] = round(r["stream"]["tokens_per_s"] / peer["tokens_per_s"], 3)
            # ray.data.llm's time includes its engine start; this ratio counts the stream path's start too.
            s_all = r["stream"]["output_tokens"] / (r["stream"]["seconds"] + r["stream"]["startup_s"])
            p_all = peer["output_tokens"] / (peer["seconds"] + peer["startup_s"])
            res["stream_over_peer_with_startup"] = round(s_all / p_all, 3)
            print(f"stream / peer: {res['stream_over_peer']:.2f}x (with engine start: "
                  f"{res['stream_over_peer_with_startup']:.2f}x)", flush=True)
    if "rss" not in args.skip:
        res["rss"] = [bench_rss(int(n), args.rss_shard, work) for n in args.rss_rows.split(",")]
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
