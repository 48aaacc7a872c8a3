"""Typed run configuration, loaded from YAML.

Every field carries a description; `s3ray config --explain` prints them. Unknown keys are errors
(a typo must not silently fall back to a default), and every error names the field path and the
allowed values before any model is loaded.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from s3ray.redact import redact_url


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    name: str = Field("s3-run", description="Run name, used in the report title.")
    output_dir: str = Field("runs/s3-run", description="Run directory: Parquet rounds, manifest, report.")
    seed: int = Field(0, description="Master seed: every sampling seed, split and shuffle derives from it.")
    seeds: list[int] | None = Field(
        None, description="`s3ray sweep`: one whole run per seed, in <output_dir>/seed<N>, and a mean ± std report.",
    )


class RayConfig(_Strict):
    address: str | None = Field(
        None,
        description="Ray cluster to join ('auto', 'ray://host:10001'). None starts a local cluster.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None: all).")


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
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker).")
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
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a whole number of actors >= 1, or 'auto' (got {v!r})")


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
        if self.task.type == "extractive_qa" and self.task.labels:
            raise ValueError("task.labels must be empty for extractive_qa (answers are spans, not labels)")
        if self.synthesis.rationales_per_example > self.synthesis.num_rationales:
            raise ValueError(
                "synthesis.rationales_per_example (k) must be <= synthesis.num_rationales (K)"
            )
        return self

    @property
    def uses_rationales(self) -> bool:
        if self.synthesis.use_rationales is not None:
            return self.synthesis.use_rationales
        return self.task.type == "classification"


def _did_you_mean(loc: tuple) -> str:
    """For an unknown field: the closest real field of the same section, if one is close."""
    model: Any = S3Config
    for part in loc[:-1]:
        f = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = f.annotation if f is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    """One line: `invalid config SOURCE: a.b: problem; c: problem` (the CLI prints errors as one line)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `s3ray config --explain` lists every field)"
            msg += _did_you_mean(e["loc"])
        elif e["type"] == "missing":
            msg = "required field is missing"
            if e["loc"] == ("data",):
                msg += " (add data: {validation: path/to/validation.jsonl})"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return f"invalid config {source}: " + "; ".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings from the command line; values are parsed as YAML scalars."""
    out = []
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r}: expected section.field=value, e.g. synthesis.rounds=1")
        k, v = p.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError:
            raise ConfigError(f"override {p!r}: the value is not a YAML scalar or list; quote it") from None
    return out


def config_from_dict(raw: dict, source: str = "(dict)", overrides: list[str] | None = None) -> S3Config:
    raw = dict(raw or {})
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v)
    try:
        return S3Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> S3Config:
    """Load and validate a YAML run config. Relative data paths resolve against the current directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (examples live in configs/)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config {path} is not valid YAML{where}: {what}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections (run, data, teacher, ...)")
    return config_from_dict(raw, str(path), overrides)


def _type_name(ann: Any) -> str:
    """`int | Literal['auto']`, `str | None`, `list[str]`: a field's type as a person writes it."""
    if ann is type(None):
        return "None"
    if isinstance(ann, type):
        return ann.__name__
    if get_origin(ann) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    return str(ann).replace("typing.", "")


def explain(model: type[BaseModel] = S3Config, prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default, description."""
    lines = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        dotted = f"{prefix}{name}"
        if sub is not None:
            lines.append(f"{dotted}:  {f.description or sub.__doc__ or ''}".rstrip())
            lines.extend(explain(sub, dotted + "."))
        else:
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            tname = _type_name(ann)
            lines.append(f"  {dotted} ({tname}, default {default}): {f.description or ''}")
    return lines
