"""A causal LM's shape and its exact parameter counts, from a HF config or a preset.

The memory calculator (plan.py) needs the total parameter count, the largest single module (what ZeRO-3
gathers at once) and the dimensions that size activations. GPT-NeoX and Llama are counted from their
architecture formulas; any other architecture is counted by building it on the meta device (no memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# Default LoRA targets per architecture (the attention projections, as the LoRA paper does).
LORA_TARGETS = {"gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class ModelShape:
    arch: str  # HF model_type: gpt_neox | llama | other (then `counted` holds meta-device counts)
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    max_positions: int
    kv_heads: int | None = None  # llama GQA; None: = heads
    tied_embeddings: bool = False
    counted: dict = field(default_factory=dict)  # {"total", "largest"} for architectures without a formula

    # --- parameter counts ------------------------------------------------------------------------
    def total_params(self) -> int:
        if self.counted:
            return int(self.counted["total"])
        h, f, v = self.hidden, self.intermediate, self.vocab
        embeddings = v * h * (1 if self.tied_embeddings else 2)  # input embedding + untied output head
        if self.arch == "gpt_neox":
            # two LayerNorms (weight+bias), fused QKV and output projection with biases, 2-matrix MLP with biases
            per_layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
            return self.layers * per_layer + embeddings + 2 * h  # + final LayerNorm
        if self.arch == "llama":
            kv = (self.kv_heads or self.heads) * (h // self.heads)
            per_layer = 2 * h + (2 * h * h + 2 * h * kv) + 3 * h * f  # 2 RMSNorms, q/k/v/o, gate/up/down
            return self.layers * per_layer + embeddings + h
        raise ValueError(f"no parameter formula for {self.arch!r}; build the shape with shape_from_hf_config")

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (DeepSpeed's `largest_layer_params`)."""
        if self.counted:
            return int(self.counted["largest"])
        h, f = self.hidden, self.intermediate
        return max(self.vocab * h, h * 3 * h + 3 * h, h * f + f)

    def lora_params(self, rank: int, targets: list[str] | None = None) -> int:
        """Trainable parameters of LoRA adapters (A: in x r, B: r x out) on `targets` in every layer."""
        dims = self._module_dims()
        targets = targets or LORA_TARGETS.get(self.arch, [])
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise ValueError(f"LoRA target modules {unknown} are not in {self.arch}; choose from {sorted(dims)}")
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)

    def _module_dims(self) -> dict[str, tuple[int, int]]:
        h, f = self.hidden, self.intermediate
        if self.arch == "gpt_neox":
            return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, f), "dense_4h_to_h": (f, h)}
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def to_dict(self) -> dict:
        return asdict(self)


GPT_NEOX_20B = ModelShape(arch="gpt_neox", layers=44, hidden=6144, heads=64, vocab=50432,
                          intermediate=4 * 6144, max_positions=2048)
PRESETS = {"gpt-neox-20b": GPT_NEOX_20B}


def _meta_counts(hf_config) -> dict:
    """Exact counts by instantiating the architecture on the meta device (no weights allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "largest": largest}


def shape_from_hf_config(hf_config) -> ModelShape:
    """A ModelShape from a transformers PretrainedConfig."""
    c = hf_config
    arch = c.model_type
    shape = ModelShape(
        arch=arch,
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        vocab=c.vocab_size,
        intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
        max_positions=getattr(c, "max_position_embeddings", 2048),
        kv_heads=getattr(c, "num_key_value_heads", None),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )
    llama_plain = not (getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False))
    formula_ok = (arch == "llama" and llama_plain) or (arch == "gpt_neox" and getattr(c, "attention_bias", True))
    if not formula_ok:
        shape = ModelShape(**{**shape.to_dict(), "counted": _meta_counts(c)})
    return shape


def shape_from_path(path: str | Path) -> ModelShape:
    """The shape of a local HF model folder (reads config.json only)."""
    from transformers import AutoConfig

    return shape_from_hf_config(AutoConfig.from_pretrained(str(path), trust_remote_code=False))
