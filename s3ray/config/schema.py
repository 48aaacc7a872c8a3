"""The run config's sections as pydantic models: strict (unknown keys are errors), every field described."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from s3ray.redact import redact_url


def _task_class(name: str):
    from s3ray.tasks import task_class  # lazy: tasks -> teacher -> config would be an import cycle

    return task_class(name)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def count_or_auto(v: Any, what: str) -> Any:
    """A field that is a whole number >= 1 or 'auto' (before pydantic would coerce "2" or True)."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"must be a whole number of {what} >= 1, or 'auto' (got {v!r})")


class RunConfig(_Strict):
    name: str = Field("s3-run", description="Run name, used in the report title.")
    output_dir: str = Field(
        "runs/s3-run", description="Run directory: Parquet rounds, manifest, report. A local or shared-filesystem "
        "path, or an object store URI (s3://BUCKET/PREFIX; an S3-compatible server via S3RAY_S3_ENDPOINT), which "
        "every node of a multi-node run reads and writes.",
    )
    local_dir: str | None = Field(
        None, description="Object store runs: the driver's local working copy. None: under ~/.cache/s3ray/runs "
        "(S3RAY_CACHE).",
    )
    seed: int = Field(0, description="Master seed: every sampling seed, split and shuffle derives from it.")
    seeds: list[int] | None = Field(
        None, description="`s3ray sweep` (or `s3ray run` when set): one whole run per seed, in "
        "<output_dir>/seed<N>, and a mean ± std report.",
    )
    parallel_seeds: int | Literal["auto"] = Field(
        "auto", description="Seed runs at once, each a Ray task on the driver's node whose work spreads over the "
        "cluster. auto: as many as fit the free resources side by side (teacher replicas + student workers; a "
        "one-node cluster judged on its real cores), so a small box runs them one after another.",
    )

    @field_validator("parallel_seeds", mode="before")
    @classmethod
    def _parallel(cls, v: Any) -> Any:
        return count_or_auto(v, "runs")


class RayConfig(_Strict):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'ray://host:10001'). None starts a local cluster.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None: all).")
    check_capacity: bool = Field(
        True, description="At start, check that the teacher replicas, student workers and mining fit the "
        "cluster's free resources (per node), and fail naming the numbers if not. Turn off on an autoscaling "
        "cluster, whose nodes join only once work waits for them.",
    )


TaskType = Literal["classification", "pair", "extractive_qa"]


class TaskConfig(_Strict):
    type: TaskType = Field("classification", description="Task family: classification | pair | extractive_qa.")
    labels: list[str] | None = Field(
        None,
        description="Label names (classification and pair). None: read from the dataset card next to the data.",
    )
    description: str = Field(
        "movie review",
        description="What one example is, in words the teacher reads (e.g. 'movie review', 'news premise').",
    )
    label_descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="Optional plain-words meaning of each label for the prompts, e.g. {positive: 'a positive'}.",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to s3ray's names, e.g. {sentence: text}. "
        "s3ray names: text, label (classification); text_a, text_b, label (pair); "
        "context, question, answer, answer_start (extractive_qa).",
    )
    qa_answers: Literal["picked", "teacher"] = Field(
        "picked",
        description="extractive_qa seed synthesis: who chooses the answer span. picked: s3ray picks a name, "
        "number or noun phrase of the paragraph and the teacher writes only the question (works with small "
        "teachers); teacher: the teacher replies 'Answer: ...' and 'Question: ...' (strong teachers).",
    )

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            dup = sorted({x for x in v if v.count(x) > 1})
            if dup:
                raise ValueError(f"names {dup} more than once; list each label once")
            if any(not x.strip() for x in v):
                raise ValueError("holds an empty label name")
        return v


class DataConfig(_Strict):
    validation: str = Field(
        ..., description="The small real validation set (JSONL, CSV, Parquet file or HF datasets folder)."
    )
    test: str | None = Field(None, description="Test set, evaluated after every round (never used for choices).")
    contexts: str | None = Field(
        None,
        description="Pair/QA only: real first halves (premises, paragraphs) the teacher writes against. "
        "None: the validation set's contexts are used.",
    )
    validation_size: int | None = Field(
        None, ge=2, description="Subsample the validation set to this many rows (stratified). None: all."
    )
    test_size: int | None = Field(None, ge=1, description="Subsample the test set (None: all).")


