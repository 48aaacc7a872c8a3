"""GenerationCache: content addressing, failures never stored, durable across reopen."""

from __future__ import annotations

import sqlite3

from s3ray.teacher.cache import GenerationCache
from s3ray.teacher.types import GenerationRequest, GenerationResult, Sampling


def _req(rid: str, text: str = "hello", seed: int | None = 1) -> GenerationRequest:
    return GenerationRequest(rid, ({"role": "user", "content": text},), Sampling(max_tokens=8, seed=seed))


def test_roundtrip_and_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    reqs = [_req("a", "one"), _req("b", "two")]
    results = [GenerationResult("a", text="out-a", finish_reason="stop", prompt_tokens=3, output_tokens=2),
               GenerationResult("b", text="out-b", finish_reason="length", prompt_tokens=4, output_tokens=8)]
    with GenerationCache(path) as cache:
        assert cache.put_many(zip(reqs, results), "m") == 2
    with GenerationCache(path) as cache:  # a new process would see the same rows
        got = cache.get_many(reqs, "m")
        assert len(cache) == 2
    assert got["a"].text == "out-a" and got["a"].cached and got["a"].output_tokens == 2
    assert got["b"].finish_reason == "length" and got["b"].prompt_tokens == 4


def test_failed_results_are_never_stored(tmp_path):
    reqs = [_req("ok"), _req("bad", "other")]
    results = [GenerationResult("ok", text="fine"), GenerationResult("bad", error="HTTP 500")]
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        assert cache.put_many(zip(reqs, results), "m") == 1
        got = cache.get_many(reqs, "m")
    assert set(got) == {"ok"}


def test_key_covers_model_prompt_and_seed(tmp_path):
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        cache.put_many([(_req("a", "p", seed=1), GenerationResult("a", text="x"))], "m1")
        assert cache.get_many([_req("a", "p", seed=1)], "m2") == {}  # other model
        assert cache.get_many([_req("a", "p", seed=2)], "m1") == {}  # other seed
        assert cache.get_many([_req("a", "q", seed=1)], "m1") == {}  # other prompt
        # Same content under another request id is the same call: found, reported under the new id.
        hit = cache.get_many([_req("z", "p", seed=1)], "m1")
    assert hit["z"].text == "x" and hit["z"].request_id == "z"


def test_each_put_is_committed(tmp_path):
    """A second connection (as after a crash) sees every finished put without close()."""
    path = tmp_path / "c.sqlite"
    cache = GenerationCache(path)
    cache.put_many([(_req("a"), GenerationResult("a", text="x"))], "m")
    n = sqlite3.connect(str(path)).execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    cache.close()
    assert n == 1


def test_ignore_eos_default_keeps_cache_keys_stable():
    # Sampling gained `ignore_eos` later; ordinary requests must hash as before (no such key in the payload).
    assert "ignore_eos" not in Sampling().to_dict()
    assert Sampling(ignore_eos=True).to_dict()["ignore_eos"] is True


def test_one_call_under_several_ids_is_answered_for_each(tmp_path):
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        cache.put_many([(_req("a", "p"), GenerationResult("a", text="x"))], "m")
        hit = cache.get_many([_req("b", "p"), _req("c", "p")], "m")
        assert len(cache) == 1
    assert set(hit) == {"b", "c"} and hit["b"].text == hit["c"].text == "x"
