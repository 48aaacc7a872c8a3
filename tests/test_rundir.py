"""The run directory: durable atomic writes, one driver at a time, verified step outputs, relative paths,
fingerprinted data files and redacted credentials."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3ray.pipeline.rundir import RunDir, RunDirError, atomic_write_bytes, fingerprint, write_parquet
from s3ray.redact import redact_url

REPO = Path(__file__).resolve().parents[1]
TABLE = pa.table({"id": ["a", "b", "c"], "text": ["one two", "three four", "five six"]})


def _config(tmp_path, **data):
    val = tmp_path / "val.jsonl"
    if not val.exists():
        val.write_text('{"text": "good film", "label": "positive"}\n')
    return {"run": {"output_dir": str(tmp_path / "run")}, "data": {"validation": str(val), **data},
            "teacher": {"openai": {"base_url": "http://127.0.0.1:8000/v1"}}}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp*"))


def test_atomic_writes_replace_whole_files_and_leave_no_temp_files(tmp_path):
    p = atomic_write_bytes(tmp_path / "sub" / "f.json", b'{"v": 1}')
    atomic_write_bytes(p, b'{"v": 2}')
    assert p.read_bytes() == b'{"v": 2}'
    write_parquet(tmp_path / "t.parquet", TABLE)
    assert pq.read_table(tmp_path / "t.parquet").equals(TABLE)
    # A write that fails half-way leaves the old file as it was and no temp file behind.
    with pytest.raises(Exception):  # noqa: B017 - Arrow's own error for a non-table; which one does not matter
        write_parquet(tmp_path / "t.parquet", {"not": "a table"})
    assert pq.read_table(tmp_path / "t.parquet").equals(TABLE)
    assert _leftovers(tmp_path) == []


def test_finished_step_with_unsound_output_runs_again(tmp_path, caplog):
    run = RunDir(tmp_path / "run", _config(tmp_path), resume=False)
    run.write_parquet("rounds/round_0.parquet", TABLE)
    ckpt = run.path / "students" / "round0" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "model.bin").write_bytes(os.urandom(300_000))
    result = {"path": "rounds/round_0.parquet", "checkpoint": str(ckpt)}
    run.finish("round0/synthesis", result, 1.0, outputs=run.outputs_in(result))
    rec = json.loads(run.manifest_path.read_text())["steps"]["round0/synthesis"]["outputs"]
    assert set(rec) == {"rounds/round_0.parquet", "students/round0/checkpoint"}  # relative, not absolute
    assert run.done("round0/synthesis")

    # A power loss kept the manifest but not the data: the Parquet file is empty.
    (run.path / "rounds/round_0.parquet").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="s3ray"):
        assert not run.done("round0/synthesis")
    assert "round_0.parquet" in caplog.text and "bytes" in caplog.text
    assert "round0/synthesis" not in json.loads(run.manifest_path.read_text())["steps"]

    # Same size, other bytes in the middle of a big file: the cheap hash still reads both ends, so it
    # catches a change at the end (a torn tail).
    run.write_parquet("rounds/round_0.parquet", TABLE)
    run.finish("round0/synthesis", result, 1.0, outputs=run.outputs_in(result))
    blob = bytearray((ckpt / "model.bin").read_bytes())
    blob[-10:] = bytes(10)
    (ckpt / "model.bin").write_bytes(bytes(blob))
    assert not run.done("round0/synthesis")
    run.close()


def test_unreadable_parquet_of_the_recorded_size_is_not_done(tmp_path):
    run = RunDir(tmp_path / "run", _config(tmp_path), resume=False)
    run.write_parquet("x.parquet", TABLE)
    rec = fingerprint(run.path / "x.parquet")
    run.manifest["steps"]["s"] = {"result": {}, "outputs": {"x.parquet": rec}}
    assert run.done("s")
    data = (run.path / "x.parquet").read_bytes()
    (run.path / "x.parquet").write_bytes(data[:-4] + b"XXXX")  # footer magic gone
    run.manifest["steps"]["s"] = {"result": {}, "outputs": {"x.parquet": fingerprint(run.path / "x.parquet")}}
    assert not run.done("s")
    run.close()


_HOLDER = """
import json, sys
from s3ray.pipeline.rundir import RunDir
run = RunDir(sys.argv[1], json.loads(sys.argv[2]), resume=True)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_driver_is_refused_while_the_first_holds_the_run(tmp_path):
    RunDir(tmp_path / "run", _config(tmp_path), resume=False).close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "run"),
                               json.dumps(_config(tmp_path))], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"{tmp_path / 'run'} is in use .*pid {holder.pid}"):
            RunDir(tmp_path / "run", _config(tmp_path), resume=True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0
    with RunDir(tmp_path / "run", _config(tmp_path), resume=True) as again:  # released at exit
        assert again.steps() == {}


def test_a_moved_run_resolves_its_recorded_outputs(tmp_path):
    run = RunDir(tmp_path / "a", _config(tmp_path), resume=False)
    out = run.write_parquet("rounds/round_0.parquet", TABLE)
    assert run.rel(out) == "rounds/round_0.parquet" and run.abs("rounds/round_0.parquet") == Path(out)
    assert run.rel("/elsewhere/x") == "/elsewhere/x"  # outside the run: kept as given
    run.finish("round0/synthesis", {"path": run.rel(out)}, 1.0, outputs=[out])
    run.close()
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = RunDir(tmp_path / "b", {**_config(tmp_path), "run": {"output_dir": str(tmp_path / "b")}}, resume=True)
    assert moved.done("round0/synthesis")
    assert moved.read_parquet(moved.result("round0/synthesis")["path"]) == TABLE.to_pylist()
    moved.close()


def test_a_changed_data_file_is_refused_on_resume(tmp_path):
    cfg = _config(tmp_path)
    RunDir(tmp_path / "run", cfg, resume=False).close()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["data"]["data.validation"]["sha256"]
    RunDir(tmp_path / "run", cfg, resume=True).close()  # unchanged: fine
    (tmp_path / "val.jsonl").write_text('{"text": "bad film", "label": "negative"}\n')
    with pytest.raises(RunDirError, match=r"data.validation: .*val.jsonl changed since this run started "
                                          r"\(sha256 .*\); restore it or start a new run_dir"):
        RunDir(tmp_path / "run", cfg, resume=True)


def test_validation_parquet_is_written_once(tmp_path):
    run = RunDir(tmp_path / "run", _config(tmp_path), resume=False)
    calls = []

    def make():
        calls.append(1)
        return TABLE

    p = run.write_parquet_once("data/validation.parquet", make)
    inode = os.stat(p).st_ino
    run.close()
    run = RunDir(tmp_path / "run", _config(tmp_path), resume=True)
    assert run.write_parquet_once("data/validation.parquet", make) == p
    assert len(calls) == 1 and os.stat(p).st_ino == inode
    Path(p).write_bytes(b"")  # lost in a crash: written again
    run.write_parquet_once("data/validation.parquet", make)
    assert len(calls) == 2 and pq.read_table(p).equals(TABLE)
    run.close()


def test_manifest_holds_no_credentials(tmp_path):
    cfg = _config(tmp_path)
    cfg["teacher"]["openai"]["base_url"] = "https://me:s3cr3t@llm.example.com/v1?api_key=k3y&region=eu"
    RunDir(tmp_path / "run", cfg, resume=False).close()
    text = (tmp_path / "run" / "manifest.json").read_text()
    assert "s3cr3t" not in text and "k3y" not in text
    assert "https://***@llm.example.com/v1?api_key=***&region=eu" in text
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_resume_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(RunDirError, match="does not exist; drop --resume to start a new run"):
        RunDir(tmp_path / "nothing", _config(tmp_path), resume=True)
    assert not (tmp_path / "nothing").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RunDirError, match="holds no manifest.json"):
        RunDir(tmp_path / "mine", _config(tmp_path), resume=True)
    assert list((tmp_path / "mine").iterdir()) == []  # not even a lock file
    RunDir(tmp_path / "run", _config(tmp_path), resume=False).close()
    with pytest.raises(RunDirError, match="already holds a run; add --resume"):
        RunDir(tmp_path / "run", _config(tmp_path), resume=False)
    (tmp_path / "run" / "manifest.json").write_text('{"config": {"data": ')
    with pytest.raises(RunDirError, match="manifest.json is corrupt"):
        RunDir(tmp_path / "run", _config(tmp_path), resume=True)
    changed = _config(tmp_path)
    changed["synthesis"] = {"rounds": 5}
    (tmp_path / "run" / "manifest.json").unlink()
    RunDir(tmp_path / "run", _config(tmp_path), resume=False).close()
    with pytest.raises(RunDirError, match=r"config changed in synthesis.rounds \(None -> 5\)"):
        RunDir(tmp_path / "run", changed, resume=True)
