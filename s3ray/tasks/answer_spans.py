"""Candidate answer spans in a paragraph, for extractive-QA seed synthesis.

The paper's QA setting is "paragraph + answer -> question". A small teacher cannot be trusted to copy an
answer span out of a long paragraph word for word (SmolLM2-135M got the two-line "Answer/Question" format
right in 2 of 80 replies), so s3ray picks the answer itself and the teacher only writes the question.

The spans are what SQuAD-style answers mostly are: names (runs of capitalised words), numbers and dates
(kind "number", months included), and short noun phrases after a determiner. Plain regular expressions, no
tagger: the picks only have to be real phrases of the paragraph; the teacher's question makes a row useful.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# Words that end a noun phrase or cannot start/end a name; small on purpose.
STOP_WORDS = frozenset(
    [
        "a", "an", "the", "and", "or", "but", "if", "then", "than", "that", "this", "these", "those", "there",
        "here", "of", "to", "in", "on", "at", "by", "for", "from", "with", "as", "is", "are", "was", "were",
        "be", "been", "being", "has", "have", "had", "do", "does", "did", "not", "no", "nor", "so", "such",
        "it", "its", "it's", "he", "she", "they", "them", "his", "her", "their", "our", "your", "my", "we",
        "you", "i", "me", "him", "us", "who", "whom", "whose", "which", "what", "when", "where", "why", "how",
        "all", "any", "each", "both", "few", "more", "most", "other", "some", "own", "same", "very", "can",
        "could", "will", "would", "shall", "should", "may", "might", "must", "also", "only", "just", "into",
        "onto", "over", "under", "about", "after", "before", "between", "during", "through", "while", "until",
        "against", "among", "upon", "within", "without", "however", "although", "because", "since", "though",
        "thus", "yet", "still", "even"
    ]
)
# Lower-case words allowed inside a name: "University of Warsaw", "Leonardo da Vinci".
_NAME_JOINERS = frozenset({"of", "de", "da", "del", "van", "von", "der", "la", "le", "the", "and", "for", "on"})
_DETERMINERS = frozenset({"the", "a", "an", "its", "their", "his", "her", "our", "this", "these", "those"})
_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December"
)
_NUMBER = re.compile(
    rf"(?:\b\d{{1,2}}\s+(?:{_MONTHS})\s+\d{{3,4}}\b)"  # 12 June 1944
    rf"|(?:\b(?:{_MONTHS})\s+\d{{1,2}},\s+\d{{3,4}}\b)"  # June 12, 1944
    rf"|(?:\b(?:{_MONTHS})\s+\d{{3,4}}\b)"  # June 1944
    r"|(?:[£$€]\s?\d[\d,]*(?:\.\d+)?(?:\s+(?:million|billion|thousand))?)"  # £41,004, $3 million
    r"|(?:\b\d[\d,]*(?:\.\d+)?%?(?:\s+(?:million|billion|thousand|percent|per cent))?)"  # 1,300,000; 12%
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_TOKEN = re.compile(r"\S+")
_EDGE_PUNCT = "\"'“”‘’()[]{},.;:!?"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”')\]]?\s+(?=[\"“(\[]?[A-Z0-9])")
MAX_SPAN_WORDS = 6
# How often each kind is drawn when the paragraph has all three (SQuAD answers lean to names and numbers).
KIND_WEIGHTS = {"name": 0.45, "number": 0.25, "noun_phrase": 0.30}


@dataclass(frozen=True)
class Span:
    text: str
    start: int
    kind: str  # "name" | "number" | "noun_phrase"


def sentence_around(paragraph: str, start: int) -> str:
    """The sentence of `paragraph` containing character `start` (shown to the teacher as a hint)."""
    begin = 0
    for m in _SENTENCE_END.finditer(paragraph):
        if m.end() > start:
            return paragraph[begin : m.start()].strip()
        begin = m.end()
    return paragraph[begin:].strip()


def _tokens(paragraph: str) -> list[tuple[str, int, bool]]:
    """(word with edge punctuation stripped, its offset, whether it starts a sentence)."""
    starts = {0} | {m.end() for m in _SENTENCE_END.finditer(paragraph)}
    out = []
    for m in _TOKEN.finditer(paragraph):
        raw = m.group(0)
        lead = len(raw) - len(raw.lstrip(_EDGE_PUNCT))
        word = raw.strip(_EDGE_PUNCT)
        if word.endswith(("'s", "’s")):
            word = word[:-2]
        if not word:
            continue
        out.append((word, m.start() + lead, m.start() in starts))
    return out


def _ends_clause(paragraph: str, tok_start: int, word: str) -> bool:
    """True when punctuation follows the word (a comma or full stop ends a name or a phrase), or an opening
    bracket comes next ("Kenya African National Union (KANU)" ends before the bracket)."""
    nxt = paragraph[tok_start + len(word) : tok_start + len(word) + 3]
    return bool(nxt) and (nxt[0] in ",.;:!?)\"”" or nxt.lstrip()[:1] in ("(", "["))


def _names(paragraph: str, toks) -> list[Span]:
    capitalised_mid = {w for w, _, first in toks if not first and w[:1].isupper()}
    spans, i = [], 0
    while i < len(toks):
        word, start, first = toks[i]
        # A sentence's first word is capitalised anyway: it starts a name only if it is capitalised
        # elsewhere too ("Despite British hopes" -> "British").
        if not word[:1].isupper() or word.lower() in STOP_WORDS or (first and word not in capitalised_mid):
            i += 1
            continue
        j, end = i, i
        while j + 1 < len(toks) and not _ends_clause(paragraph, toks[j][1], toks[j][0]):
            nxt = toks[j + 1][0]
            if nxt[:1].isupper():
                j += 1
                end = j
            elif nxt in _NAME_JOINERS and j + 2 < len(toks) and toks[j + 2][0][:1].isupper():
                j += 1  # a joiner only counts when a capitalised word follows it
            else:
                break
        if end - i + 1 <= MAX_SPAN_WORDS:
            last_word, last_start, _ = toks[end]
            kind = "number" if end == i and re.fullmatch(_MONTHS, word) else "name"  # "in June": a date
            spans.append(Span(paragraph[start : last_start + len(last_word)], start, kind))
        i = end + 1
    return spans


def _numbers(paragraph: str) -> list[Span]:
    out = []
    for m in _NUMBER.finditer(paragraph):
        text = m.group(0).rstrip(".,")
        if re.search(r"\d", text):
            out.append(Span(text, m.start(), "number"))
    return out


def _noun_phrases(paragraph: str, toks) -> list[Span]:
    spans = []
    for i, (word, _, _) in enumerate(toks[:-1]):
        if word.lower() not in _DETERMINERS or _ends_clause(paragraph, toks[i][1], word):
            continue
        j = i + 1
        while j < len(toks) and j - i <= 3:
            w, s, _ = toks[j]
            if w.lower() in STOP_WORDS or not _WORD.fullmatch(w) or w[:1].isupper():
                break
            j += 1
            if _ends_clause(paragraph, s, w):
                break
        if j > i + 1:
            last_word, last_start, _ = toks[j - 1]
            # Drop a trailing adverb or participle ("an agreement dated"): noun phrases rarely end so.
            if last_word.endswith(("ly", "ed")) and j - 1 > i + 1:
                last_word, last_start, _ = toks[j - 2]
            first_start = toks[i + 1][1]
            text = paragraph[first_start : last_start + len(last_word)]
            if len(text) >= 4:
                spans.append(Span(text, first_start, "noun_phrase"))
    return spans


def _content_runs(paragraph: str, toks) -> list[Span]:
    """Runs of up to 3 content words ("alternative licensing programs"): the fallback for a paragraph with
    no name, number or determiner-led phrase."""
    spans, i = [], 0
    while i < len(toks):
        j = i
        while j < len(toks) and j - i < 3 and toks[j][0].lower() not in STOP_WORDS and _WORD.fullmatch(toks[j][0]):
            j += 1
            if _ends_clause(paragraph, toks[j - 1][1], toks[j - 1][0]):
                break
        if j > i:
            last_word, last_start, _ = toks[j - 1]
            text = paragraph[toks[i][1] : last_start + len(last_word)]
            if len(text) >= 5:
                spans.append(Span(text, toks[i][1], "noun_phrase"))
        i = max(j, i + 1)
    return spans


def candidate_spans(paragraph: str) -> list[Span]:
    """Every candidate answer span of the paragraph, each an exact substring at its offset, without repeats."""
    toks = _tokens(paragraph)
    found = _numbers(paragraph) + _names(paragraph, toks) + _noun_phrases(paragraph, toks)
    seen, out = set(), []
    for span in found or _content_runs(paragraph, toks):
        key = span.text.lower()
        if key in seen or len(span.text.split()) > MAX_SPAN_WORDS:
            continue
        assert paragraph[span.start : span.start + len(span.text)] == span.text
        seen.add(key)
        out.append(span)
    return out


def pick_span(paragraph: str, rng: random.Random) -> Span | None:
    """One candidate: first a kind (by KIND_WEIGHTS among the kinds present), then a span of that kind."""
    by_kind: dict[str, list[Span]] = {}
    for span in candidate_spans(paragraph):
        by_kind.setdefault(span.kind, []).append(span)
    if not by_kind:
        return None
    kinds = sorted(by_kind)
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    return rng.choice(by_kind[kind])
