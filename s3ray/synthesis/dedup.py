"""Exact and near-duplicate filtering of synthetic rows.

Templated prompts make a teacher collapse into a few phrasings, so we drop a new row when its normalised
text was seen before (exact) or when its word-shingle MinHash is above the Jaccard threshold against any
kept row (near). Rows that copy the real validation/test text they were prompted with are dropped too:
training on them would leak the rows that pick the student's epoch.
"""

from __future__ import annotations

import re
import string

from datasketch import MinHash, MinHashLSH

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}“”‘’]")
_NUM_PERM = 64


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def shingles(text: str, n: int = 3) -> set[str]:
    words = normalize(text).split()
    if len(words) < n:  # short texts: fall back to character 4-grams so near-copies still match
        s = " ".join(words)
        return {s[i : i + 4] for i in range(max(1, len(s) - 3))}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _minhash(text: str) -> MinHash:
    m = MinHash(num_perm=_NUM_PERM, seed=1)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


class Deduplicator:
    """Keeps a set of seen texts; `check(text)` -> None to keep, or the reason to drop."""

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._exact: set[str] = set()
        self._protected: set[str] = set()
        self._lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
        self._protected_lsh = MinHashLSH(threshold=threshold, num_perm=_NUM_PERM)
        self._n = 0

    def protect(self, texts) -> None:
        """Real rows (validation, test) that synthetic rows must not copy."""
        for t in texts:
            key = normalize(t)
            if key and key not in self._protected:
                self._protected.add(key)
                self._protected_lsh.insert(f"p{len(self._protected)}", _minhash(t))

    def check(self, text: str) -> str | None:
        key = normalize(text)
        if key in self._protected:
            return "copies_real_row"
        if key in self._exact:
            return "exact_duplicate"
        m = _minhash(text)
        if self._protected_lsh.query(m):
            return "near_copy_of_real_row"
        if self._lsh.query(m):
            return "near_duplicate"
        return None

    def add(self, text: str) -> None:
        key = normalize(text)
        if key in self._exact:
            return
        self._exact.add(key)
        self._n += 1
        self._lsh.insert(f"s{self._n}", _minhash(text))

    def check_and_add(self, text: str) -> str | None:
        reason = self.check(text)
        if reason is None:
            self.add(text)
        return reason
