"""Batch state (resume), the results table and index.html's escaping, and the pool's retries of dead workers."""

import json
import os
import shutil

import pytest

from auditkit.batch.engines import LocalEngine
from auditkit.batch.index import render_index
from auditkit.batch.results import write_table
from auditkit.batch.state import BatchState, row_key
from auditkit.batch.worker import Task
from auditkit.config import ScanConfig
from auditkit.errors import BadInput


def row(i, verdict="pass", **kw):
    return {"id": f"a{i}", "sha256": f"{i:064x}", "verdict": verdict} | kw


def test_a_line_cut_by_a_kill_is_ignored_and_dropped_before_the_next_append(tmp_path):
    state = BatchState(tmp_path)
    state.record(row(1))
    state.record(row(2))
    with open(state.results_path, "a") as fh:
        fh.write('{"id": "a3", "sha256": "00')  # killed mid-write
    assert sorted(k[0] for k in state.finished()) == ["a1", "a2"]
    state.record(row(3, "risk"))
    lines = state.results_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(ln)["id"] for ln in lines)
    assert state.finished()[row_key(row(3))]["verdict"] == "risk"


def test_the_first_line_of_an_adapter_wins_and_a_changed_file_is_not_finished(tmp_path):
    state = BatchState(tmp_path)
    state.record(row(1, "risk"))
    state.record(row(1, "pass"))
    assert state.finished()[row_key(row(1))]["verdict"] == "risk"
    assert row_key(row(1, sha256="f" * 64)) not in state.finished()
    assert row_key(row(1, sidecars_sha256="e" * 64)) not in state.finished()  # issue 26 H2: a sidecar changed


def test_a_corrupt_line_in_the_middle_is_a_one_line_error(tmp_path):
    state = BatchState(tmp_path)
    state.results_path.write_text('{"id": "a1"}\nnot json\n{"id": "a2"}\n')
    with pytest.raises(BadInput, match="line 2 is not a result row"):
        state.finished()


def test_a_resumed_batch_with_other_settings_is_refused(tmp_path):
    BatchState(tmp_path).start({"input": "x", "scan": {"multipliers": [1.0]}})
    BatchState(tmp_path).start({"input": "x", "scan": {"multipliers": [1.0]}})
    with pytest.raises(BadInput, match="cannot resume: the batch was started with other scan"):
        BatchState(tmp_path).start({"input": "x", "scan": {"multipliers": [0.5]}})


HOSTILE = '<script>alert("x")</script>'


def test_index_html_escapes_every_value_from_files():
    rows = [row(1, "risk", path=HOSTILE, format="<img src=x onerror=alert(1)>", reason=HOSTILE,
                report="reports/x", reemergence_ratio=0.7),
            {**row(2, "error"), "id": HOSTILE + ".safetensors", "error": "</td><script>alert(2)</script>"}]
    html = render_index(rows)
    assert "<script>alert" not in html and "<img src=x" not in html and "</td><script>" not in html
    assert "&lt;script&gt;alert(" in html and html.count("<script>") == 1  # only the page's own script
    assert 'href="reports/x/report.html"' in html
    csp = html.split('Content-Security-Policy" content="')[1].split('"')[0]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp.split("script-src")[1]


def test_the_results_table_is_parquet_and_csv_with_formulas_defused(tmp_path):
    import pandas as pd

    rows = [row(1, "risk", path="=HYPERLINK(\"http://x\")", reemergence_ratio=0.5, rank=4),
            row(2, "error", error="boom")]
    paths = write_table(rows, tmp_path)
    table = pd.read_parquet(paths["parquet"])
    assert list(table["id"]) == ["a1", "a2"] and table["reemergence_ratio"][0] == 0.5
    assert table["path"][0].startswith("=")  # the data itself is kept
    csv = pd.read_csv(paths["csv"])
    assert csv["path"][0].startswith("'=") and csv["error"][1] == "boom"


class StandInWorker:
    """A stand-in for :class:`auditkit.batch.worker.Worker` (no pipeline); subclasses say how it scans."""

    def __init__(self, device=None):
        pass

    def render_shared(self, spec):
        return None


class DyingWorker(StandInWorker):
    """Dies (the whole process) the first time it scans an id whose marker file does not exist yet."""

    def scan(self, task):
        import os
        from pathlib import Path

        marker = Path(task.config.out) / "died"
        if task.id.startswith("die") and (task.id == "die-always" or not marker.exists()):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(1)
        return {"id": task.id, "sha256": task.sha256, "verdict": "pass", "attempts": task.attempt}


@pytest.mark.slow
def test_a_worker_killed_mid_scan_has_its_adapter_retried_then_given_up(tmp_path):
    ids = ("ok1", "die-once", "ok2", "die-always", "ok3", "ok4", "ok5")
    tasks = [Task(i, None, ScanConfig(out=tmp_path / i)) for i in ids]
    results = list(LocalEngine(2, max_attempts=3, worker=DyingWorker).run([], tasks))
    rows = {t.id: r for t, r in results}
    assert len(results) == len(ids) and sorted(rows) == sorted(ids)  # one row each, none lost or doubled
    assert rows["die-once"]["verdict"] == "pass" and (tmp_path / "die-once" / "died").exists()
    assert rows["die-always"]["verdict"] == "error" and "died 3 times" in rows["die-always"]["error"]
    # tasks that shared the pool with the dying one are retried without being counted against them
    assert all(rows[i]["verdict"] == "pass" for i in ids if i.startswith("ok"))


