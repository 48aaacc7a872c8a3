"""The S3 run's steps: their names (as recorded in manifest.json) and the typed result each one records.

One module owns the names, so the loop (`s3.py`), the report (`report.py`) and the CLI's `--stop-after`
check never rebuild them from f-strings of their own. A result is a small dataclass; the manifest holds
`dataclasses.asdict(result)` and `Step.load` turns it back, ignoring keys an older s3ray wrote.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from s3ray.tasks import task_class

R = TypeVar("R")


class StepFailed(RuntimeError):
    """A step could not produce a sound result; nothing was recorded, so a resume runs it again."""


def _from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RationalesResult:
    rationales: dict[str, list[str]]
    stats: dict  # SynthesisStats.to_dict()


@dataclass
class SynthesisResult:
    """Rows kept by one synthesis step; `path` is relative to the run directory."""

    path: str
    rows: int
    stats: dict  # SynthesisStats.to_dict()
    target: int | None = None  # equal-budget baseline: seed rows it had to reach
    by_label: dict[str, int] | None = None  # kept rows per label (label tasks), to see a round's balance


@dataclass
class StudentResult:
    """A trained student: best-epoch checkpoint (relative to the run directory) and its scores."""

    checkpoint: str
    best_epoch: int
    val: dict
    history: list
    n_train: int
    train_seconds: float
    test: dict | None = None
    holdout_rows: int | None = None  # students whose epoch was picked on held-out real rows
    epochs: int | None = None  # epochs trained (student.min_steps may raise them above student.epochs)


@dataclass
class MiningResult:
    """The student's errors on the real validation set; `errors_path` is relative to the run directory."""

    errors_path: str
    n_rows: int
    n_errors: int
    n_hard: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step(Generic[R]):
    """A named step and the type of what it records."""

    name: str
    result: type

    def load(self, recorded: dict[str, Any]) -> R:
        return _from_dict(self.result, recorded)

    def __str__(self) -> str:
        return self.name


RATIONALES: Step[RationalesResult] = Step("rationales", RationalesResult)
EQUAL_BUDGET_SYNTHESIS: Step[SynthesisResult] = Step("baseline/equal_budget/synthesis", SynthesisResult)
EQUAL_BUDGET_TRAIN: Step[StudentResult] = Step("baseline/equal_budget/train", StudentResult)
REAL_VALIDATION_TRAIN: Step[StudentResult] = Step("baseline/real_validation/train", StudentResult)
S3_PLUS_REAL_TRAIN: Step[StudentResult] = Step("baseline/s3_plus_real/train", StudentResult)


def synthesis(round_: int) -> Step[SynthesisResult]:
    """Round 0 is seed synthesis; round r > 0 extrapolates the errors mined after round r - 1."""
    return Step(f"round{round_}/synthesis", SynthesisResult)


def train(round_: int) -> Step[StudentResult]:
    return Step(f"round{round_}/train", StudentResult)


def mine(round_: int) -> Step[MiningResult]:
    return Step(f"round{round_}/mine", MiningResult)


def round_file(round_: int) -> str:
    """Where a round's kept rows live, relative to the run directory."""
    return f"rounds/round_{round_}.parquet"


EXTRA_SEED_FILE = "baseline/extra_seed.parquet"
FINAL_TRAIN_FILE = "final/train.parquet"

def run_order(cfg) -> list[Step]:
    """Every step a run of `cfg` records, in the order `s3.py` runs them (what --stop-after accepts)."""
    order: list[Step] = [RATIONALES] if cfg.uses_rationales and task_class(cfg.task.type).needs_labels else []
    order.append(synthesis(0))
    for r in range(cfg.synthesis.rounds):
        order += [train(r), mine(r), synthesis(r + 1)]
    if cfg.baselines.equal_budget:
        order.append(EQUAL_BUDGET_SYNTHESIS)
    order.append(train(cfg.synthesis.rounds))
    if cfg.baselines.equal_budget:
        order.append(EQUAL_BUDGET_TRAIN)
    if cfg.baselines.real_validation:
        order.append(REAL_VALIDATION_TRAIN)
    if cfg.baselines.s3_plus_real:
        order.append(S3_PLUS_REAL_TRAIN)
    return order


def check_step_name(name: str, cfg) -> str:
    """`name` if a run of `cfg` records such a step, else ValueError naming the steps it has."""
    names = [s.name for s in run_order(cfg)]
    if name not in names:
        raise ValueError(f"{name!r} is not a step of this config's run; steps are: {', '.join(names)}")
    return name
