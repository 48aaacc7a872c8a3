"""Training text for the fine-tuned teacher, built from the task definition so every family works.

Two directions (Kaddour & Liu 2024):
- annotation: the example's inputs -> its label (QA: paragraph + question -> answer);
- generation: the label (and the kept real context) -> the example: classification "write a <description>
  with label y" -> text; pair: text_a + label -> text_b; QA: paragraph + answer -> question.
Prompts go through the tokenizer's chat template when it has one (as the teacher pool's engines do), else a
plain "### Response:" layout written as a chat template (PLAIN_TEMPLATE), which the export carries. Prompt
and completion are tokenised apart and concatenated, exactly as generation
sees them (prompt ids, then the model's continuation), and the loss covers the completion only (labels -100
on the prompt). A completion ends with what the template appends after an assistant turn (or the EOS
token), so the trained model stops after the label/example.
"""

from __future__ import annotations

from dataclasses import dataclass

from s3ray.tasks.base import Task
from s3ray.teacher.types import Message

IGNORE = -100


@dataclass(frozen=True)
class Pair:
    """One training/scoring unit: chat messages up to the answer, and the answer text."""

    messages: tuple[Message, ...]
    completion: str


def _system(task: Task) -> Message:
    return {"role": "system", "content": f"You label and write {task.description} examples for a dataset."}


def _label_list(task: Task) -> str:
    return ", ".join(task.labels or [])


def annotation_messages(task: Task, row: dict) -> list[Message]:
    """The prompt that asks for `row`'s label (QA: its answer)."""
    if task.type == "pair":
        ask = (f"{task.description.capitalize()}: {row['text_a']}\nSentence: {row['text_b']}\n"
               f"Label ({_label_list(task)}):")
    elif task.type == "extractive_qa":
        ask = f"{task.description.capitalize()}: {row['context']}\nQuestion: {row['question']}\nAnswer:"
    else:
        ask = f"{task.description.capitalize()}: {row['text']}\nLabel ({_label_list(task)}):"
    return [_system(task), {"role": "user", "content": ask}]


def annotation_target(task: Task, row: dict) -> str:
    return row["answer"] if task.type == "extractive_qa" else row["label"]


def generation_messages(task: Task, label: str | None, context: dict | None) -> list[Message]:
    """The prompt that asks for a new example with `label` (pair/QA: against the kept `context`)."""
    if task.type == "pair":
        ask = f"{task.description.capitalize()}: {context['text_a']}\nWrite a sentence with label {label}:"
    elif task.type == "extractive_qa":
        ask = (f"{task.description.capitalize()}: {context['context']}\nAnswer: {context['answer']}\n"
               "Write the question:")
    else:
        ask = f"Write a {task.description} with label {label}:"
    return [_system(task), {"role": "user", "content": ask}]


def generation_target(task: Task, row: dict) -> str:
    if task.type == "pair":
        return row["text_b"]
    if task.type == "extractive_qa":
        return row["question"]
    return row["text"]


def training_pairs(task: Task, rows: list[dict], direction: str) -> list[Pair]:
    """`direction`: annotate | generate | both."""
    out = []
    for row in rows:
        if direction in ("annotate", "both"):
            out.append(Pair(tuple(annotation_messages(task, row)), annotation_target(task, row)))
        if direction in ("generate", "both"):
            label = None if task.type == "extractive_qa" else row["label"]
            out.append(Pair(tuple(generation_messages(task, label, row)), generation_target(task, row)))
    return out


# ------------------------------------------------------------------------------------------ rendering


# The plain layout as a chat template: a base model without a template of its own is trained on it, and its
# export carries it (export.py), so every engine of the teacher pool renders exactly the trained format.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{{ '### Instruction:\\n' }}"
    "{% for m in messages if m['role'] == 'user' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['content'] }}{% endfor %}"
    "{{ '\\n### Response:\\n' }}"
    "{% for m in messages if m['role'] == 'assistant' %}{{ m['content'] }}"
    "{% if eos_token %}{{ eos_token }}{% endif %}{% endfor %}"
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or the plain layout for a base model."""
    return tokenizer.chat_template if has_chat_template(tokenizer) else PLAIN_TEMPLATE


def render_prompt(tokenizer, messages) -> str:
    """The prompt text the model continues (the teacher pool's engines render the same)."""
    return tokenizer.apply_chat_template(list(messages), chat_template=template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=True)


def completion_text(tokenizer, messages, completion: str) -> str:
    """The completion as the template writes an assistant turn, with its end marker."""
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                         chat_template=template_of(tokenizer), tokenize=False)
    if full.startswith(prompt):
        return full[len(prompt):]
    return completion + (tokenizer.eos_token or "")


def prompt_ids(tokenizer, messages) -> list[int]:
    # The template writes every special token the prompt has (as the engines' render_prompt_ids assume).
    return list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def completion_ids(tokenizer, messages, completion: str) -> list[int]:
    return list(tokenizer(completion_text(tokenizer, messages, completion), add_special_tokens=False)["input_ids"])


def encode(tokenizer, pair: Pair, max_len: int) -> dict | None:
    """input_ids and labels (-100 on the prompt), or None when the completion alone exceeds max_len. A long
    prompt loses its beginning: the question and the label list are at its end."""
    p = prompt_ids(tokenizer, pair.messages)
    c = completion_ids(tokenizer, pair.messages, pair.completion)
    if len(c) >= max_len:
        return None
    p = p[-(max_len - len(c)):]
    return {"input_ids": p + c, "labels": [IGNORE] * len(p) + c}


def encode_all(tokenizer, pairs: list[Pair], max_len: int) -> tuple[list[dict], int]:
    """Encoded pairs and how many were dropped (completion longer than max_len)."""
    out = [encode(tokenizer, pr, max_len) for pr in pairs]
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)