class ThreadsWorker(StandInWorker):
    """Reports the thread count its process started with."""

    def scan(self, task):
        import os

        return {"id": task.id, "threads": os.environ.get("OMP_NUM_THREADS"), "verdict": "pass"}


@pytest.mark.slow
def test_pool_workers_share_the_cores_and_a_users_count_is_kept(tmp_path, monkeypatch):
    from auditkit.batch.threads import share

    assert share(2, cores=16) == 8 and share(3, cores=2) == 1 and share(1, cores=4) == 4
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tasks = [Task(i, None, ScanConfig(out=tmp_path / i)) for i in ("a", "b")]
    rows = [r for _, r in LocalEngine(2, worker=ThreadsWorker).run([], tasks)]
    assert {r["threads"] for r in rows} == {str(share(2))} and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    rows = [r for _, r in LocalEngine(2, worker=ThreadsWorker).run([], tasks)]
    assert {r["threads"] for r in rows} == {"5"}


@pytest.mark.slow
def test_a_ray_actor_killed_mid_scan_has_its_adapter_retried_then_given_up(tmp_path):
    """The Ray engine's retry path, with actors that really die (the whole process) as the pool test's workers do."""
    ray = pytest.importorskip("ray")
    import sys

    from ray import cloudpickle

    from auditkit.batch.ray_engine import RayEngine

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need not import this test module
    ids = ("ok1", "die-once", "ok2", "die-always", "ok3")
    tasks = [Task(i, None, ScanConfig(out=tmp_path / i)) for i in ids]
    engine = RayEngine(workers=2, num_cpus=2, max_attempts=2, worker=DyingWorker)
    rows = {t.id: r for t, r in engine.run([], tasks)}
    assert sorted(rows) == sorted(ids) and not ray.is_initialized()  # one row each; the Ray it started is stopped
    assert rows["die-once"]["verdict"] == "pass" and rows["die-once"]["attempts"] == 2
    assert rows["die-always"]["verdict"] == "error" and "died 2 times" in rows["die-always"]["error"]
    assert all(rows[i]["verdict"] == "pass" and rows[i]["attempts"] == 1 for i in ids if i.startswith("ok"))


class SleepingWorker(StandInWorker):
    """Writes its process id into the task's out folder, then sleeps (a long scan)."""

    def scan(self, task):
        import os
        import time

        (task.config.out / f"{os.getpid()}.pid").write_text("")
        time.sleep(60)


ORPHAN_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from auditkit.batch.engines import LocalEngine
from auditkit.batch.worker import Task
from auditkit.config import ScanConfig
from test_batch_state import SleepingWorker
tasks = [Task(i, None, ScanConfig(out=Path({out!r}))) for i in ("a", "b")]
list(LocalEngine(2, worker=SleepingWorker).run([], tasks))
"""


def _alive(pid: int) -> bool:
    from pathlib import Path

    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_pool_workers_exit_when_the_batch_is_killed(tmp_path):
    # issue 26 M20: kill -9 of a batch left its pool workers (and the resource tracker) blocked forever
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = ORPHAN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    batch = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline and batch.poll() is None:
            time.sleep(0.05)
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert len(workers) == 2
    finally:
        batch.send_signal(signal.SIGKILL)
        batch.wait()
    deadline = time.monotonic() + 10
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # the test's own leftovers, by id
    assert not alive


NODE_DOM = """
const elements = {};
function element() {
  return {value: "", textContent: "", dataset: {}, addEventListener() {}, removeAttribute() {}, setAttribute() {}};
}
globalThis.document = {getElementById(id) {
  if (id === "results") return {tBodies: [{rows: [], appendChild() {}}], tHead: {rows: [{cells: []}]}};
  return elements[id] || (elements[id] = element());
}};
globalThis.location = {hash: HASH};
globalThis.history = {replaceState() {}};
SCRIPT
console.log(JSON.stringify({verdict: elements.verdict.value, q: elements.q.value, shown: elements.shown.textContent}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_a_malformed_address_fragment_leaves_the_index_page_working():
    # issue 26 L8: '#q=%E0%A4%A' threw URIError in load(): no initial filter, no "showing N of M"
    import json
    import subprocess

    from auditkit.batch.index import SCRIPT

    program = NODE_DOM.replace("HASH", json.dumps("#q=%E0%A4%A&verdict=risk")).replace("SCRIPT", SCRIPT)
    done = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"verdict": "risk", "q": "", "shown": "showing 0 of 0"}


def test_without_an_address_the_ray_engine_starts_a_ray_of_its_own(monkeypatch):
    """Never one Ray finds by itself: RAY_ADDRESS, or the latest cluster started on the machine (another batch's,
    another user's); an address given is joined as it is."""
    import sys
    import types

    from auditkit.batch import ray_engine

    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw),
                                 shutdown=lambda: None)
    monkeypatch.setattr(ray_engine, "import_ray", lambda: fake)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    with ray_engine.RayEngine(num_cpus=3).connected():
        pass
    with ray_engine.RayEngine(address="auto").connected():
        pass
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 3
    assert calls[1]["address"] == "auto" and "num_cpus" not in calls[1]
