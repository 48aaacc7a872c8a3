"""Corpus generation: `s3ray generate`'s streaming path vs `ray.data.llm` vs raw vLLM, replica scaling, driver memory.

All in ONE run, on the same prompts (the corpus planner's own seed requests, as the same token ids), model,
engine arguments (the teacher's CPU workarounds: no chunked prefill with seeded requests), sampling (fixed
output length: ignore_eos), requests in flight and CPU threads (OMP_NUM_THREADS = the cores, for each):

- stream: `Teacher.generate_iter` (what `s3ray generate` feeds its shards from) over the Ray replica pool,
  1 vLLM replica holding every core.
- ray_data_llm: `ray.data.llm.build_processor` (`build_llm_processor` before Ray 2.5x) with
  `vLLMEngineProcessorConfig` (one engine actor whose placement group holds every core).
- vllm_raw: `vllm.LLM.generate` in this process.

Each is timed from a cold start (nothing running: engine start included, as a user waits for it), since
`ray.data.llm` starts its engine inside the pipeline and cannot be timed warm; the stream and raw vLLM are
also timed on a second pass over the same prompts on their warm engine. Ratios: stream over each peer with
start, and stream over raw vLLM warm.

- scaling: the stream path with 1 replica x N threads vs N replicas x 1 thread (warm).
- rss: `s3ray generate` in a FRESH process on the tiny test teacher (transformers engine, few new tokens) at
  each --rss-rows size; the driver's peak RSS at each finished shard, and its growth between the sizes.

    python benchmarks/corpus_generation.py --skip rss                                   # ~10 min on 2 cores
    python benchmarks/corpus_generation.py --rss-rows 10000,100000 --skip stream peer raw scaling   # memory
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
    """The stream path on warm replicas (start and a small warm-up first): replica scaling."""
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


def _e2e(name: str, tokens: int, n: int, total: float, steady: tuple[int, float] | None = None, **extra) -> dict:
    """A cold run (engine start included: nothing was running before it) and, where the engine outlives it,
    a second pass over the same prompts on the warm engine."""
    row = {"examples": n, "output_tokens": tokens, "seconds_with_start": round(total, 2),
           "tokens_per_s_with_start": round(tokens / total, 2), **extra}
    msg = f"  {name:14s} {row['tokens_per_s_with_start']:7.1f} tok/s with engine start ({tokens} tokens, {total:.1f} s)"
    if steady:
        row.update(steady_seconds=round(steady[1], 2), steady_tokens_per_s=round(steady[0] / steady[1], 2))
        msg += f"; warm: {row['steady_tokens_per_s']:.1f} tok/s"
    print(msg, flush=True)
    return row


def bench_stream_e2e(cfg, model_path: str, reqs, threads: int) -> dict:
    """`s3ray generate`'s path: Teacher.generate_iter over the Ray replica pool (1 vLLM replica, `threads` CPUs),
    from a cold pool; then the same prompts again on the warm replica."""
    from s3ray.teacher.teacher import make_teacher

    cfg = cfg.model_copy(update={"replicas": 1, "cpus_per_replica": float(threads), "engine": "vllm"})
    t0 = time.perf_counter()
    with make_teacher(cfg, model_path, run_seed=0) as teacher:  # no cache: every request reaches the engine
        block = teacher.chunk_size() * max(1, 256 // teacher.chunk_size())
        cold = list(teacher.generate_iter(reqs, block, desc="stream"))
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = list(teacher.generate_iter(reqs, block, desc="stream"))
        seconds = time.perf_counter() - t0
    bad = [r for r in cold + warm if not r.ok]
    if bad:
        raise RuntimeError(f"stream: {len(bad)} failed, e.g. {bad[0].error}")
    return _e2e("s3ray stream", sum(r.output_tokens for r in cold), len(cold), total,
                (sum(r.output_tokens for r in warm), seconds), threads=threads, in_flight=cfg.max_in_flight)


def bench_ray_data_llm(cfg, model_path: str, reqs, threads: int) -> dict:
    """The peer: ray.data.llm on the same token ids, engine arguments (CPU workarounds included), sampling and
    threads (Ray sets OMP_NUM_THREADS to the actor's CPUs); its time includes its engine start."""
    import ray
    import ray.data.llm as rdl
    from ray.data.llm import vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from s3ray.teacher.cpu import engine_env
    from s3ray.teacher.engines import render_prompt_ids
    from s3ray.teacher.engines.vllm import engine_kwargs

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [{"tokenized_prompt": render_prompt_ids(tok, r), "seed": r.sampling.seed} for r in reqs]
    s = reqs[0].sampling
    kwargs = {k: v for k, v in engine_kwargs(cfg, model_path, 0, None).items() if k != "model"}
    batch = 16  # batch x max_concurrent_batches = the stream replica's max_in_flight requests in the engine
    config = vLLMEngineProcessorConfig(
        model_source=model_path, engine_kwargs=kwargs, batch_size=batch, concurrency=1,
        max_concurrent_batches=max(1, cfg.max_in_flight // batch), runtime_env={"env_vars": engine_env(cfg)},
        placement_group_config={"bundles": [{"CPU": threads}]}, log_engine_metrics=False,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    build = getattr(rdl, "build_llm_processor", None) or rdl.build_processor  # renamed in Ray 2.5x
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                "min_tokens": s.max_tokens, "ignore_eos": True}
    proc = build(config, preprocess=lambda row: {
        "tokenized_prompt": row["tokenized_prompt"], "sampling_params": {**sampling, "seed": int(row["seed"])}},
        postprocess=lambda row: {"n": int(row.get("num_generated_tokens") or len(row.get("generated_tokens") or []))})
    t0 = time.perf_counter()
    out = proc(ray.data.from_items(rows)).take_all()
    total = time.perf_counter() - t0
    return _e2e("ray.data.llm", sum(r["n"] for r in out), len(out), total, threads=threads,
                in_flight=batch * config.max_concurrent_batches)


def bench_vllm_raw(cfg, model_path: str, reqs, threads: int) -> dict:
    """Raw vLLM `LLM.generate` in this process (same engine arguments, token ids, sampling), cold then warm."""
    from s3ray.teacher.cpu import engine_env

    os.environ.update({**engine_env(cfg), "OMP_NUM_THREADS": str(threads)})
    from vllm import LLM, SamplingParams

    from s3ray.teacher.engines import render_prompt_ids
    from s3ray.teacher.engines.vllm import engine_kwargs

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(cfg, model_path, 0, None))
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": render_prompt_ids(tok, r)} for r in reqs]
    params = [SamplingParams(temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                             max_tokens=r.sampling.max_tokens, min_tokens=r.sampling.max_tokens, ignore_eos=True,
                             seed=r.sampling.seed) for r in reqs]
    cold = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    llm.llm_engine.engine_core.shutdown()
    del llm
    count = lambda outs: sum(len(o.outputs[0].token_ids) for o in outs)
    return _e2e("vllm raw", count(cold), len(cold), total, (count(warm), seconds), threads=threads)


def compare_peers(res: dict, args, ncpu: int, work: Path) -> None:
    """stream vs ray.data.llm vs raw vLLM in one run, each from a cold engine, then the ratios."""
    from s3ray.config import TeacherConfig
    from s3ray.models import resolve_teacher
    from s3ray.runtime import init_ray

    model_path = resolve_teacher(args.model)
    cfg = TeacherConfig(vllm={"kv_cache_space_gb": 1, "max_model_len": 1024})
    reqs = corpus_requests(args.prompts, args.max_tokens)
    # Logical CPUs beyond the cores: ray.data.llm's engine actor reserves `ncpu` and its read/map tasks need
    # some too; threads are set per engine (OMP_NUM_THREADS = ncpu for each of the three).
    init_ray(num_cpus=ncpu + 2, temp_dir=str(work / "ray"))
    r = res["results"]
    if "stream" not in args.skip:
        r["stream"] = bench_stream_e2e(cfg, model_path, reqs, ncpu)
    if "peer" not in args.skip:
        try:
            r["ray_data_llm"] = bench_ray_data_llm(cfg, model_path, reqs, ncpu)
        except Exception as e:  # noqa: BLE001 - record exactly why the peer did not run
            res["ray_data_llm_error"] = f"{type(e).__name__}: {e}"[:1000]
    if "scaling" not in args.skip and ncpu >= 2:
        r["scaling_1x2"] = bench_stream(cfg, model_path, reqs, 1, 2.0)
        r["scaling_2x1"] = bench_stream(cfg, model_path, reqs, 2, 1.0)
    if "raw" not in args.skip:
        r["vllm_raw"] = bench_vllm_raw(cfg, model_path, reqs, ncpu)  # last: vLLM stays imported in this process
    if "stream" in r:
        key = "tokens_per_s_with_start"
        for peer in ("ray_data_llm", "vllm_raw"):
            if peer in r:
                res[f"stream_over_{peer}_with_start"] = round(r["stream"][key] / r[peer][key], 3)
        if "vllm_raw" in r:
            res["stream_over_vllm_raw_warm"] = round(r["stream"]["steady_tokens_per_s"]
                                                     / r["vllm_raw"]["steady_tokens_per_s"], 3)
        print("ratios:", {k: v for k, v in res.items() if k.startswith("stream_over")}, flush=True)


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
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rss-rows", default="10000,100000", help="corpus sizes for the memory check")
    ap.add_argument("--rss-shard", type=int, default=2000, help="corpus_shard_size for the memory check")
    ap.add_argument("--skip", nargs="*", default=[], choices=["stream", "peer", "raw", "scaling", "rss"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "corpus_generation.json"))
    args = ap.parse_args(argv)

    from s3ray.runtime import set_cache_dirs

    work = Path(tempfile.mkdtemp(prefix="s3bench-corpus-"))
    set_cache_dirs(work / "caches")
    ncpu = len(os.sched_getaffinity(0))
    res: dict = {"benchmark": "corpus_generation", "device": f"CPU ({ncpu} cores, {platform.processor() or 'x86-64'})",
                 "results": {}}
    if not {"stream", "peer", "raw", "scaling"} <= set(args.skip):
        res.update(model=args.model, prompts=args.prompts, max_tokens=args.max_tokens,
                   peers_measured=time.strftime("%Y-%m-%d %H:%M"), peers_load_avg=os.getloadavg()[0])
        compare_peers(res, args, ncpu, work)
    if "rss" not in args.skip:
        res["rss_measured"] = time.strftime("%Y-%m-%d %H:%M")
        res["rss"] = [bench_rss(int(n), args.rss_shard, work) for n in args.rss_rows.split(",")]
        base = res["rss"][0]["peak_rss_mb_per_shard"][-1]
        res["rss_growth_first_to_last_size"] = round(res["rss"][-1]["peak_rss_mb_per_shard"][-1] / base - 1, 4)
        print(f"driver peak RSS growth {args.rss_rows}: {100 * res['rss_growth_first_to_last_size']:.1f}%")
    out = Path(args.out)
    if out.is_file():  # a run that skipped some parts keeps their earlier figures (each part is dated)
        old = json.loads(out.read_text())
        res = {**old, **{k: v for k, v in res.items() if k != "results"},
               "results": {**old.get("results", {}), **res["results"]}}
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
