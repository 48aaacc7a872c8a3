"""Prompt building, parsing, de-duplication and request planning (no engines needed)."""

import pytest

from s3ray.config import SamplingConfig
from s3ray.synthesis.collect import collect_examples, collect_rationales, rows_to_table
from s3ray.synthesis.dedup import Deduplicator
from s3ray.synthesis.plan import cap_errors, plan_ees, plan_rationales, plan_seed
from s3ray.tasks.base import ParseError, clean_generation, parse_list
from s3ray.tasks.classification import ClassificationTask
from s3ray.teacher.types import GenerationResult

TASK = ClassificationTask(labels=["negative", "positive"], description="movie review")
SAMPLING = SamplingConfig()


def test_prompts_carry_label_rationales_and_error_text():
    msgs = TASK.seed_messages("negative", ["wooden acting", "a plot full of holes"], None)
    user = msgs[-1]["content"]
    assert "negative movie review" in user and "wooden acting; a plot full of holes" in user
    ees = TASK.ees_messages({"id": "v1", "text": "unflinchingly bleak and desperate", "label": "negative"})[-1]["content"]
    assert "unflinchingly bleak and desperate" in ees and "also negative" in ees
    assert "8 different reasons" in TASK.rationale_messages("positive", 8)[-1]["content"]


def test_label_descriptions_replace_label_names_in_prompts():
    t = ClassificationTask(labels=["0", "1"], description="tweet", label_descriptions={"1": "sarcastic"})
    assert "one sarcastic tweet" in t.seed_messages("1", [], None)[-1]["content"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('Here is a new movie review that is negative: "desperate and terrifying"\nThat is negative.',
         "desperate and terrifying"),
        ("Sure! Here's a review:\n\nReview: Great fun from start to end.\n\nThis review is positive.",
         "Great fun from start to end."),
        ("**Review:** A dull, lifeless film that drags on.", "A dull, lifeless film that drags on."),
        ("The cast shines in every scene.", "The cast shines in every scene."),
    ],
)
def test_clean_generation_extracts_the_example(reply, expected):
    assert clean_generation(reply, 8, 1200) == expected


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("Bad.", "too_short"),
        ("I'm sorry, as an AI language model I cannot write reviews.", "refusal"),
        ("x" * 2000, "too_long"),
        ("12345 678 !!! ???", "no_words"),
        ("Write one negative movie review. Reply with only the movie review.", "echoed_instruction"),
    ],
)
def test_unusable_replies_raise_countable_reasons(reply, reason):
    with pytest.raises(ParseError) as e:
        TASK.parse_example(reply, "negative", None)
    assert e.value.reason == reason


def test_parse_list_reads_numbered_and_bulleted_items():
    text = "Here are reasons:\n1. Wooden acting\n2) A thin plot\n- Bad sound\n* Wooden acting\nno number here"
    assert parse_list(text, 8) == ["Wooden acting", "A thin plot", "Bad sound"]
    assert parse_list(text, 2) == ["Wooden acting", "A thin plot"]
    with pytest.raises(ParseError, match="no_list_items"):
        parse_list("just prose, no list", 3)


def test_dedup_exact_near_and_real_row_copies():
    d = Deduplicator(threshold=0.7)
    d.protect(["unflinchingly bleak and desperate"])
    assert d.check_and_add("A warm, funny and moving film about two brothers on the road.") is None
    assert d.check_and_add("a warm funny and moving film about two brothers on the road") == "exact_duplicate"
    assert d.check_and_add("A warm, funny and moving film about two brothers on the open road.") == "near_duplicate"
    assert d.check_and_add("Unflinchingly bleak and desperate!") == "copies_real_row"
    assert d.check_and_add("The plot is a tangled mess and the jokes never land.") is None


