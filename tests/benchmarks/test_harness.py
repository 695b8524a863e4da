"""benchmarks/harness.py: what every benchmark records and how it runs auditkit (no model)."""

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("harness.py")


def test_the_machine_line_names_torch_and_threads_for_a_lab_study(harness):
    pytest.importorskip("torch")
    assert harness.machine(1).endswith(", 1 thread") and harness.machine(2).endswith(", 2 threads")
    assert "torch " in harness.machine(2) and "numpy " in harness.machine()
    assert set(harness.provenance(2)) == {"machine", "git_commit"}


def test_the_commit_comes_from_the_environment_where_git_has_none(harness, monkeypatch):
    monkeypatch.setattr(harness, "ROOT", harness.ROOT / "no-such-folder")  # git fails there: no commit
    monkeypatch.setenv("AUDITKIT_GIT_COMMIT", "0123abc")
    assert harness.git_commit() == "0123abc"


def test_results_are_written_whole_with_their_folder(harness, tmp_path):
    path = tmp_path / "new" / "r.json"
    harness.write_json(path, {"a": tmp_path}, default=str)
    assert json.loads(path.read_text()) == {"a": str(tmp_path)}


def test_a_failed_auditkit_run_stops_the_benchmark_and_a_verdict_does_not(harness, tmp_path):
    with pytest.raises(SystemExit, match="auditkit scan .* failed with exit 2"):
        harness.auditkit("scan", tmp_path / "missing.safetensors", "--static", "--no-config", threads=1)
    seconds, res = harness.auditkit("scan", tmp_path / "missing.safetensors", "--static", "--no-config", check=False)
    assert res.returncode == 2 and seconds > 0


def test_a_lab_safety_module_is_named_by_method_and_base(harness):
    assert harness.lab_safety("esd-u").name == "safety-esd-u.safetensors"
    assert harness.lab_safety("esd-u-destructive").name == "safety-esd-u-destructive.safetensors"
    assert harness.lab_safety("uce", "lab-dit").name == "dit-safety-uce.safetensors"
    with pytest.raises(SystemExit, match="ships no safety module named 'esd-x'"):
        harness.lab_safety("esd-x", "lab-dit")  # the DiT lab ships no destructive module


def test_a_work_folder_keeps_the_safety_set_its_candidates_were_trained_with(harness, tmp_path):
    fresh = tmp_path / "fresh"
    harness.claim_work_folder(fresh, "faithful")
    harness.claim_work_folder(fresh, "faithful")  # resumed with the same set
    assert (fresh / "safety-set.txt").read_text() == "faithful\n" and (fresh / "candidates").is_dir()
    with pytest.raises(SystemExit, match="faithful safety modules; use another --work for --safety destructive"):
        harness.claim_work_folder(fresh, "destructive")
    old = tmp_path / "old"  # candidates from before --safety, no marker: destructive
    (old / "candidates").mkdir(parents=True)
    (old / "candidates" / "a.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="destructive safety modules"):
        harness.claim_work_folder(old, "faithful")
    harness.claim_work_folder(old, "destructive")
