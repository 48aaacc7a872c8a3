"""Memory calculator: will a fine-tune fit, and if not, the nearest setting that does.

Model states follow DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`): 16-bit mixed precision keeps, per parameter, 2 bytes of 16-bit
weights, 2 of 16-bit gradients and 16 of fp32 state (master weights 4, fp32 gradients 4, Adam m and v 8);
DeepSpeed's ZeRO-3 figure counts 18 of those 20 bytes (the 16-bit gradients live in the reduce buckets),
partitioned over all GPUs, plus the largest layer gathered in full (4 bytes/param: weights and gradients).
ZeRO-0/1 have no estimator in DeepSpeed and use the same byte counts. Activations use Korthikanti et al.
(2022): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; with activation checkpointing only each layer's
input (2*s*b*h) is kept and one layer is recomputed at a time. Logits add 6*s*b*V (16-bit and fp32 for the
loss). The margin is `margin_fraction` of the rest plus `overhead_gib` (CUDA context, NCCL, allocator).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from s3ray.finetune.shape import ModelShape

GIB = 2**30


@dataclass(frozen=True)
class Setting:
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] | None = None
    gpus_per_node: int = 1
    nodes: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = True
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    gpu_memory_gib: float = 80.0
    cpu_memory_gib: float | None = None  # per node; None: not checked
    zero_init: bool = True  # deepspeed.zero.Init: weights are created already partitioned
    buffer_factor: float = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
    margin_fraction: float = 0.1
    overhead_gib: float = 2.0
    max_gpus_per_node: int = 8

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass
class MemoryPlan:
    setting: Setting
    total_params: int
    trainable_params: int
    largest_layer_params: int
    gpu: dict  # bytes per GPU: params, grads, optimizer, activations, margin, total
    cpu_per_node: int  # bytes
    fits: bool
    why: str  # what does not fit, or "fits"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["setting"]["lora_targets"] = list(self.setting.lora_targets or [])
        return d


def check_setting(s: Setting) -> str | None:
    """What is inconsistent in a setting (the field and the fix), else None."""
    if s.zero_stage not in (0, 1, 2, 3):
        return f"zero_stage={s.zero_stage}: choose 0, 1, 2 or 3"
    if s.offload_params and s.zero_stage != 3:
        return "offload_params needs zero_stage=3 (only ZeRO-3 partitions the weights)"
    if s.offload_optimizer and s.zero_stage == 0:
        return "offload_optimizer needs zero_stage>=1 (ZeRO-Offload moves partitioned optimizer states)"
    if s.dtype not in ("bf16", "fp16", "fp32"):
        return f"dtype={s.dtype!r}: choose bf16, fp16 or fp32"
    if min(s.gpus_per_node, s.nodes, s.micro_batch, s.seq_len) < 1:
        return "gpus_per_node, nodes, micro_batch and seq_len must be >= 1"
    return None


def _bytes_per_param(dtype: str) -> tuple[int, int, int, int]:
    """(weight, partitioned fp32 gradient, optimizer, whole 16-bit gradient) bytes per trainable parameter.
    16-bit: DeepSpeed's 2 + (4 fp32 grads + 4 fp32 master + 8 Adam); fp32 needs no master copy."""
    return (4, 4, 8, 0) if dtype == "fp32" else (2, 4, 12, 2)


def model_state_bytes(params: int, largest: int, s: Setting) -> dict:
    """Per-GPU bytes of params/grads/optimizer for `params` trainable parameters (DeepSpeed's split), and the
    per-node CPU bytes (DeepSpeed's formulas, `buffer_factor` included)."""
    n, per_node, f = s.gpus, s.gpus_per_node, 1 / s.nodes
    W, G, O, G16 = _bytes_per_param(s.dtype)
    off_opt = s.offload_optimizer
    if s.zero_stage == 3:
        # The largest layer is gathered whole (weights and gradients) while it runs.
        gpu = {"params": W * largest + (0 if s.offload_params else W * params / n),
               "grads": W * largest + (0 if off_opt else G * params / n),
               "optimizer": 0 if off_opt else O * params / n}
        if off_opt:
            mult = 18 if s.offload_params else 16
            cpu = params * (mult * f if s.zero_init else max(4 * per_node, mult * f)) * s.buffer_factor
        else:
            cpu = (largest if s.zero_init else params) * 4 * per_node * s.buffer_factor
        return {"gpu": gpu, "cpu": int(cpu)}
    shard = 1 if s.zero_stage == 0 else n
    whole_grads = 0 if s.zero_stage == 2 else G16 * params  # ZeRO-0/1 keep whole 16-bit gradients
    if s.zero_stage == 2:
        whole_grads, G = 0, G + G16  # DeepSpeed counts the 16-bit gradients partitioned at ZeRO-2
    gpu = {"params": W * params,
           "grads": whole_grads + (0 if off_opt else G * params / shard),
           "optimizer": 0 if off_opt else O * params / shard}
    if off_opt:
        cpu = params * max(4 * n, 16) * s.buffer_factor
    else:
        cpu = params * 4 * per_node * s.buffer_factor
    return {"gpu": gpu, "cpu": int(cpu)}


def activation_bytes(shape: ModelShape, s: Setting) -> int:
    sbh = s.seq_len * s.micro_batch * shape.hidden
    full_layer = sbh * (34 + 5 * shape.heads * s.seq_len / shape.hidden)
    layers = shape.layers * 2 * sbh + full_layer if s.activation_checkpointing else shape.layers * full_layer
    logits = 6 * s.seq_len * s.micro_batch * shape.vocab
    return int((layers + logits) * (2 if s.dtype == "fp32" else 1))


