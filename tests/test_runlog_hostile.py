"""Hostile and faulty run folders and output folders (issue 10: items 8, 10, 13, 14, 15, 17)."""

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from auditkit.errors import BadInput
from auditkit.runlog import RunLog, locked

ADAPTERS = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters")))
SAFETY = ADAPTERS / "safety-esd-u-destructive.safetensors"
CAND = ADAPTERS / "safety-esd-x-destructive.safetensors"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def image(key="s/0/0", config="base"):
    return {"type": "image", "config": config, "key": key, "suite": "s", "prompt_index": 0, "image_index": 0,
            "prompt": "p", "seed": 1, "guidance": 5.0, "steps": 2, "image": "images/x.png",
            "scores": {"d": 0.1}, "flags": {"d": False}}


def started(tmp_path) -> RunLog:
    log = RunLog(tmp_path / "run")
    log.start({"base": "lab", "suites": {"s": {"detector": "d"}}})
    log.append([image("s/0/0"), image("s/1/0")])
    return log


def test_a_corrupted_line_names_the_file_and_the_line(tmp_path):
    log = started(tmp_path)
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(BadInput) as exc:
        log.records()
    assert str(log.path) in str(exc.value) and "line 2" in str(exc.value)


def test_a_torn_last_line_is_ignored_and_dropped_before_the_next_append(tmp_path):
    log = started(tmp_path)
    with open(log.path, "a") as fh:
        fh.write('{"type": "image", "conf')  # a kill in the middle of a write
    assert len(log.records()) == 2
    log.append([image("s/2/0")])
    assert len(log.records()) == 3 and all(line.endswith("}") for line in log.path.read_text().splitlines())


@pytest.mark.parametrize("first", ['{"type": "image"}\n', "[1, 2]\n", '{"suites": {}}\n'])
def test_a_header_that_is_not_one_is_refused(tmp_path, first):
    (tmp_path / "run.jsonl").write_text(first)
    with pytest.raises(BadInput, match="line 1"):
        RunLog(tmp_path).header()


def test_a_record_with_missing_fields_is_refused(tmp_path):
    log = started(tmp_path)
    with open(log.path, "a") as fh:
        fh.write(json.dumps({"type": "image", "config": "base"}) + "\n")
    with pytest.raises(BadInput, match="line 4 is not an image record"):
        log.records()


def test_two_runs_cannot_write_into_one_folder(tmp_path):
    with locked(tmp_path / "out"):
        with pytest.raises(BadInput, match="another auditkit run"):
            with locked(tmp_path / "out"):
                pass
    with locked(tmp_path / "out"):  # released: the next run may go on
        pass


def test_a_suite_edited_in_place_does_not_resume_on_stale_records(tmp_path):
    from auditkit.dynamic import suites_info
    from auditkit.suites import load_suite

    text = ("schema: auditkit.suite/1\nname: s\nversion: 1\nconcept: {word: cross, neutral: square}\n"
            "detector: lab-cross\nsampling: {seed: 1}\nprompts:\n  - a red cross\n")
    suite = tmp_path / "s.yaml"
    suite.write_text(text)
    log = RunLog(tmp_path / "run")
    log.start({"suites": suites_info([load_suite(suite)])})
    suite.write_text(text.replace("seed: 1", "seed: 2").replace("a red cross", "a blue cross"))
    with pytest.raises(BadInput, match="cannot resume: the run was started with other suites"):
        log.start({"suites": suites_info([load_suite(suite)])})


def test_a_stray_rank_variable_does_not_silence_the_scan(monkeypatch):
    from auditkit.distributed import is_main_process, launched

    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    assert is_main_process() and not launched()
    monkeypatch.setenv("WORLD_SIZE", "x")
    assert is_main_process() and not launched()
    for k, v in {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert not is_main_process() and launched()


def test_a_static_scan_with_a_stray_rank_writes_its_report(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR")}
    res = run("scan", CAND, "--safety", SAFETY, "--static", "--out", tmp_path / "r", env={**env, "RANK": "1"})
    assert res.returncode in (1, 3) and (tmp_path / "r" / "report.json").is_file(), res.stderr


@pytest.mark.parametrize("where", ["file", "inside-file", "package"])
def test_a_bad_output_folder_fails_before_anything_runs(tmp_path, where):
    import auditkit

    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "inside-file": tmp_path / "f" / "r",
           "package": Path(auditkit.__file__).parent / "reports-here"}[where]
    res = run("scan", CAND, "--safety", SAFETY, "--base", "lab", "--out", out)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "dynamic scan" not in res.stderr and not (Path(auditkit.__file__).parent / "reports-here").exists()
