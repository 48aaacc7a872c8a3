"""Generation mode: the fine-tuned teacher writes new input-output pairs in the format it was trained on
(classification: label -> text; pair: a kept real text_a + label -> text_b; QA: a kept paragraph + a picked
answer span -> question), parsed with the task's own parser; unusable replies are counted by reason, never
kept silently. Sampling runs with transformers `generate` in this process (seeded, in left-padded batches),
fine for the thousand-row sets this mode is used with; a large run serves the exported folder with the teacher
pool instead."""

from __future__ import annotations

import random
from collections import Counter

from s3ray.finetune.formats import generation_messages, prompt_ids
from s3ray.tasks.base import ParseError, Task


def generation_jobs(task: Task, contexts: list[dict], per_label: int, seed: int) -> list[tuple]:
    """(label, context) for every example to request. Pair/QA need real contexts (rows with text_a /
    context); classification needs none."""
    rng = random.Random(seed)
    if task.type == "classification":
        return [(lab, None) for lab in task.labels for _ in range(per_label)]
    if not contexts:
        raise ValueError(f"{task.type} generation keeps real contexts: give rows with {task.context_fields}")
    picked = [contexts[rng.randrange(len(contexts))] for _ in range(per_label)]
    if task.type == "extractive_qa":
        jobs = [(None, task.seed_context(c, rng)) for c in picked]
        return [(lab, c) for lab, c in jobs if c.get("answer")]  # a paragraph with no span is skipped
    return [(lab, c) for c in picked for lab in task.labels]


def generate_rows(model, tokenizer, task: Task, jobs: list[tuple], temperature: float, top_p: float,
                  max_tokens: int, seed: int, batch_size: int = 16) -> tuple[list[dict], Counter]:
    """Parsed new rows and the count of dropped replies by ParseError reason. Prompts are sampled
    `batch_size` at a time (left-padded), which is what makes 1,000 rows affordable on a CPU."""
    import torch

    from s3ray.finetune.annotate import left_padded

    rows, dropped = [], Counter()
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or tokenizer.eos_token_id)
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        ids, mask = left_padded([prompt_ids(tokenizer, generation_messages(task, lab, c)) for lab, c in chunk], pad)
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 do_sample=temperature > 0, temperature=temperature or None, top_p=top_p,
                                 max_new_tokens=max_tokens, eos_token_id=eos or tokenizer.eos_token_id,
                                 pad_token_id=pad)
        for (label, ctx), seq in zip(chunk, out[:, ids.shape[1]:]):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            try:
                rows.append({**task.parse_example(text, label, ctx), "teacher_text": text})
            except ParseError as e:
                dropped[e.reason] += 1
    return rows, dropped
