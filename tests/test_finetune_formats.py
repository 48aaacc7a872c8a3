"""Training formats for all three task families: prompts, completions, and loss only on the completion."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from s3ray.config import TaskConfig
from s3ray.config.schema import TeacherConfig
from s3ray.finetune.formats import IGNORE, encode, render_prompt, training_pairs
from s3ray.tasks import make_task
from s3ray.teacher.teacher import make_teacher
from s3ray.teacher.types import GenerationRequest, GenerationResult

CLS_ROW = {"text": "a gripping, funny and warm film", "label": "positive"}
PAIR_ROW = {"text_a": "Duke University is in Durham, the City of Medicine.", "text_b": "Duke is in Durham.",
            "label": "entailment"}
QA_ROW = {"context": "The Hoppings funfair is held on the Town Moor every June.", "question":
          "When is the Hoppings held?", "answer": "June", "answer_start": 51}


def _task(kind):
    if kind == "classification":
        return make_task(TaskConfig(type="classification"), ["negative", "positive"]), CLS_ROW
    if kind == "pair":
        return make_task(TaskConfig(type="pair", description="premise"), ["entailment", "not_entailment"]), PAIR_ROW
    return make_task(TaskConfig(type="extractive_qa", description="paragraph"), None), QA_ROW


@pytest.fixture(scope="module")
def tok(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.mark.parametrize("kind", ["classification", "pair", "extractive_qa"])
def test_both_directions_for_every_family(kind, tok):
    task, row = _task(kind)
    ann, gen = training_pairs(task, [row], "both")
    # annotation: the inputs are in the prompt, the label (QA: the answer) is the completion
    if kind == "extractive_qa":
        assert row["question"] in ann.messages[-1]["content"] and ann.completion == "June"
        # generation: paragraph + answer -> the question
        assert "June" in gen.messages[-1]["content"] and gen.completion == row["question"]
    elif kind == "pair":
        assert row["text_b"] in ann.messages[-1]["content"] and ann.completion == "entailment"
        assert row["text_a"] in gen.messages[-1]["content"] and "entailment" in gen.messages[-1]["content"]
        assert row["text_b"] not in gen.messages[-1]["content"] and gen.completion == row["text_b"]
    else:
        assert row["text"] in ann.messages[-1]["content"] and ann.completion == "positive"
        assert "movie review" in gen.messages[-1]["content"] and "positive" in gen.messages[-1]["content"]
        assert gen.completion == row["text"]


@pytest.mark.parametrize("kind", ["classification", "pair", "extractive_qa"])
def test_loss_only_on_the_completion_and_template_used(kind, tok):
    task, row = _task(kind)
    for pair in training_pairs(task, [row], "both"):
        enc = encode(tok, pair, 512)
        prompt = render_prompt(tok, pair.messages)
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        n_prompt = sum(1 for x in enc["labels"] if x == IGNORE)
        assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt and IGNORE not in enc["labels"][n_prompt:]
        assert tok.decode(enc["input_ids"][:n_prompt]) == prompt
        target = tok.decode(enc["labels"][n_prompt:])
        assert target == pair.completion + "<|im_end|>\n"  # the turn's end marker teaches the model to stop


def test_plain_layout_without_chat_template_and_long_prompts_cut_at_the_front(tiny_teacher_dir):
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.chat_template = None
    task, row = _task("classification")
    pair = training_pairs(task, [{**row, "text": "long " * 300}], "annotate")[0]
    enc = encode(tok, pair, 64)
    assert len(enc["input_ids"]) == 64
    decoded = tok.decode(enc["input_ids"])
    assert decoded.endswith("### Response:\npositive" + tok.eos_token)
    assert encode(tok, training_pairs(task, [row], "generate")[0], 3) is None  # completion alone too long


def test_micro_schedule_is_even_across_ranks_covers_every_row_and_repeats_for_a_resume():
    from s3ray.finetune.worker import micro_schedule

    ranks = [micro_schedule(13, 2, r, micro_batch=4, epochs=2, seed=7) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # ceil(13 / 2) = 7 rows -> 2 micro-batches per epoch
    first_epoch = [i for r in ranks for mb in r[:2] for i in mb]
    assert set(first_epoch) == set(range(13))  # every row seen once (one repeat pads the short shard)
    assert micro_schedule(13, 2, 0, 4, 2, seed=7) == ranks[0]
    assert micro_schedule(13, 2, 0, 4, 2, seed=8) != ranks[0]


def test_deepspeed_config_follows_the_training_section():
    from s3ray.finetune.config import deepspeed_config, finetune_config_from_dict

    cfg = finetune_config_from_dict({"model": {"preset": "gpt-neox-20b"}, "training": {
        "zero_stage": 3, "offload_optimizer": True, "offload_params": True, "micro_batch": 2, "grad_accum": 3}})
    ds = deepspeed_config(cfg, world=8)
    assert ds["train_batch_size"] == 2 * 3 * 8 and ds["bf16"]["enabled"]
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"]  # export gathers 16-bit weights from the shards


@pytest.mark.parametrize("kind", ["pair", "extractive_qa"])
def test_generation_jobs_keep_real_contexts_and_every_reply_is_kept_or_counted(kind, tiny_teacher_dir):
    from s3ray.finetune.generate import generate_rows, generation_jobs, generation_requests, parse_replies

    task, row = _task(kind)
    jobs = generation_jobs(task, [row], per_label=3, seed=0)
    if kind == "pair":
        assert len(jobs) == 3 * 2 and all(c is row for _, c in jobs) and {lab for lab, _ in jobs} == set(task.labels)
    else:  # a picked answer span of the kept paragraph, no label
        assert jobs and all(lab is None and c["answer"] in row["context"] for lab, c in jobs)
    with pytest.raises(ValueError, match="keeps real contexts"):
        generation_jobs(task, [], per_label=1, seed=0)
    cfg = TeacherConfig(model=str(tiny_teacher_dir), engine="transformers", dtype="float32")
    with make_teacher(cfg, str(tiny_teacher_dir), run_seed=0, backend="local") as teacher:
        rows, dropped = generate_rows(teacher, task, jobs, temperature=1.0, top_p=1.0, max_tokens=12, seed=0)
    assert len(rows) + sum(dropped.values()) == len(jobs)  # the random teacher's gibberish is counted, not lost
    reqs = generation_requests(task, jobs, 1.0, 1.0, 12, seed=0)  # stable ids and seeds: a resume asks the same
    assert reqs == generation_requests(task, jobs, 1.0, 1.0, 12, seed=0)
    assert len({r.sampling.seed for r in reqs}) == len(reqs) and len({r.request_id for r in reqs}) == len(reqs)
    failed = [GenerationResult(r.request_id, error="replica died") for r in reqs]
    assert parse_replies(task, jobs, failed) == ([], {"teacher_error": len(jobs)})


def test_a_base_model_s_plain_layout_is_what_the_teacher_pool_renders_from_its_export(tiny_teacher_dir):
    """A base model (no chat template) trains on the plain layout; its export carries that layout as its
    chat template, so the teacher pool's engines (render_prompt_ids) send exactly the trained prompt ids."""
    from s3ray.finetune.formats import (
        PLAIN_TEMPLATE,
        annotation_messages,
        completion_ids,
        prompt_ids,
        template_of,
    )
    from s3ray.teacher.engines import render_prompt_ids

    base = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    base.chat_template = None
    exported = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    exported.chat_template = template_of(base)  # what export.py saves
    assert exported.chat_template == PLAIN_TEMPLATE
    task, row = _task("pair")
    msgs = annotation_messages(task, row)
    trained = prompt_ids(base, msgs)
    assert render_prompt_ids(exported, GenerationRequest("r", tuple(msgs))) == trained == prompt_ids(exported, msgs)
    assert completion_ids(exported, msgs, "entailment") == completion_ids(base, msgs, "entailment")
    assert base.decode(completion_ids(base, msgs, "entailment")) == "entailment" + base.eos_token