def estimate(shape: ModelShape, s: Setting) -> MemoryPlan:
    problem = check_setting(s)
    if problem:
        raise ValueError(problem)
    total, largest = shape.total_params(), shape.largest_layer_params()
    w = 4 if s.dtype == "fp32" else 2
    if s.lora_rank:
        trainable = shape.lora_params(s.lora_rank, list(s.lora_targets) if s.lora_targets else None)
        states = model_state_bytes(trainable, 0, s)
        # Frozen base weights: 16-bit, no gradients or optimizer states; ZeRO-3 partitions them too.
        frozen = w * total / s.gpus + w * largest if s.zero_stage == 3 else w * total
        if s.zero_stage == 3 and s.offload_params:
            frozen = w * largest
        states["gpu"]["params"] += frozen
        states["cpu"] += int(total * 4 * s.gpus_per_node * s.buffer_factor) if s.offload_params else 0
    else:
        trainable = total
        states = model_state_bytes(total, largest, s)
    gpu = {k: int(v) for k, v in states["gpu"].items()}
    gpu["activations"] = activation_bytes(shape, s)
    rest = sum(gpu.values())
    gpu["margin"] = int(rest * s.margin_fraction + s.overhead_gib * GIB)
    gpu["total"] = rest + gpu["margin"]
    cpu = states["cpu"]
    why = "fits"
    if gpu["total"] > s.gpu_memory_gib * GIB:
        why = f"needs {gpu['total'] / GIB:.1f} GiB per GPU, has {s.gpu_memory_gib:g} GiB"
    elif s.cpu_memory_gib is not None and cpu > s.cpu_memory_gib * GIB:
        why = f"needs {cpu / GIB:.1f} GiB of CPU memory per node, has {s.cpu_memory_gib:g} GiB"
    return MemoryPlan(s, total, trainable, largest, gpu, cpu, why == "fits", why)


# ----------------------------------------------------------------------------- nearest fitting setting

def _moves(s: Setting) -> list[tuple[str, Setting]]:
    """Single changes, cheapest first (what they cost in speed, hardware or model quality)."""
    out = []
    if not s.activation_checkpointing:
        out.append(("activation_checkpointing=true", replace(s, activation_checkpointing=True)))
    if s.micro_batch > 1:
        out.append((f"micro_batch={s.micro_batch // 2} (x2 gradient accumulation)",
                    replace(s, micro_batch=s.micro_batch // 2)))
    if s.zero_stage < 3:
        out.append((f"zero_stage={s.zero_stage + 1}", replace(s, zero_stage=s.zero_stage + 1)))
    if s.gpus_per_node < s.max_gpus_per_node:
        g = min(s.max_gpus_per_node, s.gpus_per_node * 2)
        out.append((f"gpus_per_node={g}", replace(s, gpus_per_node=g)))
    else:
        out.append((f"nodes={s.nodes * 2}", replace(s, nodes=s.nodes * 2)))
    if s.zero_stage >= 1 and not s.offload_optimizer:
        out.append(("offload_optimizer=true", replace(s, offload_optimizer=True)))
    if s.zero_stage == 3 and s.offload_optimizer and not s.offload_params:
        out.append(("offload_params=true", replace(s, offload_params=True)))
    if not s.lora_rank:
        out.append(("method=lora (rank 16)", replace(s, lora_rank=16)))
    return out


def nearest_fit(shape: ModelShape, s: Setting, max_changes: int = 4) -> tuple[list[str], MemoryPlan] | None:
    """The fitting setting with the fewest changes (earlier, cheaper moves win ties), or None."""
    frontier: list[tuple[list[str], Setting]] = [([], s)]
    seen = {s}
    for _ in range(max_changes):
        nxt = []
        for changes, cur in frontier:
            for what, cand in _moves(cur):
                if cand in seen or check_setting(cand):
                    continue
                seen.add(cand)
                plan = estimate(shape, cand)
                if plan.fits:
                    return [*changes, what], plan
                nxt.append(([*changes, what], cand))
        frontier = nxt
    return None


def format_plan(plan: MemoryPlan) -> str:
    s, g = plan.setting, plan.gpu
    method = f"LoRA r={s.lora_rank}" if s.lora_rank else "full fine-tune"
    off = ", ".join(n for n, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on)
    lines = [
        (f"{method}, ZeRO-{s.zero_stage}{' offload ' + off if off else ''}, {s.dtype}, {s.nodes} node(s) x "
        f"{s.gpus_per_node} GPU(s), micro-batch {s.micro_batch} x {s.seq_len} tokens, activation "
        f"checkpointing {'on' if s.activation_checkpointing else 'off'}"),
        (f"params {plan.total_params / 1e9:.3f} B (trainable {plan.trainable_params / 1e6:.2f} M, "
        f"largest layer {plan.largest_layer_params / 1e6:.1f} M)"),
        "per GPU (GiB): " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in g.items()),
        f"per node CPU (GiB): {plan.cpu_per_node / GIB:.2f}",
        f"{'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.why} (GPU {s.gpu_memory_gib:g} GiB"
        + (f", CPU {s.cpu_memory_gib:g} GiB/node)" if s.cpu_memory_gib is not None else ")"),
    ]
    return "\n".join(lines)


def plan_or_explain(shape: ModelShape, s: Setting) -> tuple[MemoryPlan, str]:
    """The plan and a printable explanation that names the nearest fitting setting when it does not fit."""
    plan = estimate(shape, s)
    text = format_plan(plan)
    if not plan.fits:
        near = nearest_fit(shape, s)
        if near is None:
            text += "\nno setting within 4 changes fits; use more GPUs or a smaller model"
        else:
            changes, p = near
            text += f"\nnearest setting that fits: {', '.join(changes)} -> {p.gpu['total'] / GIB:.1f} GiB per GPU"
    return plan, text

