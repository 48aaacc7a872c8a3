"""Pair (RTE/QNLI) and extractive-QA tasks: prompts, parsers with counted reasons, span checks, metrics."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest

from s3ray.config import TaskConfig
from s3ray.tasks import ParseError, make_task, task_class
from s3ray.tasks.answer_spans import MAX_SPAN_WORDS, candidate_spans, sentence_around
from s3ray.tasks.base import merge_stats
from s3ray.tasks.pair import PairTask
from s3ray.tasks.qa import ExtractiveQATask, exact_match, find_span, normalize_answer, token_f1

REPO = Path(__file__).resolve().parents[1]
PREMISE = (
    "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
    "according to the Christopher Reeve Foundation."
)
QUESTION = "What is the first major city in the stream of the Rhine?"
PARAGRAPH = (
    "Another green space in Newcastle is the Town Moor, lying immediately north of the city centre. "
    "The Hoppings funfair, said to be the largest travelling funfair in Europe, is held here annually in June."
)


@pytest.fixture
def rte() -> PairTask:
    return make_task(TaskConfig(type="pair", description="premise"), ["entailment", "not_entailment"])


@pytest.fixture
def qnli() -> PairTask:
    return make_task(TaskConfig(type="pair", description="question"), ["entailment", "not_entailment"])


@pytest.fixture
def qa() -> ExtractiveQATask:
    return make_task(TaskConfig(type="extractive_qa", description="paragraph"), None)


def _drop_reason(task, reply: str, label, ctx) -> str:
    """The counted reason a reply is rejected with (fails the test if it is accepted)."""
    with pytest.raises(ParseError) as e:
        task.parse_example(reply, label, ctx)
    return e.value.reason


def _user(messages) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


# --- pair: prompts -------------------------------------------------------------------------------------

def test_make_task_builds_pair_and_qa(rte, qa):
    assert isinstance(rte, PairTask) and rte.fields == ("text_a", "text_b") and rte.context_fields == ("text_a",)
    assert isinstance(qa, ExtractiveQATask) and qa.labels is None and qa.primary_metric == "f1"


def test_pair_seed_prompt_keeps_premise_and_label_words(rte):
    ent = _user(rte.seed_messages("entailment", [], {"text_a": PREMISE}))
    not_ent = _user(rte.seed_messages("not_entailment", [], {"text_a": PREMISE}))
    assert PREMISE in ent and PREMISE in not_ent
    assert "must be true if the premise is true" in ent
    assert "not implied" in not_ent and "must be true" not in not_ent


def test_pair_prompts_read_as_questions_for_qnli(qnli):
    ent = _user(qnli.seed_messages("entailment", [], {"text_a": QUESTION}))
    assert QUESTION in ent and "answer to the question" in ent
    assert "does not answer the question" in _user(qnli.seed_messages("not_entailment", [], {"text_a": QUESTION}))


def test_pair_label_words_come_from_config_first():
    task = make_task(
        TaskConfig(type="pair", description="claim", label_descriptions={"yes": "a sentence that the claim proves"}),
        ["yes", "no"],
    )
    prompt = _user(task.seed_messages("yes", [], {"text_a": "The sky is blue."}))
    assert "a sentence that the claim proves" in prompt
    # Unknown label without a description: a generic fallback that still names the label.
    assert "'no' relation to the claim" in _user(task.seed_messages("no", [], {"text_a": "The sky is blue."}))


def test_pair_ees_prompt_keeps_error_context_and_gold_label(rte):
    err = {"text_a": PREMISE, "text_b": "Christopher Reeve had an accident.", "label": "not_entailment"}
    prompt = _user(rte.ees_messages(err))
    assert PREMISE in prompt and "Christopher Reeve had an accident." in prompt
    assert "not implied" in prompt


def test_pair_seed_needs_a_context(rte):
    with pytest.raises(ValueError, match="text_a"):
        rte.seed_messages("entailment", [], None)


# --- pair: parsing -------------------------------------------------------------------------------------

PAIR_CASES = [
    ("Dana Reeve died of cancer.", None),
    ('Hypothesis: "Dana Reeve died of lung cancer."', None),
    ("Premise: Dana Reeve ...\nHypothesis: Dana Reeve was 44 years old.", None),
    ("Sure! Here is a sentence: Dana Reeve was married to an actor.\n\nThis is entailed because...", None),
    ("Dana Reeve has died of lung cancer.", None),  # a part of the premise is a fine hypothesis
    ("", "empty"),
    ("   \n ", "empty"),
    (PREMISE, "copies_premise"),
    ("Sentence: " + PREMISE.replace("44", "44 years"), "copies_premise"),
    ("Ok.", "too_short"),
    ("Dana " * 400, "too_long"),
    ("I'm sorry, but I cannot write that sentence.", "refusal"),
    ("As an AI language model, I will not do this.", "refusal"),
    ("Write a sentence that must be true if the premise is true.", "echoed_instruction"),
    ("... 1234 5678 ...", "no_words"),
]


@pytest.mark.parametrize("reply,reason", PAIR_CASES)
def test_pair_parse_example(rte, reply, reason):
    ctx = {"text_a": PREMISE}
    if reason is None:
        row = rte.parse_example(reply, "entailment", ctx)
        assert row["text_a"] == PREMISE and row["label"] == "entailment"
        assert row["text_b"] and row["text_b"] != PREMISE and "Hypothesis" not in row["text_b"]
        assert rte.validate_row(row) is None
    else:
        assert _drop_reason(rte, reply, "entailment", ctx) == reason


def test_pair_parse_reasons_are_countable(rte):
    """The loop counts `ParseError.reason`; a realistic batch of replies gives a stable tally."""
    tally = collections.Counter()
    for reply, _ in PAIR_CASES:
        try:
            rte.parse_example(reply, "entailment", {"text_a": PREMISE})
            tally["ok"] += 1
        except ParseError as e:
            tally[e.reason] += 1
    assert tally == collections.Counter({"ok": 5, "empty": 2, "copies_premise": 2, "refusal": 2, "too_short": 1,
                                         "too_long": 1, "echoed_instruction": 1, "no_words": 1})


def test_qnli_rejects_a_second_question(qnli):
    reply = "Which city is first on the Rhine river?"
    assert _drop_reason(qnli, reply, "entailment", {"text_a": QUESTION}) == "wrote_a_question"
    ok = qnli.parse_example("Basel is the first major city on the Rhine.", "entailment", {"text_a": QUESTION})
    assert ok["text_b"] == "Basel is the first major city on the Rhine."


def test_pair_student_inputs_and_metrics(rte):
    assert rte.student_inputs({"text_a": "a", "text_b": "b"}) == ("a", "b")
    m = rte.metrics(["entailment", "entailment", "not_entailment", "entailment"],
                    ["entailment", "not_entailment", "not_entailment", "entailment"])
    assert m["accuracy"] == 0.75 and m["n"] == 4
    # F1(entailment) = 2*2/(4+1) = 0.8; F1(not_entailment) = 2/(2+1) = 2/3.
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


# --- QA: metric ----------------------------------------------------------------------------------------

def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Town Moor!") == "town moor"
    assert exact_match("the Town Moor.", "Town Moor") == 1.0
    assert exact_match("Moor", "Town Moor") == 0.0
    assert token_f1("Town Moor park", "the Town Moor") == pytest.approx(0.8)
    assert token_f1("", "Town Moor") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("June", "Town Moor") == 0.0


def test_qa_metrics(qa):
    m = qa.metrics(["Town Moor", "in June", "Europe"], ["the Town Moor", "June", "Newcastle"])
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


# --- what each family decides (the loop, the student and the mining ask the task) -----------------------

def test_families_own_gold_field_labels_report_columns_and_row_columns(rte, qa):
    assert (rte.gold_field, rte.needs_labels, rte.primary_metric, rte.secondary_metric) == (
        "label", True, "accuracy", "macro_f1")
    assert (qa.gold_field, qa.needs_labels, qa.primary_metric, qa.secondary_metric) == (
        "answer", False, "f1", "exact_match")
    assert task_class("extractive_qa") is ExtractiveQATask and task_class("pair") is PairTask
    with pytest.raises(ValueError, match="expected one of classification | pair | extractive_qa"):
        task_class("regression")
    assert [f.name for f in rte.row_columns()] == ["label"]
    assert [f.name for f in qa.row_columns()] == ["answer_start"]
    assert qa.golds([{"answer": "June"}]) == ["June"] and rte.golds([{"label": "entailment"}]) == ["entailment"]


@pytest.mark.parametrize("family", ["pair", "qa"])
def test_metric_statistics_of_parts_sum_to_the_whole(rte, qa, family):
    """Mining sums per-block statistics: the merged metric must equal the metric over all rows."""
    rng = random.Random(3)
    if family == "pair":
        task, pool = rte, ["entailment", "not_entailment"]
    else:
        task, pool = qa, ["Town Moor", "the Town Moor", "June", "in June", "Europe"]
    golds = [rng.choice(pool) for _ in range(200)]
    preds = [g if rng.random() < 0.5 else rng.choice(pool) for g in golds]
    parts = [task.metric_stats(preds[i:i + 37], golds[i:i + 37]) for i in range(0, 200, 37)]
    assert task.metrics_from_stats(merge_stats(parts)) == pytest.approx(task.metrics(preds, golds))
    scored = task.score_rows(preds, golds)
    assert sum(scored["correct"]) == pytest.approx(task.metrics(preds, golds)[
        "accuracy" if family == "pair" else "exact_match"] * 200)


# --- QA: answer spans picked in code ----------------------------------------------------------------

def _adqa_rows(n: int | None = None) -> list[dict]:
    import gzip

    with gzip.open(REPO / "data" / "adqa" / "validation.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f][:n]


def test_candidate_spans_are_names_numbers_and_noun_phrases():
    spans = {s.text: s for s in candidate_spans(PARAGRAPH)}
    assert spans["Town Moor"].kind == "name" and spans["Newcastle"].kind == "name"
    assert spans["June"].kind == "number"  # a month on its own is a date answer
    assert "largest travelling funfair" in spans and spans["largest travelling funfair"].kind == "noun_phrase"
    assert "Another" not in spans and "The Hoppings" not in spans  # sentence openers are not names
    for s in spans.values():
        assert PARAGRAPH[s.start: s.start + len(s.text)] == s.text
    dates = {s.text for s in candidate_spans("Kenya became independent on 12 December 1963, for £41,004.")}
    assert {"12 December 1963", "£41,004"} <= dates


def test_every_real_paragraph_has_exact_candidate_spans():
    """On every AdQA paragraph: candidates exist, are exact substrings at their offsets, short, of all kinds."""
    kinds = collections.Counter()
    for paragraph in dict.fromkeys(r["context"] for r in _adqa_rows()):
        spans = candidate_spans(paragraph)
        assert spans, paragraph[:80]
        for s in spans:
            assert paragraph[s.start: s.start + len(s.text)] == s.text
            assert 1 <= len(s.text.split()) <= MAX_SPAN_WORDS and s.text == s.text.strip()
            kinds[s.kind] += 1
    assert min(kinds.values()) > 100, kinds


def test_sentence_around_finds_the_answers_sentence():
    i = PARAGRAPH.index("June")
    assert sentence_around(PARAGRAPH, i).startswith("The Hoppings funfair")
    assert sentence_around(PARAGRAPH, 0).endswith("city centre.")


def test_seed_context_picks_a_span_and_hides_the_real_question(qa):
    real = {"id": "v1", "context": PARAGRAPH, "question": "Where is it?", "answer": "Europe",
            "answer_start": PARAGRAPH.index("Europe")}
    kept = qa.seed_context(real, random.Random(3))
    assert kept == qa.seed_context(real, random.Random(3))  # same seed, same pick: the cache finds it
    assert "question" not in kept and kept["answer_kind"] in ("name", "number", "noun_phrase")
    assert PARAGRAPH[kept["answer_start"]: kept["answer_start"] + len(kept["answer"])] == kept["answer"]
    picks = {qa.seed_context(real, random.Random(i))["answer"] for i in range(30)}
    assert len(picks) >= 4
    messages = qa.seed_messages(None, [], kept)
    prompt = messages[-1]["content"]  # the turns before it are the fixed few-shot examples
    sentence = sentence_around(PARAGRAPH, kept["answer_start"])
    assert f'Sentence: "{sentence}"' in prompt and f'Answer: "{kept["answer"]}"' in prompt
    assert "Where is it?" not in _user(messages)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_teacher_mode_keeps_only_the_paragraph():
    qa_teacher = make_task(TaskConfig(type="extractive_qa", qa_answers="teacher"), None)
    kept = qa_teacher.seed_context({"id": "v1", "context": PARAGRAPH, "question": "q?", "answer": "June",
                                    "answer_start": 0}, random.Random(0))
    assert kept == {"id": "v1", "context": PARAGRAPH}
    prompt = _user(qa_teacher.seed_messages(None, [], kept))
    assert "Answer:" in prompt and "Question:" in prompt


def test_plan_seed_gives_each_qa_request_a_picked_span(qa):
    from s3ray.config import SamplingConfig
    from s3ray.synthesis.plan import plan_seed

    rows = _adqa_rows(40)
    plans = plan_seed(qa, 12, {}, 0, rows, SamplingConfig(), run_seed=5)
    again = plan_seed(qa, 12, {}, 0, rows, SamplingConfig(), run_seed=5)
    assert [p.request.prompt_hash() for p in plans] == [p.request.prompt_hash() for p in again]
    for p in plans:
        c = p.context
        assert c["context"][c["answer_start"]: c["answer_start"] + len(c["answer"])] == c["answer"]
        assert "question" not in c
    assert len({p.context["answer"] for p in plans}) >= 10


# --- QA: prompts and parsing ---------------------------------------------------------------------------

def test_qa_ees_prompt_keeps_the_gold_answer_and_its_sentence(qa):
    err = {"context": PARAGRAPH, "question": "Where is the Hoppings funfair held?", "answer": "Town Moor",
           "answer_start": PARAGRAPH.index("Town Moor")}
    ees = qa.ees_messages(err)[-1]["content"]
    assert 'worded differently from "Where is the Hoppings funfair held?"' in ees and 'Answer: "Town Moor"' in ees
    assert 'Sentence: "Another green space in Newcastle is the Town Moor' in ees  # the answer's own sentence


def test_find_span_prefers_the_contexts_own_text():
    assert find_span("town moor", PARAGRAPH) == ("Town Moor", PARAGRAPH.index("Town Moor"))
    assert find_span("June!", PARAGRAPH) == ("June", PARAGRAPH.index("June"))
    assert find_span("Hyde Park", PARAGRAPH) is None


GIVEN = {"context": PARAGRAPH, "answer": "Town Moor", "answer_start": PARAGRAPH.index("Town Moor")}
QUESTION_ONLY_CASES = [
    ("Where is the Hoppings funfair held?", "Where is the Hoppings funfair held?", None),
    ("Question: Which green space lies north of the city centre? It is big.",
     "Which green space lies north of the city centre?", None),
    ("Sure! Here is a question:\n1. What is north of the Newcastle city centre?",
     "What is north of the Newcastle city centre?", None),
    ('"Where does the annual funfair take place?"', "Where does the annual funfair take place?", None),
    ("", None, "empty"),
    ("I'm sorry, I cannot help with that.", None, "refusal"),
    ("The Town Moor is a park in Newcastle.", None, "not_a_question"),
    ("Is the Town Moor in Newcastle?", None, "question_contains_answer"),
    ("What is the capital of Peru?", None, "off_topic"),
    ("Where?", None, "too_short"),
]


@pytest.mark.parametrize("reply,question,reason", QUESTION_ONLY_CASES)
def test_qa_parse_question_for_a_given_answer(qa, reply, question, reason):
    if reason is None:
        row = qa.parse_example(reply, None, GIVEN)
        assert row["question"] == question
        assert (row["answer"], row["answer_start"]) == (GIVEN["answer"], GIVEN["answer_start"])
        assert qa.validate_row(row) is None
    else:
        assert _drop_reason(qa, reply, None, GIVEN) == reason


def test_answer_inside_a_longer_number_is_not_in_the_question(qa):
    ctx = {"context": "The bridge opened in 1912 and carried 12 lanes of traffic.", "answer": "12",
           "answer_start": 38}
    row = qa.parse_example("How many lanes did the bridge built in 1912 carry?", None, ctx)
    assert row["answer"] == "12"


QA_CASES = [
    ("Answer: Town Moor\nQuestion: Where is the Hoppings funfair held?", "Town Moor", None),
    ("answer: the largest travelling funfair in europe\nquestion: What is the Hoppings said to be?",
     "the largest travelling funfair in Europe", None),
    ('**Answer:** "June"\n**Question:** In which month does the funfair take place each year? It is annual.',
     "June", None),
    ("", None, "empty"),
    ("I'm sorry, I cannot help with that.", None, "refusal"),
    ("Question: Where is the funfair held?", None, "no_answer"),
    ("Answer: Town Moor", None, "no_question"),
    ("Answer: Hyde Park\nQuestion: Which park is larger?", None, "answer_not_in_context"),
    ("Answer: Town Moor\nQuestion: Name the green space north of the centre.", None, "not_a_question"),
    ("Answer: Town Moor\nQuestion: Is the Town Moor in Newcastle?", None, "question_contains_answer"),
    ("Answer: " + " ".join(["word"] * 40) + "\nQuestion: What?", None, "answer_too_long"),
    ("Answer: June\nQuestion: When?", None, "too_short"),
]


@pytest.mark.parametrize("reply,answer,reason", QA_CASES)
def test_qa_parse_teacher_picked_answer(qa, reply, answer, reason):
    ctx = {"id": "v1", "context": PARAGRAPH}  # teacher mode: the request kept only the paragraph
    if reason is None:
        row = qa.parse_example(reply, None, ctx)
        assert row["answer"] == answer
        assert row["context"][row["answer_start"]: row["answer_start"] + len(answer)] == answer
        assert row["question"].endswith("?") and "It is annual" not in row["question"]
        assert qa.validate_row(row) is None
    else:
        assert _drop_reason(qa, reply, None, ctx) == reason


def test_qa_validate_row_checks_answer_start(qa):
    good = {"context": PARAGRAPH, "question": "Where?", "answer": "Town Moor",
            "answer_start": PARAGRAPH.index("Town Moor")}
    assert qa.validate_row(good) is None
    assert "does not point at the answer" in qa.validate_row({**good, "answer_start": 3})
    assert "answer_start" in qa.validate_row({k: v for k, v in good.items() if k != "answer_start"})
    assert "'question'" in qa.validate_row({**good, "question": ""})


def test_qa_real_rows_validate_and_parse_back(qa):
    """Every row of the repo's AdQA copy is a valid span; a reply written from a real row parses back to it,
    both as a two-line teacher reply and as a question for the row's own answer."""
    rows = _adqa_rows(200)
    assert all(qa.validate_row(r) is None for r in rows)
    parsed = 0
    for r in rows:
        if normalize_answer(r["answer"]) in normalize_answer(r["question"]) or "?" not in r["question"]:
            continue
        try:
            row = qa.parse_example(f"Answer: {r['answer']}\nQuestion: {r['question']}", None,
                                   {"context": r["context"]})
        except ParseError as e:
            assert e.reason == "off_topic"  # adversarial questions may avoid every word of the paragraph
            continue
        assert row["answer"].lower() == r["answer"].lower()
        assert qa.validate_row(row) is None
        row = qa.parse_example(r["question"], None, r)
        assert (row["answer"], row["answer_start"]) == (r["answer"], r["answer_start"])
        parsed += 1
    assert parsed > 150


def test_contexts_file_needs_only_the_paragraph(qa, tmp_path):
    from s3ray.data.load import DataError, load_rows

    path = tmp_path / "paragraphs.jsonl"
    path.write_text("\n".join(json.dumps({"context": p}) for p in (PARAGRAPH, "A second paragraph here.")))
    rows = load_rows(str(path), qa, "contexts")
    assert [r["context"] for r in rows] == [PARAGRAPH, "A second paragraph here."]
    path.write_text(json.dumps({"text": PARAGRAPH}))
    with pytest.raises(DataError, match="context"):
        load_rows(str(path), qa, "contexts")


def test_qa_student_inputs(qa):
    assert qa.student_inputs({"context": "c", "question": "q?"}) == ("q?", "c")
