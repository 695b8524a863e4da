"""Cheap predictors of re-emergence: no images, a few denoiser evaluations, against measured truths.

Issue 15 asks for a no-image score with Spearman ≥ 0.9 against the true re-emergence ratio and no false
negative at its triage threshold. The scan's noise-prediction reversion (conditional prediction along the
safe model's conditional trajectory) reached 0.78 on the candidate study and called an ESD-x candidate
whose concept stays suppressed 0.54 reverted. Images are sampled with classifier-free guidance, so the
concept comes from the *guided* prediction ε_u + g·(ε_c − ε_u), along the *guided* trajectory. Signals, each
the reverted fraction −⟨Δ_cand, Δ_safe⟩/‖Δ_safe‖² of the safety module's change to one quantity:

* ``cond``: the conditional prediction ε_c along the conditional trajectory (the scan's signal);
* ``cond_guided_path``: ε_c along the guided trajectory;
* ``guided``: the guided prediction ε_u + g(ε_c − ε_u) along the guided trajectory (g = the suites' 5);
* ``direction``: the guidance direction ε_c − ε_u along the guided trajectory;
* ``direction_late`` / ``direction_early``: the same over the second / first half of the steps.

Candidates: the candidate study's 12 (safety LoRAs ESD-u, ESD-x), the erased study's 6 (erased models), the
trigger study's 4 (truth as written); their truths from the committed results JSON; the candidates are read from
the studies' work folders (``--candidates``, ``--erased``, ``--triggers``), made by those studies' commands.
Reports each signal's Spearman with the true ratio, and false negatives / positives at the threshold that
misses no re-emerging candidate. Writes ``benchmarks/results/predictors.json``.

Usage: ``python benchmarks/predictors.py [--steps 8] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from record import emit, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = ROOT / "auditkit" / "lab" / "assets" / "adapters"
SIGNALS = ("cond", "cond_guided_path", "guided", "direction", "direction_early", "direction_late")


def reversions(pipe, prompts, candidate, safety, steps: int, guidance: float, seed: int = 0) -> dict[str, float]:
    """Every signal of the module docstring for one candidate (adapters composed exactly)."""
    import torch

    from auditkit.models.conditioning import encode
    from auditkit.models.denoising import denoiser_for
    from auditkit.train.lora import composed

    den = denoiser_for(pipe)
    model, comp = den.model, den.component
    sampler = den.sampler(steps)
    text, neg = encode(pipe, prompts), encode(pipe, [""] * len(prompts))
    gen = torch.Generator().manual_seed(seed)
    x0 = den.noise(len(prompts), gen) * sampler.init_noise_sigma

    def run(path_guided: bool):
        """Points of the safe model's trajectory (guided or conditional) and (ε_c, ε_u) there per model."""
        x, points = x0.clone(), []
        with composed(model, (safety, 1.0), component=comp):
            for k, t in enumerate(sampler.timesteps):
                points.append((x, t))
                ec, eu = den.predict(x, t, text), den.predict(x, t, neg)
                eps = eu + guidance * (ec - eu) if path_guided else ec
                x = sampler.step(eps, k, x)
        out = {}
        for label, adapters in (("base", ()), ("safe", ((safety, 1.0),)), ("cand", ((safety, 1.0), (candidate, 1.0)))):
            with composed(model, *adapters, component=comp):
                out[label] = [(den.predict(x, t, text).double(), den.predict(x, t, neg).double()) for x, t in points]
        return out

    def frac(get, preds, ks):
        inner = energy = 0.0
        for k in ks:
            b, s, c = get(preds["base"][k]), get(preds["safe"][k]), get(preds["cand"][k])
            d_s, d_c = s - b, c - s
            inner += float((d_c * d_s).sum())
            energy += float((d_s * d_s).sum())
        return -inner / energy if energy > 0 else 0.0

    with torch.no_grad():
        cond_path, guided_path = run(False), run(True)
    all_k, half = range(steps), steps // 2

    def cond(p):
        return p[0]

    def guided(p):
        return p[1] + guidance * (p[0] - p[1])

    def direction(p):
        return p[0] - p[1]

    return {"cond": frac(cond, cond_path, all_k), "cond_guided_path": frac(cond, guided_path, all_k),
            "guided": frac(guided, guided_path, all_k), "direction": frac(direction, guided_path, all_k),
            "direction_early": frac(direction, guided_path, range(half)),
            "direction_late": frac(direction, guided_path, range(half, steps))}


