"""Planning teacher requests for the three kinds of synthesis (docs/method.md, steps 1, 2 and 5).

Every request gets an id that is stable across resumes (so the generation cache finds it) and an explicit
sampling seed derived from the run seed and that id: samples differ per request yet the run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from s3ray.teacher.types import GenerationRequest, Sampling, derive_seed

RATIONALE_SAMPLES_PER_LABEL = 3  # a small teacher rarely lists K good reasons in one reply


@dataclass
class Planned:
    """A teacher request plus what the resulting row will record about where it came from."""

    request: GenerationRequest
    source: str  # "rationale" | "seed" | "ees"
    round: int
    label: str | None = None
    context: dict | None = None  # the real row whose context is kept (pair premise, QA paragraph)
    rationales: list[str] = field(default_factory=list)
    parent_error_id: str | None = None


def _request(request_id: str, messages, sampling_cfg, run_seed: int, max_tokens: int | None = None):
    sampling = Sampling(
        temperature=sampling_cfg.temperature,
        top_p=sampling_cfg.top_p,
        max_tokens=max_tokens or sampling_cfg.max_tokens,
        seed=derive_seed(run_seed, request_id),
    )
    return GenerationRequest(request_id=request_id, messages=tuple(messages), sampling=sampling)


def plan_rationales(task, num_rationales: int, sampling_cfg, run_seed: int) -> list[Planned]:
    """Step 1: for each label, ask for K reasons (several samples, merged later)."""
    out = []
    for label in task.labels or []:
        for j in range(RATIONALE_SAMPLES_PER_LABEL):
            rid = f"rationale/{label}/{j}"
            msgs = task.rationale_messages(label, num_rationales)
            # Lists need more room than one example.
            req = _request(rid, msgs, sampling_cfg, run_seed, max_tokens=max(sampling_cfg.max_tokens, 24 * num_rationales))
            out.append(Planned(req, "rationale", 0, label=label))
    return out


def plan_seed(
    task,
    n: int,
    rationales: dict[str, list[str]],
    k: int,
    contexts: list[dict] | None,
    sampling_cfg,
    run_seed: int,
    start: int = 0,
    source: str = "seed",
) -> list[Planned]:
    """Step 2: n label-conditioned requests, numbered from `start` (extra batches continue the numbering)."""
    return list(iter_seed(task, n, rationales, k, contexts, sampling_cfg, run_seed, start, source))


def iter_seed(task, n: int, rationales: dict[str, list[str]], k: int, contexts: list[dict] | None, sampling_cfg,
              run_seed: int, start: int = 0, source: str = "seed") -> Iterator[Planned]:
    """`plan_seed`, one request at a time (the streaming path plans lazily).

    Labels are balanced (a shuffled round-robin: the paper picks them uniformly); each prompt samples k of the
    label's rationales without replacement; pair/QA prompts keep a real context, cycling through the pool.
    """
    labels = task.labels or [None]
    for i in range(start, start + n):
        rng = random.Random(derive_seed(run_seed, source, i))
        # Balanced label order per block of len(labels) examples.
        block = list(labels)
        random.Random(derive_seed(run_seed, source, "block", i // len(labels))).shuffle(block)
        label = block[i % len(labels)]
        pool = rationales.get(label, []) if label is not None else []
        picked = rng.sample(pool, min(k, len(pool))) if pool and k else []
        context = None
        if contexts:
            row = contexts[derive_seed(run_seed, "context", i) % len(contexts)]
            context = task.seed_context(row, random.Random(derive_seed(run_seed, source, "answer", i)))
        msgs = task.seed_messages(label, picked, context)
        req = _request(f"{source}/{i}", msgs, sampling_cfg, run_seed)
        yield Planned(req, source, 0, label=label, context=context, rationales=picked)


def cap_errors(errors: list[dict], cap: int | None, run_seed: int, round_: int) -> list[dict]:
    """The errors to extrapolate, in id order (stable request ids); with a cap, a seeded uniform sample of
    `cap` of them, not the first ids (ids often follow the source file's order, e.g. by topic)."""
    errors = sorted(errors, key=lambda e: str(e["id"]))
    if cap is None or len(errors) <= cap:
        return errors
    keep = set(random.Random(derive_seed(run_seed, "ees_cap", round_)).sample(range(len(errors)), cap))
    return [e for i, e in enumerate(errors) if i in keep]


def balanced_counts(errors: list[dict], labels: list[str], per_error: int, run_seed: int, round_: int,
                    max_factor: int = 4) -> dict[str, int]:
    """Class-balanced EES: requests per error id, with each label getting an equal share of the round's budget.

    Plain EES asks `per_error` new rows per error, so a student biased towards one label gets a round biased the
    other way, and the next student swings back (the loop oscillates). Here the same budget
    (len(errors) * per_error) is split into equal per-label quotas: a label with more errors than its quota
    extrapolates a seeded sample of them; one with fewer asks several rows per error, at most
    `max_factor * per_error`. A label with no errors leaves its quota unspent (nothing to extrapolate from).
    """
    by_label: dict[str, list[dict]] = {lab: [] for lab in labels}
    for err in sorted(errors, key=lambda e: str(e["id"])):
        by_label.setdefault(err["label"], []).append(err)
    quota = len(errors) * per_error // max(1, len(labels))
    counts: dict[str, int] = {}
    for label, errs in by_label.items():
        if not errs:
            continue
        ceiling = max_factor * per_error
        base, extra = divmod(min(quota, len(errs) * ceiling), len(errs))
        order = random.Random(derive_seed(run_seed, "ees_balance", round_, label)).sample(range(len(errs)), len(errs))
        for rank, i in enumerate(order):
            n = base + (1 if rank < extra else 0)
            if n:
                counts[str(errs[i]["id"])] = n
    return counts


def plan_ees(task, errors: list[dict], per_error: int, round_: int, sampling_cfg, run_seed: int,
             counts: dict[str, int] | None = None) -> list[Planned]:
    """Step 5: per student error, `per_error` requests (or `counts[id]`) for a similar example with the GOLD
    label."""
    return list(iter_ees(task, errors, per_error, round_, sampling_cfg, run_seed, counts))


def iter_ees(task, errors: list[dict], per_error: int, round_: int, sampling_cfg, run_seed: int,
             counts: dict[str, int] | None = None) -> Iterator[Planned]:
    """`plan_ees`, one request at a time (the streaming path plans lazily)."""
    for err in errors:
        for j in range(per_error if counts is None else counts.get(str(err["id"]), 0)):
            rid = f"ees/round{round_}/{err['id']}/{j}"
            req = _request(rid, task.ees_messages(err), sampling_cfg, run_seed)
            yield Planned(req, "ees", round_, label=err.get("label"), context=err, parent_error_id=str(err["id"]))
