"""Triage's static cancellation: the same figure as the static scan, with the safety module read once per process."""

import os

import pytest

from auditkit.batch import triage as triage_mod
from auditkit.batch.inputs import Entry
from auditkit.batch.threads import children_threads
from auditkit.batch.triage import TriageSettings, triage_one
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter
from auditkit.models import architectures
from auditkit.scan import run_static_scan

full_models = pytest.importorskip("full_models")


@pytest.fixture()
def files(tmp_path):
    lab = architectures.get("lab")
    safety = read_adapter(full_models.SAFETY_U).modules
    undo = {n: LoraModule(n, m.down, -0.6 * m.up, m.scale) for n, m in safety.items()}
    safe_path = save_adapter(safety, tmp_path / "safety.safetensors", lab)
    return save_adapter(undo, tmp_path / "undo.safetensors", lab), safe_path


def test_triage_cancellation_equals_the_static_scans_and_the_safety_module_is_read_once(files, monkeypatch):
    cand, safety = files
    triage_mod._safety_adapter.cache_clear()
    reads = []
    real = triage_mod._safety_adapter.__wrapped__

    def counted(*args):
        reads.append(args)
        return real(*args)

    monkeypatch.setattr(triage_mod, "_safety_adapter", triage_mod.functools.lru_cache(maxsize=4)(counted))
    settings = TriageSettings(safety=str(safety), arch="lab")
    rows = [triage_one(Entry(f"c{i}", cand), settings) for i in range(3)]
    want = run_static_scan(cand, safety, arch="lab").findings.cancellation
    assert all(r["triage_error"] is None for r in rows)
    assert [r["static_cancellation"] for r in rows] == pytest.approx([want] * 3, abs=1e-12)
    assert want == pytest.approx(0.6, abs=1e-6) and len(reads) == 1
    # a safety file changed in place is read again (its size and modification time are part of the key)
    os.utime(safety, ns=(1, 1))
    triage_one(Entry("c", cand), settings)
    assert len(reads) == 2


def test_triage_workers_run_one_thread_each_and_the_callers_environment_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # a count the user set is kept
    with children_threads(1):
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OPENBLAS_NUM_THREADS"] in ("1", os.environ.get(
            "OPENBLAS_NUM_THREADS"))
        assert os.environ["MKL_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"
