"""Every bad input gets one clear line on stderr, a non-zero exit, no traceback, and leaves nothing behind.

Each case writes its files into an empty folder, runs the real CLI entry point in-process, and checks that
the folder is exactly as it was: no run directory was created or touched. Every case fails before a model
is resolved or Ray starts (the configs name a teacher that does not exist, so a case that got that far
would fail with a different message).
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3ray.cli import main

GOOD_ROWS = "\n".join(json.dumps({"text": f"review {i} of a film", "label": ["neg", "pos"][i % 2]})
                      for i in range(6)) + "\n"


def _cfg(validation="val.jsonl", extra="", labels="[neg, pos]", data_extra=""):
    """A config whose data paths are relative to the case folder ({d} is filled in)."""
    lab = f"  labels: {labels}\n" if labels else ""
    return (f"run: {{output_dir: '{{d}}/run'}}\ntask:\n  type: classification\n{lab}"
            f"data:\n  validation: '{{d}}/{validation}'\n{data_extra}"
            f"teacher: {{model: '{{d}}/no-teacher'}}\nstudent: {{model: '{{d}}/no-student'}}\n{extra}")


def _parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["a b c"], "label": ["neg"]}), sink)
    return sink.getvalue().to_pybytes()


VALIDATE = ["validate", "{d}/c.yaml", "--skip-models"]
RUN = ["run", "{d}/c.yaml"]

# (case id, files to write, CLI args, expected part of the one error line)
CASES = [
    # --- the config file
    ("config-not-found", {}, ["validate", "{d}/nope.yaml"], "nope.yaml not found"),
    ("config-not-utf8", {"c.yaml": b"run: {name: caf\xe9}\n"}, VALIDATE, "is not UTF-8 text (byte 0xe9"),
    ("config-bad-yaml", {"c.yaml": "data: {validation: [\n"}, VALIDATE, "is not valid YAML (line 2, column 1)"),
    ("config-duplicate-key", {"c.yaml": _cfg(extra="synthesis: {rounds: 1}\nsynthesis: {rounds: 2}\n")},
     VALIDATE, "key 'synthesis' appears twice"),
    ("config-duplicate-nested-key", {"c.yaml": _cfg(extra="synthesis:\n  rounds: 1\n  rounds: 3\n")},
     VALIDATE, "key 'rounds' appears twice in one section (lines 10 and 11)"),
    ("config-is-a-list", {"c.yaml": "- data\n- run\n"}, VALIDATE, "the top level must be a mapping"),
    ("config-no-data-section", {"c.yaml": "run: {name: x}\n"}, VALIDATE, "data: required field is missing"),
    ("config-unknown-key-did-you-mean", {"c.yaml": _cfg(extra="synthesis: {roundz: 2}\n")}, VALIDATE,
     ("synthesis.roundz: unknown field (check the spelling; `s3ray config --explain` lists every field); "
      "did you mean 'rounds'?")),
    ("config-unknown-section", {"c.yaml": _cfg(extra="mineing: {batch_size: 2}\n")}, VALIDATE,
     "mineing: unknown field"),
    ("config-negative-number", {"c.yaml": _cfg(extra="synthesis: {rounds: -1}\n")}, VALIDATE,
     "synthesis.rounds: Input should be greater than or equal to 0"),
    ("config-negative-size", {"c.yaml": _cfg(data_extra="  validation_size: -5\n")}, VALIDATE,
     "data.validation_size: Input should be greater than or equal to 2"),
    ("config-duplicate-labels", {"c.yaml": _cfg(labels="[neg, pos, neg]"), "val.jsonl": GOOD_ROWS}, VALIDATE,
     "task.labels: names ['neg'] more than once"),
    ("override-without-equals", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS}, [*VALIDATE, "--set", "rounds"],
     "expected section.field=value"),
    ("override-unknown-field", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS},
     [*VALIDATE, "--set", "synthesis.round=1"], "synthesis.round: unknown field"),
    # --- data files
    ("data-not-found", {"c.yaml": _cfg()}, VALIDATE, "data.validation: {d}/val.jsonl does not exist"),
    ("data-wrong-extension", {"c.yaml": _cfg("val.txt"), "val.txt": GOOD_ROWS}, VALIDATE,
     "unsupported file type .txt"),
    ("data-empty-file", {"c.yaml": _cfg(), "val.jsonl": ""}, VALIDATE, "is empty; it needs at least one row"),
    ("data-not-utf8", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS.encode() + b'{"text": "caf\xe9"}\n'},
     VALIDATE, "val.jsonl:7: not UTF-8 text (byte 0xe9"),
    ("data-bad-json-line", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + "{oops\n"}, VALIDATE,
     "val.jsonl:7: not valid JSON"),
    ("data-line-not-object", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + '["a", "pos"]\n'}, VALIDATE,
     "val.jsonl:7: a JSON list; expected one JSON object per line"),
    ("data-mixed-types", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + '{"text": "x y z", "label": 1}\n'},
     VALIDATE, "val.jsonl:7: column 'label' holds a number here but a string on line 1"),
    ("data-key-only-in-later-row",
     {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + '{"text": "x y z", "label": "neg", "note": "n"}\n'},
     VALIDATE, "val.jsonl:7: key 'note' is not in the first row"),
    ("data-malformed-csv", {"c.yaml": _cfg("val.csv"), "val.csv": "text,label\na b c,neg\nd,e,f,pos\n"},
     VALIDATE, "val.csv: not a readable CSV file"),
    ("data-corrupt-parquet", {"c.yaml": _cfg("val.parquet"), "val.parquet": _parquet_bytes()[:-9]},
     VALIDATE, "val.parquet: not a readable Parquet file"),
    ("data-not-gzip", {"c.yaml": _cfg("val.jsonl.gz"), "val.jsonl.gz": GOOD_ROWS}, VALIDATE,
     "not a readable gzip file"),
    ("data-label-not-in-labels", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + '{"text": "x y z", "label": "meh"}\n'},
     VALIDATE, "row 6 (id validation-6): label 'meh' is not one of ['neg', 'pos']"),
    ("data-numeric-label-names-no-remap",
     {"c.yaml": _cfg(labels="['1', '0']"), "val.jsonl": '{"text": "a b c", "label": 1}\n{"text": "d e f", "label": 2}\n'},
     VALIDATE, "row 1 (id validation-1): label '2' is not one of ['1', '0']"),
    ("data-missing-column", {"c.yaml": _cfg(), "val.jsonl": '{"sentence": "a b c", "label": "neg"}\n'}, VALIDATE,
     ("columns ['text'] are missing; found ['label', 'sentence']. Add them, or rename columns with "
      "task.field_map, e.g. field_map: {sentence: text}")),
    ("data-duplicate-ids",
     {"c.yaml": _cfg(), "val.jsonl": '{"id": 1, "text": "a b c", "label": "neg"}\n{"id": 1, "text": "d e f", "label": "pos"}\n'},
     VALIDATE, "ids are not unique (e.g. '1')"),
    ("data-size-larger-than-data", {"c.yaml": _cfg(data_extra="  validation_size: 50\n"), "val.jsonl": GOOD_ROWS},
     VALIDATE, "data.validation_size is 50 but data.validation"),
    ("data-test-file-bad", {"c.yaml": _cfg(data_extra="  test: '{d}/test.jsonl'\n"), "val.jsonl": GOOD_ROWS,
                            "test.jsonl": '{"text": "a b c"}\n'}, VALIDATE, "data.test"),
    # --- labels from a dataset card
    ("card-malformed", {"c.yaml": _cfg(labels=None), "val.jsonl": GOOD_ROWS, "card.json": "{labels: [neg"},
     VALIDATE, "card.json: not valid JSON"),
    ("card-labels-not-strings", {"c.yaml": _cfg(labels=None), "val.jsonl": GOOD_ROWS,
                                 "card.json": '{"labels": {"neg": 0}}'}, VALIDATE,
     "'labels' must be a list of label names"),
    ("card-duplicate-labels", {"c.yaml": _cfg(labels=None), "val.jsonl": GOOD_ROWS,
                               "card.json": '{"labels": ["neg", "neg"]}'}, VALIDATE, "names ['neg'] more than once"),
    ("no-labels-anywhere", {"c.yaml": _cfg(labels=None), "val.jsonl": GOOD_ROWS}, VALIDATE,
     "task.labels is not set and no card.json"),
    # --- run directories and run arguments
    ("resume-missing-folder", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS}, [*RUN, "--resume"],
     "{d}/run does not exist; drop --resume to start a new run"),
    ("resume-folder-without-manifest", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS, "run/notes.txt": "mine"},
     [*RUN, "--resume"], "holds no manifest.json (no run was started there); drop --resume"),
    ("resume-corrupt-manifest", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS, "run/manifest.json": '{"steps": '},
     [*RUN, "--resume"], "manifest.json is corrupt"),
    ("run-over-existing-run", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS,
                               "run/manifest.json": '{"config": {}, "steps": {}}'}, RUN,
     "already holds a run; add --resume to continue it"),
    ("stop-after-not-a-step", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS}, [*RUN, "--stop-after", "round0/trian"],
     "--stop-after 'round0/trian' is not a step of this config's run; steps are: rationales, round0/synthesis"),
    ("stop-after-beyond-the-rounds", {"c.yaml": _cfg(extra="synthesis: {rounds: 1}\n"), "val.jsonl": GOOD_ROWS},
     [*RUN, "--stop-after", "round3/mine"], "--stop-after 'round3/mine' is not a step of this config's run"),
    ("stop-after-disabled-baseline",
     {"c.yaml": _cfg(extra="baselines: {equal_budget: false}\n"), "val.jsonl": GOOD_ROWS},
     [*RUN, "--stop-after", "baseline/equal_budget/train"], "is not a step of this config's run"),
    # --resume-if-exists starts a new run where there is none: it gets as far as the (missing) teacher model
    ("resume-if-exists-no-run-starts-one", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS}, [*RUN, "--resume-if-exists"],
     "teacher.model: folder {d}/no-teacher does not exist"),
    ("resume-if-exists-corrupt-manifest", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS, "run/manifest.json": "{"},
     [*RUN, "--resume-if-exists"], "manifest.json is corrupt"),
    ("run-with-bad-data", {"c.yaml": _cfg(), "val.jsonl": GOOD_ROWS + "{oops\n"}, RUN, "val.jsonl:7: not valid JSON"),
    ("report-no-manifest", {"old/notes.txt": "x"}, ["report", "{d}/old"], "no manifest.json here"),
    ("report-missing-folder", {}, ["report", "{d}/nothing"], "no manifest.json here"),
    ("report-corrupt-manifest", {"old/manifest.json": "[1, 2"}, ["report", "{d}/old"], "manifest.json is corrupt"),
    ("report-not-a-manifest", {"old/manifest.json": "[1, 2]"}, ["report", "{d}/old"], "is not an s3ray manifest"),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.mark.parametrize("files, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(tmp_path, capsys, files, args, expected):
    d = str(tmp_path)
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{d}", d))
    before = _snapshot(tmp_path)

    rc = main([a.replace("{d}", d) for a in args])

    out, err = capsys.readouterr()
    assert rc != 0
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert expected.replace("{d}", d) in errors[0]
    assert _snapshot(tmp_path) == before  # no run directory created, nothing written or touched


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_unexpected_errors_still_show_a_traceback(tmp_path, monkeypatch):
    """Only the project's own error types are shortened to one line; a bug keeps its traceback."""
    import s3ray.config

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(s3ray.config, "load_config", boom)
    with pytest.raises(ZeroDivisionError):
        main(["validate", str(tmp_path / "c.yaml")])
