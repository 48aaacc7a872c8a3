"""Tokenisation shared by training and prediction: text pairs for classifiers, SQuAD-style span features
for extractive QA (question first, context second, long contexts split into overlapping windows), and the
training loader over the tokenised features."""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler
from transformers import DataCollatorWithPadding

MAX_ANSWER_TOKENS = 30


def qa_stride(max_length: int) -> int:
    """Overlap between context windows of one long context (HF's run_qa uses 128 at max_length 384)."""
    return max(8, min(128, max_length // 4))


def encode_texts(tokenizer, texts_a: list[str], texts_b: list[str | None] | None, max_length: int, **kw):
    """Tokenise single texts or text pairs, truncated to max_length (no padding: batches pad dynamically)."""
    if texts_b is not None and all(b is None for b in texts_b):
        texts_b = None
    if texts_b is not None and any(b is None for b in texts_b):
        raise ValueError("a batch mixes single texts and text pairs; task.student_inputs must be consistent")
    return tokenizer(
        list(texts_a),
        list(texts_b) if texts_b is not None else None,
        truncation=True,
        max_length=max_length,
        **kw,
    )


def encode_qa(tokenizer, questions: list[str], contexts: list[str], max_length: int, **kw):
    """Question + context windows; `overflow_to_sample_mapping` says which row each window came from."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "extractive QA needs a fast tokenizer (offset mappings); save the model with tokenizer.json"
        )
    return tokenizer(
        _clip_questions(tokenizer, questions, max_length // 2),
        list(contexts),
        truncation="only_second",
        max_length=max_length,
        stride=qa_stride(max_length),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        **kw,
    )


def _clip_questions(tokenizer, questions: list[str], max_tokens: int) -> list[str]:
    """Questions cut to `max_tokens` tokens, so the context always keeps a window (a question longer than
    max_length would make `truncation="only_second"` fail). Leading spaces waste tokens: stripped."""
    qs = [str(q).lstrip() for q in questions]
    enc = tokenizer(qs, add_special_tokens=False, return_offsets_mapping=True)
    return [
        q if len(offs) <= max_tokens else q[: offs[max_tokens - 1][1]]
        for q, offs in zip(qs, enc["offset_mapping"])
    ]


def qa_train_features(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """One training feature per context window with start/end token positions of the gold answer; a
    window that does not contain the whole answer points at token 0 (the "no answer here" convention)."""
    enc = encode_qa(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length)
    feats = []
    for i in range(len(enc["input_ids"])):
        row = rows[enc["overflow_to_sample_mapping"][i]]
        start_char = int(row["answer_start"])
        end_char = start_char + len(row["answer"])
        seq = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        ctx = [t for t, s in enumerate(seq) if s == 1]
        start_tok = end_tok = 0
        if ctx and offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char:
            start_tok = next(t for t in ctx if offsets[t][1] > start_char)
            end_tok = next(t for t in reversed(ctx) if offsets[t][0] < end_char)
        feat = {k: enc[k][i] for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")}
        feat["start_positions"], feat["end_positions"] = start_tok, end_tok
        feats.append(feat)
    return feats


def make_loader(features: list[dict], tokenizer, batch_size: int, seed: int, rank: int = 0, world: int = 1):
    """Seeded shuffling (a DistributedSampler, also for one worker, so 1 and N workers see the same order
    rules) and dynamic padding per batch."""
    sampler = DistributedSampler(features, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(features, batch_size=batch_size, sampler=sampler, collate_fn=collate), sampler
