"""Pytest plugin (loaded by conftest.py): a tiny BERT student built on the fly, and real rows for it.

`build_tiny_student(path)` is a plain function so benchmarks and other helpers can reuse it. The encoder is
a random-weights BERT (hidden 32, 2 layers, 2 heads) with a WordPiece tokenizer trained in well under a
second on the repo's SST-2 validation texts, saved as a *fast* tokenizer (tokenizer.json) so extractive-QA
offset mappings work. Only the bare encoder is saved: AutoModelForSequenceClassification /
AutoModelForQuestionAnswering add their heads on load, exactly as with a real pretrained encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_SST2_VAL = _REPO / "data" / "sst2" / "validation.jsonl"
_ADQA_SAMPLE = Path(__file__).resolve().parent / "data" / "adqa_sample.jsonl"

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _texts() -> list[str]:
    texts = [r["text"] for r in read_jsonl(_SST2_VAL)] if _SST2_VAL.is_file() else []
    if _ADQA_SAMPLE.is_file():  # QA words too, so contexts are not mostly [UNK]
        for r in read_jsonl(_ADQA_SAMPLE):
            texts += [r["context"], r["question"]]
    return texts + ["positive negative entailment not_entailment question answer"] * 4


def build_tiny_student(path: str | Path, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Write a tiny HF encoder folder (fast WordPiece tokenizer + random BertModel, safetensors) to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_texts(), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    hf_tok = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=hf_tok.pad_token_id,
    )
    BertModel(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_student_dir(session_tmp) -> Path:
    return build_tiny_student(session_tmp / "tiny-student")


@pytest.fixture(scope="session")
def sst2_rows() -> list[dict]:
    """About 200 real SST-2 validation rows (both labels), from the repo's data folder."""
    return read_jsonl(_SST2_VAL, limit=200)


@pytest.fixture(scope="session")
def adqa_rows() -> list[dict]:
    """60 real AdversarialQA rows copied into tests/data (see tests/data/README.md)."""
    return read_jsonl(_ADQA_SAMPLE)


def save_student_checkpoint(encoder_dir, dest, task, max_length: int, head_scale: float | None = None) -> str:
    """A student checkpoint in s3ray's format (HF folder + s3ray_student.json) for `task`, saved directly
    from the task's own student head rather than trained. `head_scale`: re-draw the fresh head's weights
    with that standard deviation, so predictions vary with the input."""
    import torch
    from transformers import AutoTokenizer

    from s3ray.student.checkpoint import write_meta

    dest = Path(dest)
    if (dest / "s3ray_student.json").is_file():
        return str(dest)
    torch.manual_seed(0)
    model = task.student_head().build(str(encoder_dir))
    if head_scale is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("classifier", "qa_outputs", "bert.pooler")):
                    p.normal_(0.0, head_scale)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(encoder_dir)).save_pretrained(dest)
    write_meta(dest, kind="finetune", task_type=task.type, labels=task.labels, max_length=max_length,
               base_model=str(encoder_dir))
    return str(dest)