class SamplingConfig(_Strict):
    temperature: float = Field(0.9, ge=0.0, le=2.0, description="Teacher temperature (the paper uses 0.9).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_tokens: int = Field(64, ge=1, description="Maximum new tokens per teacher call.")


class OpenAIConfig(_Strict):
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible endpoint. Written to manifests without credentials (user:pass@, ?query).",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(6, ge=0, description="Retries on 429/5xx/timeouts, exponential backoff.")

    @field_serializer("base_url", when_used="json")
    def _redacted(self, url: str) -> str:  # JSON dumps go to manifests and reports, never credentials
        return redact_url(url)


# Engine arguments s3ray sets itself from other fields; engine_args must not override them silently.
_RESERVED_ENGINE_ARGS = {
    "model": "teacher.model", "tokenizer": "teacher.model", "seed": "run.seed",
    "trust_remote_code": "teacher.trust_remote_code", "dtype": "teacher.dtype", "torch_dtype": "teacher.dtype",
    "tensor_parallel_size": "teacher.tensor_parallel_size",
    "pipeline_parallel_size": "teacher.pipeline_parallel_size",
}


def _check_engine_args(args: dict[str, Any], section: str) -> None:
    for key in args:
        if key in _RESERVED_ENGINE_ARGS:
            raise ValueError(f"{section}.engine_args.{key} is set by s3ray: use {_RESERVED_ENGINE_ARGS[key]}")


class VLLMConfig(_Strict):
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1.0, description="vLLM memory fraction.")
    kv_cache_space_gb: float = Field(2.0, gt=0, description="vLLM CPU build: KV cache size in GiB.")
    enforce_eager: bool = Field(True, description="vLLM: skip graph capture (faster start, fine on CPU).")
    max_model_len: int = Field(2048, ge=64, description="Context length the engine reserves KV cache for.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed as-is to vLLM's EngineArgs (e.g. {max_num_seqs: 64}); they override s3ray's own.",
    )


class TransformersConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="Prompts per generate() call.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed as-is to AutoModelForCausalLM.from_pretrained (e.g. {attn_implementation: sdpa}).",
    )


# Flat teacher keys of earlier versions, and where they live now: naming the new place beats "unknown field".
_MOVED_TEACHER_KEYS = {
    "gpu_memory_utilization": "teacher.vllm.gpu_memory_utilization",
    "kv_cache_space_gb": "teacher.vllm.kv_cache_space_gb",
    "enforce_eager": "teacher.vllm.enforce_eager",
    "max_model_len": "teacher.vllm.max_model_len",
    "batch_size": "teacher.transformers.batch_size",
}


class TeacherConfig(_Strict):
    model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="'embedded:smollm2-135m-instruct', a local HF folder, or a hub id where a hub is reachable; "
        "for engine openai, the model name the endpoint serves.",
    )
    engine: Literal["vllm", "transformers", "openai"] = Field(
        "vllm", description="vllm (CUDA or CPU build) | transformers (batched generate) | openai (HTTP)."
    )
    replicas: int = Field(1, ge=1, description="Teacher replicas (Ray actors), each one engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica for tensor parallelism.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per replica (vLLM).")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica.")
    use_gpu: bool | None = Field(None, description="Place replicas on GPUs. None: yes when the cluster has GPUs.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica asks for, e.g. {teacher_node: 1} to "
        "keep replicas on nodes started with --resources '{\"teacher_node\": 1}'.",
    )
    max_in_flight: int = Field(64, ge=1, description="Requests outstanding per replica (backpressure).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights dtype for vllm/transformers engines."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off by default.")
    max_restarts: int = Field(2, ge=0, description="Times a dead replica is restarted.")
    max_attempts: int = Field(3, ge=1, description="Tries per request; one that still fails comes back as an "
                              "error (never cached).")
    start_timeout_s: float = Field(900.0, gt=0, description="Deadline for a replica to be placed and load its engine.")
    request_timeout_s: float = Field(1800.0, gt=0, description="Deadline for one chunk of requests on a replica; "
                                     "past it the replica is restarted.")
    release: Literal["auto", "always", "never"] = Field(
        "auto", description="Free the replicas (and their GPUs) while students train and mining runs; they come "
        "back at the next uncached request. auto: only when those would not fit beside them (checked at "
        "start); always; never: the start check then needs room for both at once.",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Settings of the vllm engine.")
    transformers: TransformersConfig = Field(
        default_factory=TransformersConfig, description="Settings of the transformers engine."
    )
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig, description="Settings of the openai engine.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters.")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"teacher.{k} moved to {_MOVED_TEACHER_KEYS[k]}" for k in data if k in _MOVED_TEACHER_KEYS]
            if moved:
                raise ValueError("; ".join(moved))
        return data

    @model_validator(mode="after")
    def _engine_args(self) -> TeacherConfig:
        _check_engine_args(self.vllm.engine_args, "teacher.vllm")
        _check_engine_args(self.transformers.engine_args, "teacher.transformers")
        return self


