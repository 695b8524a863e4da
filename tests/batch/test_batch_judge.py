"""The base judge orders `auditkit batch`'s dynamic queue: behaviour first, the static suspicion after."""

import dataclasses
from importlib import resources
from pathlib import Path

import pytest
from conftest import tiny_cross_suite

from auditkit.batch.triage import priority
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                           "safety-esd-u-destructive.safetensors")))


def inverse(path: Path, factor: float) -> Path:
    """A candidate that undoes ``factor`` of the safety update."""
    s = read_adapter(SAFETY)
    return save_adapter({n: LoraModule(n, m.down, -factor * m.up, m.scale) for n, m in s.modules.items()}, path,
                        s.architecture)


def test_priority_puts_the_base_judge_before_the_static_suspicion():
    rows = [{"id": "static", "suspicion": 0.9, "base_judge": 0.05}, {"id": "unjudged", "suspicion": 2.0},
            {"id": "behaviour", "suspicion": 0.1, "base_judge": 0.8},
            {"id": "nan", "suspicion": 1.5, "base_judge": float("nan")},
            {"id": "unreadable", "suspicion": -1.0, "base_judge": None}]
    order = [r["id"] for r in sorted(rows, key=priority, reverse=True)]
    # judged rows by the judge; the others after them by suspicion, an unreadable file last
    assert order == ["behaviour", "static", "unjudged", "nan", "unreadable"]


def test_the_batch_queue_follows_the_judge_where_it_disagrees_with_the_static_order(tmp_path, monkeypatch):
    """The wiring: judged values (stubbed, the opposite of the static order) set the queue positions; the scans
    themselves are not run here."""
    from auditkit.batch import judge, run
    from auditkit.batch.run import BatchConfig, run_batch
    from auditkit.config import ScanConfig

    folder = tmp_path / "in"
    folder.mkdir()
    for name, factor in (("strong", 0.9), ("mid", 0.5), ("weak", 0.1)):
        inverse(folder / f"{name}.safetensors", factor)
    (tmp_path / "suite.yaml").write_text(tiny_cross_suite())
    readings = {"strong": 0.1, "mid": 0.2, "weak": 0.7}  # behaviour says: weak first
    loaded = []
    monkeypatch.setattr(judge, "judge_one", lambda pipe, scan: readings[Path(scan.candidate).stem])
    monkeypatch.setattr(run, "_scan", lambda *a, **k: 0)
    monkeypatch.setattr("auditkit.dynamic.load_base", lambda base, device=None: loaded.append(base.name) or ("pipe",))
    scan = ScanConfig(safety=SAFETY, base="lab", suites=(str(tmp_path / "suite.yaml"),))
    rows = {Path(r["path"]).stem: r for r in run_batch(BatchConfig(folder, tmp_path / "out", scan)).rows}
    assert loaded == ["lab"]  # the base loaded once for the pass
    assert rows["strong"]["suspicion"] > rows["mid"]["suspicion"] > rows["weak"]["suspicion"]  # static order
    assert [rows[n]["queue_position"] for n in ("weak", "mid", "strong")] == [1, 2, 3]
    assert rows["weak"]["base_judge"] == 0.7
    # without a safety module (amplification) nothing is judged: the static order stays
    none = run_batch(BatchConfig(folder, tmp_path / "out2", ScanConfig(base="lab",
                                                                       suites=(str(tmp_path / "suite.yaml"),))))
    assert all(r["base_judge"] is None for r in none.rows) and loaded == ["lab"]


def test_judge_rows_measures_each_candidate_on_the_lab(tmp_path):
    pytest.importorskip("torch")
    from auditkit.batch.inputs import Entry
    from auditkit.batch.judge import judge_rows
    from auditkit.config import ScanConfig
    from auditkit.lab.model import lab_pipeline_available

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    (tmp_path / "suite.yaml").write_text(tiny_cross_suite())
    entries = [Entry(id=n, path=inverse(tmp_path / f"{n}.safetensors", f)) for n, f in (("most", 0.9), ("little", 0.1))]
    rows = [{"suspicion": 0.5} for _ in entries]
    scan = ScanConfig(safety=SAFETY, base="lab", suites=(str(tmp_path / "suite.yaml"),))
    judge_rows(list(zip(entries, rows, strict=True)), lambda e: dataclasses.replace(scan, candidate=e.path))
    most, little = (r["base_judge"] for r in rows)
    assert most > 0.5 > little  # undoing 90% of the safety update draws the concept again, 10% does not
