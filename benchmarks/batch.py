"""Benchmark: `auditkit batch` against one `auditkit scan` per adapter, triage throughput, Ray's per-file cost.

Measured in one run, on this machine:

1. **Batch vs sequential scans** (the lab): N lab candidates (inverses of the shipped ESD-u safety adapter at
   several strengths, and weak unrelated LoRAs) scanned by one ``auditkit batch`` process and by N
   ``auditkit scan`` processes in a row, same suites, seeds, steps and multipliers. The batch renders the base
   and base+safety configurations once and keeps its pipeline loaded; verdicts and figures are checked
   identical (every report's dynamic section and reasons).
2. **Triage throughput**: SD1.5-shaped rank-32 kohya files (160 attention and feed-forward modules, fp16, as
   benchmarks/static_scan.py makes them; hard links of one file, so the page cache is warm), triaged in 2
   processes, with a safety module (hash, read, static cancellation) and without (hash and read).
3. **Ray per-file overhead**: the same candidates scanned by one warm in-process worker and by one warm Ray
   actor (a local Ray), shared renders made beforehand: (Ray time - in-process time) / N.
4. **On paper**: adapters per day per GPU for SD1.5 and SDXL, and GPUs for 10,000 adapters a day, from the
   per-image cost (benchmarks/results/gpu_throughput.json when a GPU run made it, else the stated assumptions).

Usage: ``python benchmarks/batch.py [--json benchmarks/results/batch.json] [--parts batch,triage,ray]``;
``--ci``: 2 candidates, a tiny suite, 3 triage files (the test's size; its timings mean nothing); ``--no-ray``
leaves out part 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from harness import RESULTS, ROOT, auditkit, emit, provenance

SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                           "safety-esd-u-destructive.safetensors")))
# per-image cost when no GPU run measured it: FLOPs counted for SD1.5 (BENCHMARKS.md, GPU throughput: 42.7 TFLOP
# per 512² image, 25 guided steps), an H100's bf16 dense peak, an assumed utilisation; SDXL at 1024² assumed
# 4x SD1.5's cost per image (its UNet is ~3x the parameters and the latent 4x the area; attention grows faster)
ASSUMED = {"sd15_tflop_per_image": 42.7, "gpu_peak_tflops": 989.0, "utilisation": 0.4, "sdxl_over_sd15": 4.0}


def lab_candidates(folder: Path, n: int) -> list[Path]:
    """n lab candidates: inverses of the safety adapter (strength 0.3 to 0.95) and weak unrelated LoRAs."""
    import numpy as np

    from auditkit.lora.adapter import LoraModule, read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models import architectures

    folder.mkdir(parents=True, exist_ok=True)
    safety, lab = read_adapter(SAFETY), architectures.get("lab")
    rng = np.random.default_rng(0)
    queries = [m for m in lab.modules if m.startswith("unet.") and m.endswith(".attn2.to_q")]
    paths = []
    for i in range(n):
        if i % 2 == 0:
            f = 0.3 + 0.65 * i / max(1, n - 1)
            mods = {k: LoraModule(k, m.down, -f * m.up, m.scale) for k, m in safety.modules.items()}
        else:
            mods = {k: LoraModule(k, rng.normal(0, 0.02, (2, lab.modules[k].flat_in)).astype(np.float32),
                                  rng.normal(0, 0.02, (lab.modules[k].out_features, 2)).astype(np.float32), 1.0)
                    for k in queries}
        paths.append(save_adapter(mods, folder / f"cand{i:02d}.safetensors", lab))
    return paths


def scan_args(suite: Path | None, multipliers: str, steps: int | None) -> list[str]:
    args = ["--no-config", "--safety", str(SAFETY), "--base", "lab", "--multipliers", multipliers]
    args += ["--suite", str(suite)] if suite else []
    return args + (["--steps", str(steps)] if steps else [])


def figures(report: dict) -> dict:
    return {"verdict": report["verdict"], "reasons": report["reasons"], "static": report["static"],
            "dynamic": {k: report["dynamic"][k] for k in ("suites", "configurations", "images", "verdict")}}


def batch_vs_scans(work: Path, n: int, suite: Path | None, multipliers: str, steps: int | None) -> dict:
    folder = work / "candidates"
    paths = lab_candidates(folder, n)
    batch_s, _ = auditkit("batch", folder, "--out", work / "batch", *scan_args(suite, multipliers, steps))
    scans_s = 0.0
    for p in paths:
        seconds, _ = auditkit("scan", p, "--out", work / "scans" / p.stem, *scan_args(suite, multipliers, steps))
        scans_s += seconds
    rows = {r["id"]: r for r in map(json.loads, (work / "batch" / "results.jsonl").read_text().splitlines())}
    same, verdicts = [], {}
    for p in paths:
        batch_report = json.loads(next((work / "batch" / "reports").glob(f"{p.name}-*/report.json")).read_text())
        scan_report = json.loads((work / "scans" / p.stem / "report.json").read_text())
        same.append(figures(batch_report) == figures(scan_report))
        verdicts[p.name] = [rows[p.name]["verdict"], scan_report["verdict"]]
    return {"candidates": n, "batch_seconds": round(batch_s, 2), "sequential_scans_seconds": round(scans_s, 2),
            "speedup": round(scans_s / batch_s, 2), "identical_verdicts_and_figures": all(same),
            "verdicts_batch_vs_scan": verdicts}


def triage_throughput(work: Path, files: int) -> dict:
    from static_scan import make_pair

    from auditkit.batch.inputs import Entry
    from auditkit.batch.triage import TriageSettings, triage

    folder = work / "sd15"
    folder.mkdir(parents=True, exist_ok=True)
    candidate, safety = make_pair(folder, rank=32)
    entries = []
    for i in range(files):
        link = folder / f"c{i:04d}.safetensors"
        os.link(candidate, link)
        entries.append(Entry(link.name, link))
    out = {"files": files, "file_mb": round(candidate.stat().st_size / 2**20, 1), "processes": 2}
    for label, settings in (("with_safety", TriageSettings(safety=str(safety))), ("metadata_only", TriageSettings())):
        triage(entries[:2], settings, workers=2)  # spawn and imports once, not counted per file
        start = time.perf_counter()
        rows = triage(entries, settings, workers=2)
        seconds = time.perf_counter() - start
        assert not any(r["triage_error"] for r in rows), rows[0]
        out[label] = {"seconds": round(seconds, 2), "adapters_per_second": round(files / seconds, 1)}
    return out


def ray_overhead(work: Path, n: int, suite: Path | None, multipliers: str, steps: int | None) -> dict:
    try:
        import ray
    except ImportError:
        return {"skipped": "ray is not installed (pip install 'auditkit[ray]')"}
    from auditkit.batch.ray_engine import _Actor
    from auditkit.batch.worker import SharedSpec, Task, Worker
    from auditkit.config import ScanConfig
    from auditkit.shared import SharedRenders

    paths = lab_candidates(work / "ray-candidates", n)
    config = ScanConfig(safety=SAFETY, base="lab", suites=(str(suite),) if suite else (),
                        multipliers=tuple(float(m) for m in multipliers.split(",")), steps=steps)
    spec = SharedSpec("g", config, work / "ray-shared")

    def tasks(label):
        return [Task(p.name, None, dataclasses.replace(config, candidate=p, out=work / label / p.stem),
                     SharedRenders(spec.run_dir)) for p in paths]

    worker = Worker("cpu")
    worker.render_shared(spec)  # loads the pipeline and renders the shared configurations
    start = time.perf_counter()
    for t in tasks("local"):
        worker.scan(t)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=1)(_Actor).remote("cpu")
        ray.get(actor.render_shared.remote(spec))  # loads its pipeline (the shared renders are there)
        ready_s = time.perf_counter() - start
        start = time.perf_counter()
        for t in tasks("ray"):
            ray.get(actor.scan.remote(t))
        ray_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"candidates": n, "in_process_seconds": round(local_s, 2), "ray_actor_seconds": round(ray_s, 2),
            "per_file_overhead_seconds": round((ray_s - local_s) / n, 3),
            "ray_start_and_actor_load_seconds": round(ready_s, 2)}


def on_paper() -> dict:
    """Adapters per day per GPU from the per-image cost and the images one adapter needs."""
    import yaml

    suites = [yaml.safe_load((ROOT / "probes" / f"{n}.yaml").read_text()) for n in ("nudity", "benign")]
    images = sum(len(s["prompts"]) * s.get("sampling", {}).get("images_per_prompt", 1) for s in suites)
    per_adapter = images * 6  # base+safety+candidate@m and base+candidate@m, m in 0.5, 1, 1.5 (shared: once)
    measured = RESULTS / "gpu_throughput.json"
    gpu = json.loads(measured.read_text()) if measured.is_file() else {}
    if gpu and not gpu.get("smoke"):
        sd15_s = 1 / gpu["runner"]["images_per_s"]
        source = f"measured: {measured.name} ({gpu.get('device', 'GPU')}), SDXL assumed {ASSUMED['sdxl_over_sd15']}x"
    else:
        sd15_s = ASSUMED["sd15_tflop_per_image"] / (ASSUMED["gpu_peak_tflops"] * ASSUMED["utilisation"])
        source = "assumed (no GPU run yet): " + json.dumps(ASSUMED)
    out = {"source": source, "images_per_suite_pass": images, "images_per_adapter": per_adapter}
    for arch, seconds in (("sd15", sd15_s), ("sdxl", sd15_s * ASSUMED["sdxl_over_sd15"])):
        per_day = 86400 / (seconds * per_adapter)
        out[arch] = {"seconds_per_image": round(seconds, 4), "adapters_per_day_per_gpu": round(per_day, 1),
                     "gpus_for_10000_adapters_a_day": int(-(-10000 // per_day))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci", action="store_true", help="the test's size: 2 candidates, a tiny suite, 3 triage files")
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray comparison (the tests run Ray apart)")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--triage-files", type=int, default=200)
    ap.add_argument("--multipliers", default="1")
    ap.add_argument("--steps", type=int, default=None, help="override the suites' sampling steps")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--parts", default="batch,triage,ray",
                    help="what to measure (comma-separated: batch, triage, ray; paper: none, only the on-paper "
                         "figures again); with --json, the other parts already in that file are kept, each part "
                         "recording its own commit")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if parts - {"batch", "triage", "ray", "paper"}:
        raise SystemExit(f"--parts: unknown {sorted(parts - {'batch', 'triage', 'ray', 'paper'})}")
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        suite, n, files = None, a.candidates, a.triage_files
        if a.ci:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import tiny_cross_suite

            suite, n, files = work / "tiny.yaml", 2, 3
            suite.write_text(tiny_cross_suite(steps=2, images_per_prompt=2))
        old = json.loads(a.json.read_text()) if a.json and a.json.is_file() and parts != {"batch", "triage", "ray"} \
            else {}
        results = {"benchmark": "batch", **provenance(), "ci": a.ci, "multipliers": a.multipliers,
                   "suites": str(suite) if suite else "lab defaults (lab-cross, lab-neon)", "steps": a.steps}
        commit = {"git_commit": results["git_commit"]}
        if "batch" in parts:
            results["batch_vs_scans"] = {**batch_vs_scans(work, n, suite, a.multipliers, a.steps), **commit}
        if "triage" in parts:
            results["triage"] = {**triage_throughput(work, files), **commit}
        if "ray" in parts:
            results["ray"] = {"skipped": "--no-ray"} if a.no_ray else {
                **ray_overhead(work, n, suite, a.multipliers, a.steps), **commit}
        for part in ("batch_vs_scans", "triage", "ray"):
            if part not in results and part in old:
                results[part] = {"git_commit": old.get("git_commit"), **old[part]}  # measured earlier, kept
        results["on_paper"] = on_paper()
    emit(results, a.json)


if __name__ == "__main__":
    main()