class SynthesisConfig(_Strict):
    num_rationales: int = Field(8, ge=1, description="K: reasons the teacher lists per label.")
    rationales_per_example: int = Field(2, ge=0, description="k: reasons sampled into each seed prompt.")
    use_rationales: bool | None = Field(
        None, description="Write rationales first. None: yes for classification, no for pair/QA (as the paper)."
    )
    seed_examples: int = Field(400, ge=1, description="Seed examples requested from the teacher.")
    rounds: int = Field(2, ge=0, description="R: error-extrapolation rounds.")
    ees_per_error: int = Field(1, ge=1, description="New examples requested per student error.")
    max_ees_per_round: int | None = Field(None, ge=1, description="Cap on errors extrapolated per round.")
    ees_balance: Literal["none", "per_label"] = Field(
        "none",
        description="none: the paper's EES (one request per error per ees_per_error). per_label: the same budget "
        "split into equal per-label quotas, so a biased student does not get a round biased the other way.",
    )
    max_failed_call_fraction: float = Field(
        0.05, ge=0, le=1,
        description="A synthesis step fails (and is not recorded) when more of its teacher calls than this "
        "still fail after retries; --resume then asks again for just those.",
    )
    min_chars: int = Field(8, ge=1, description="Drop generated texts shorter than this.")
    max_chars: int = Field(1200, ge=1, description="Drop generated texts longer than this.")
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1.0, description="Jaccard similarity (word 3-gram MinHash) above which a row is a near-duplicate."
    )
    corpus_rows: int = Field(100_000, ge=1, description="Rows `s3ray generate` writes to <run.output_dir>/corpus.")
    corpus_shard_size: int = Field(
        10_000, ge=64, description="Teacher requests per corpus Parquet shard (the unit of resume and memory)."
    )


class StudentConfig(_Strict):
    model: str = Field(
        "embedded:all-minilm-l6-v2", description="'embedded:all-minilm-l6-v2', a local HF folder, or a hub id."
    )
    kind: Literal["finetune", "embedding_head"] = Field(
        "finetune", description="finetune: the whole encoder | embedding_head: frozen embeddings + linear head."
    )
    epochs: int = Field(4, ge=1, description="Training epochs; the best one on validation is kept.")
    min_steps: int | None = Field(
        None, ge=1, description="Fair budget: every student trains at least this many optimizer steps (its epochs "
        "raised to reach them, at most max_epochs), so one on few rows is not under-trained. None: epochs only.",
    )
    max_epochs: int = Field(20, ge=1, description="Upper bound on the epochs that min_steps may ask for.")
    batch_size: int = Field(32, ge=1, description="Per-worker batch size.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Linear warm-up fraction of the steps.")
    max_length: int = Field(128, ge=8, description="Tokens per input (truncated).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    cpus_per_worker: int | None = Field(
        None, ge=1, description="CPUs (torch threads) per training worker. None: sized from the node a worker "
        "runs on (the largest node for one worker, the smallest split among the workers otherwise), never "
        "more than the free CPUs."
    )
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each training worker, embedding task and mining "
        "actor asks for, e.g. {student_node: 0.1} to keep them on nodes started with that resource.",
    )
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="Data-parallel strategy in Ray Train.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage when strategy=deepspeed.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast dtype (GPU).")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off by default.")


class MiningConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="Rows per inference batch in the Ray Data pipeline.")
    concurrency: int | Literal["auto"] = Field(
        "auto",
        description="Inference actors in the Ray Data pipeline. 'auto': on CPUs one single-threaded actor per "
        "core (up to 8; faster than one multi-threaded actor), on GPUs one actor per free GPU.",
    )
    hard_examples: int = Field(0, ge=0, description="Also keep this many lowest-margin correct rows as errors.")

    @field_validator("concurrency", mode="before")
    @classmethod
    def _actors(cls, v: Any) -> Any:
        return count_or_auto(v, "actors")


class BaselinesConfig(_Strict):
    equal_budget: bool = Field(
        True, description="Train a seed-only student on as many seed rows as the final S3 set (extra generation)."
    )
    real_validation: bool = Field(True, description="Train a student on the real validation rows alone.")
    s3_plus_real: bool = Field(
        True, description="Train a student on the final synthetic set plus the real validation rows (its epoch "
        "picked on held-out real rows): what a user holding those rows would do.",
    )
    real_holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="Part of the validation rows held out to pick that student's epoch."
    )


class S3Config(_Strict):
    """A whole S3 run."""

    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> S3Config:
        if self.synthesis.min_chars >= self.synthesis.max_chars:
            raise ValueError("synthesis.min_chars must be smaller than synthesis.max_chars")
        if self.task.labels and not _task_class(self.task.type).needs_labels:
            raise ValueError(f"task.labels must be empty for {self.task.type} (it predicts no label)")
        if self.synthesis.rationales_per_example > self.synthesis.num_rationales:
            raise ValueError(
                "synthesis.rationales_per_example (k) must be <= synthesis.num_rationales (K)"
            )
        return self

    @property
    def uses_rationales(self) -> bool:
        if self.synthesis.use_rationales is not None:
            return self.synthesis.use_rationales
        return _task_class(self.task.type).rationales_by_default