@pytest.mark.parametrize("kind", ["classification", "pair"])
def test_cached_label_scoring_equals_scoring_each_whole_sequence(kind, tiny_teacher_dir):
    """The annotator runs each prompt once and reuses its cache per label; the scores must be exactly what
    a plain forward pass over prompt + completion gives, with prompts of different lengths in one batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from s3ray.finetune.annotate import annotate_rows
    from s3ray.finetune.formats import annotation_messages, completion_ids, prompt_ids

    task, row = _task(kind)
    key = "text" if kind == "classification" else "text_b"
    rows = [row, {**row, key: row[key] + " and a much longer tail of words here"}, {**row, key: "short"}]
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    anns = annotate_rows(model, tok, task, rows, batch_size=2)  # a full batch and a ragged last one
    for r, a in zip(rows, anns):
        msgs = annotation_messages(task, r)
        for lab in task.labels:
            p, c = prompt_ids(tok, msgs), completion_ids(tok, msgs, lab)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
            whole = float(sum(logp[len(p) - 1 + k, t] for k, t in enumerate(c)))
            assert a.logprobs[lab] == pytest.approx(whole, abs=1e-3)
        assert a.label == max(a.logprobs, key=a.logprobs.get) and 0.5 <= a.confidence <= 1


def test_pool_mean_calibration_removes_a_label_bias_shared_by_every_row():
    """A teacher that favours "positive" for every row by about 2 nats, more for some rows than for others:
    raw argmax says positive everywhere; calibrated, the rows it favours positive less than usual turn
    negative, the order of rows by margin is kept, and the raw log-probabilities stay."""
    from s3ray.finetune.annotate import Annotation, _from_logprobs, annotation_report, calibrated

    margins = [0.5, 1.0, 1.5, 2.5, 3.0, 3.5]  # positive minus negative
    raw = [Annotation(*_from_logprobs(lp), lp) for lp in ({"negative": -3.0, "positive": -3.0 + m} for m in margins)]
    assert {a.label for a in raw} == {"positive"}
    cal, prior = calibrated(raw)
    assert prior == {"negative": -3.0, "positive": -3.0 + sum(margins) / len(margins)}
    assert [a.label for a in cal] == ["negative"] * 3 + ["positive"] * 3
    assert [a.logprobs for a in cal] == [a.logprobs for a in raw]
    conf = [a.confidence if a.label == "positive" else 1 - a.confidence for a in cal]
    assert conf == sorted(conf) and all(0.5 <= a.confidence <= 1 for a in cal)
    task, _ = _task("classification")
    rows = [{"text": str(m), "label": "negative" if m < 2 else "positive"} for m in margins]
    assert annotation_report(task, rows, cal, 0.5)["agreement"] == 1.0
    assert annotation_report(task, rows, raw, 0.5)["agreement"] == 0.5
    assert calibrated([]) == ([], {})