def test_seed_plan_is_balanced_reproducible_and_seeded_per_request():
    rats = {"negative": ["n1", "n2", "n3"], "positive": ["p1", "p2", "p3"]}
    a = plan_seed(TASK, 10, rats, 2, None, SAMPLING, run_seed=7)
    b = plan_seed(TASK, 10, rats, 2, None, SAMPLING, run_seed=7)
    assert [p.request for p in a] == [p.request for p in b]  # resume-stable ids, prompts and seeds
    assert [p.label for p in a].count("negative") == 5
    assert len({p.request.sampling.seed for p in a}) == 10  # every request its own seed
    assert all(set(p.rationales) <= set(rats[p.label]) and len(p.rationales) == 2 for p in a)
    other = plan_seed(TASK, 10, rats, 2, None, SAMPLING, run_seed=8)
    assert [p.request.sampling.seed for p in other] != [p.request.sampling.seed for p in a]
    # Extra batches continue the numbering instead of repeating ids.
    more = plan_seed(TASK, 3, rats, 2, None, SAMPLING, run_seed=7, start=10)
    assert [p.request.request_id for p in more] == ["seed/10", "seed/11", "seed/12"]


def test_ees_plan_keeps_gold_label_and_parent():
    errs = [{"id": "v9", "text": "a gorgeous mess", "label": "positive"}]
    planned = plan_ees(TASK, errs, 2, 1, SAMPLING, run_seed=0)
    assert [p.request.request_id for p in planned] == ["ees/round1/v9/0", "ees/round1/v9/1"]
    assert all(p.label == "positive" and p.parent_error_id == "v9" and p.round == 1 for p in planned)


def test_capped_errors_are_a_seeded_sample_in_id_order():
    errors = [{"id": f"v{i:03d}", "label": "positive"} for i in range(100)][::-1]
    assert [e["id"] for e in cap_errors(errors, None, 0, 1)] == [f"v{i:03d}" for i in range(100)]
    assert len(cap_errors(errors, 500, 0, 1)) == 100
    picked = [e["id"] for e in cap_errors(errors, 20, 0, 1)]
    assert len(picked) == 20 and picked == sorted(picked)
    assert picked == [e["id"] for e in cap_errors(list(reversed(errors)), 20, 0, 1)]  # input order is irrelevant
    assert picked != [f"v{i:03d}" for i in range(20)]  # not simply the first ids
    assert picked != [e["id"] for e in cap_errors(errors, 20, 0, 2)]  # each round draws its own sample


def test_collect_counts_every_drop_and_keeps_provenance():
    planned = plan_seed(TASK, 5, {}, 0, None, SAMPLING, run_seed=0)
    replies = ["A sharp, funny film.", "", "A sharp, funny film.", "I'm sorry, I cannot do that.", None]
    results = [GenerationResult(p.request.request_id, text=t or "", output_tokens=5) for p, t in zip(planned, replies)]
    results[4] = GenerationResult(planned[4].request.request_id, error="timeout")
    rows, stats = collect_examples(planned, results, TASK, Deduplicator(), "teacher-x")
    assert len(rows) == 1 and stats.kept == 1 and stats.failed_calls == 1
    assert dict(stats.dropped) == {"empty": 1, "exact_duplicate": 1, "refusal": 1}
    assert rows[0]["teacher_model"] == "teacher-x" and rows[0]["seed"] == planned[0].request.sampling.seed
    table = rows_to_table(rows, TASK)
    assert table.num_rows == 1 and table.schema.field("rationales").type.value_type == "string"


def test_rationales_merge_unique_items_per_label():
    planned = plan_rationales(TASK, 3, SAMPLING, 0)
    texts = {"negative": "1. Bad acting\n2. Dull plot", "positive": "1. Great cast\n2. Great cast\n3. Lovely score"}
    results = [GenerationResult(p.request.request_id, text=texts[p.label]) for p in planned]
    got, stats = collect_rationales(planned, results, TASK, 3)
    assert got == {"negative": ["Bad acting", "Dull plot"], "positive": ["Great cast", "Lovely score"]}
    assert stats.requested == len(planned)


def test_replies_cut_by_max_tokens_are_trimmed_to_the_last_full_sentence():
    planned = plan_seed(TASK, 2, {}, 0, None, SAMPLING, run_seed=0)
    results = [
        GenerationResult(planned[0].request.request_id, text="A fine film. The cast is great. And then the", finish_reason="length"),
        GenerationResult(planned[1].request.request_id, text="A dull film. The cast is flat. And then the", finish_reason="stop"),
    ]
    rows, _ = collect_examples(planned, results, TASK, Deduplicator(), "t")
    assert rows[0]["text"] == "A fine film. The cast is great."
    assert rows[1]["text"] == "A dull film. The cast is flat. And then the"