def cases(args) -> list[dict]:
    """(name, candidate modules loader, safety loader, true ratio) of every study candidate found on disk."""
    out = []
    cs = json.loads((RESULTS / "candidate_study.json").read_text())
    for name, r in cs["candidates"].items():
        path = args.candidates / f"{name}.safetensors"
        if path.exists():
            out.append({"name": name, "study": "candidate", "candidate": path,
                        "safety": ASSETS / f"safety-{r['spec']['safety']}.safetensors", "truth": r["truth"]})
    es = json.loads((RESULTS / "erased_study.json").read_text())
    for ename, e in es["erased"].items():
        for cname, r in e["candidates"].items():
            file = cname if r["spec"]["mode"] == "full" else f"{cname}.safetensors"
            path = args.erased / "candidates" / ename / file
            if path.exists():
                out.append({"name": f"{ename}/{cname}", "study": "erased", "candidate": path,
                            "safety": args.erased / "erased" / ename / "unet", "truth": r["truth"]})
    ts = json.loads((RESULTS / "trigger_study.json").read_text())
    for name, r in ts["candidates"].items():
        path = args.triggers / "candidates" / f"{name}.safetensors"
        if path.exists():
            out.append({"name": f"trigger/{name}", "study": "trigger", "candidate": path,
                        "safety": ASSETS / "safety-esd-u.safetensors", "truth": r["truth"]["as_written"]})
    return out


def load(path: Path, lab, erased=None):
    """Exact updates: an adapter's modules, or a full model's differences (a fine-tune's to the erased model)."""
    from auditkit.inputs import kind_of
    from auditkit.lora.adapter import read_adapter
    from auditkit.models.difference import TensorDeltas, read_full_model

    if kind_of(path) == "adapter":
        return read_adapter(path, arch="lab").modules
    deltas = read_full_model(path, "lab", lab, energy=1.0).exact()
    if erased is None:
        return deltas
    return TensorDeltas({k: d for k, v in deltas.items() if (d := v - erased.get(k, 0)).any()})


def summary(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    truth = np.array([r["truth"]["ratio"] for r in rows])
    reemerges = np.array([r["truth"]["label"] == "re-emerges" for r in rows])
    out = {}
    for s in SIGNALS:
        v = np.array([r["signals"][s] for r in rows])
        thr = float(v[reemerges].min()) if reemerges.any() else None  # the highest threshold missing none
        fp = int(((v >= thr) & ~reemerges).sum()) if thr is not None else None
        out[s] = {"spearman": float(spearmanr(v, truth).statistic), "threshold_no_fn": thr, "fp_at_that_threshold": fp,
                  "safe_candidates": int((~reemerges).sum()), "reemerging": int(reemerges.sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=Path, default=Path("/tmp/auditkit-candidates/candidates"))
    ap.add_argument("--erased", type=Path, default=Path("/tmp/erased-study"))
    ap.add_argument("--triggers", type=Path, default=Path("/tmp/trigstudy-full"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "predictors.json")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from auditkit.lab.model import load_lab_pipeline
    from auditkit.models import architectures
    from auditkit.suites import builtin_dir, load_suite

    pipe = load_lab_pipeline()
    lab = architectures.get("lab")
    prompts = [p.text for p in load_suite(builtin_dir() / "lab-cross.yaml").prompts]
    rows, safeties = [], {}
    for c in cases(args):
        if c["safety"] not in safeties:
            safeties[c["safety"]] = load(c["safety"], lab)
        safety = safeties[c["safety"]]
        candidate = load(c["candidate"], lab, erased=safety if c["study"] == "erased" else None)
        t0 = time.perf_counter()
        sig = reversions(pipe, prompts, candidate, safety, args.steps, args.guidance)
        rows.append({"name": c["name"], "study": c["study"], "truth": {k: c["truth"][k] for k in ("ratio", "label")},
                     "signals": sig, "seconds": round(time.perf_counter() - t0, 2)})
        print(rows[-1], flush=True)
    emit({**provenance(), "steps": args.steps, "guidance": args.guidance, "prompts": len(prompts),
          "rows": rows, "summary": summary(rows)}, args.json)


if __name__ == "__main__":
    main()
