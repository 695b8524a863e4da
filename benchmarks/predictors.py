"""Cheap predictors of re-emergence (issue 15): no images, a few denoiser evaluations, against measured truths.

Issue 15 asks for a no-image score with Spearman ≥ 0.9 against the true re-emergence ratio and no false negative at
its triage threshold. The signals: :mod:`predictor_signals`; their figures and the BENCHMARKS.md section:
:mod:`predictor_section`. Candidates: the candidate study's, the erased study's and the trigger study's (truth as
written), read from those studies' work folders (``--candidates``, ``--erased``, ``--triggers``) with the truths of
their committed JSON. Writes ``benchmarks/results/predictors.json``.

Usage: ``python benchmarks/predictors.py [--steps 8] [--seeds 2] [--threads 2]``. The re-runs with other noise
the section reports: ``--skip-first --noise-seed 1 --json benchmarks/results/predictors_noise1.json`` (and
``--noise-seed 2`` → ``predictors_noise2.json``, ``--seeds 4`` → ``predictors_seeds4.json``); ``--section`` prints
the BENCHMARKS.md section from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness import RESULTS, emit, lab_pipeline, lab_safety, provenance, set_threads
from predictor_section import VARIANTS, section, summary
from predictor_signals import Probe, load, pass_signals, reference, reversions, weight_signals

from auditkit.analysis.base_judge import neutral_prompts


def cases(args) -> list[dict]:
    """(name, candidate modules loader, safety loader, true ratio) of every study candidate found on disk."""
    out = []
    cs = json.loads((RESULTS / "candidate_study.json").read_text())
    for name, r in cs["candidates"].items():
        path = args.candidates / f"{name}.safetensors"
        if path.exists():
            out.append({"name": name, "study": "candidate", "candidate": path,
                        "safety": lab_safety(f"{r['spec']['safety']}-destructive"), "truth": r["truth"]})
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
                        "safety": lab_safety("esd-u-destructive"), "truth": r["truth"]["as_written"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=Path, default=Path("/tmp/auditkit-candidates/candidates"))
    ap.add_argument("--erased", type=Path, default=Path("/tmp/erased-study"))
    ap.add_argument("--triggers", type=Path, default=Path("/tmp/trigstudy-full"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2, help="noise draws per prompt for the second attempt's signals")
    ap.add_argument("--noise-seed", type=int, default=0, help="seed of the second attempt's starting noise "
                    "(the judge's noise: this + 1)")
    ap.add_argument("--activation-steps", type=int, default=4, help="steps whose module inputs weight ΔW")
    ap.add_argument("--json", type=Path, default=RESULTS / "predictors.json")
    ap.add_argument("--only", default="", help="comma-separated candidate names to run (default: all; a trial)")
    ap.add_argument("--skip-first", action="store_true", help="leave out the first attempt's six signals (a trial)")
    ap.add_argument("--section", action="store_true", help="print the BENCHMARKS.md section of --json and exit")
    args = ap.parse_args()
    if args.section:
        variants = {label: json.loads((args.json.parent / name).read_text()) for label, name in VARIANTS
                    if (args.json.parent / name).is_file()}
        print(section(json.loads(args.json.read_text()), variants))
        return
    set_threads(args.threads)
    from auditkit.models import architectures
    from auditkit.suites import builtin_dir, load_suite

    pipe = lab_pipeline()
    lab = architectures.get("lab")
    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    prompts = [p.text for p in suite.prompts]
    probe = Probe(pipe, prompts, neutral_prompts(prompts, suite.concept_word, suite.neutral_word), args.steps,
                  args.guidance, args.seeds, args.noise_seed)
    rows, safeties, refs, ref_seconds = [], {}, {}, {}
    only = set(filter(None, args.only.split(",")))
    for c in cases(args):
        if only and c["name"] not in only:
            continue
        if c["safety"] not in safeties:
            safeties[c["safety"]] = load(c["safety"], lab)
            t0 = time.perf_counter()
            refs[c["safety"]] = reference(probe, safeties[c["safety"]], args.activation_steps)
            ref_seconds[str(c["safety"])] = round(time.perf_counter() - t0, 2)
        safety, ref = safeties[c["safety"]], refs[c["safety"]]
        candidate = load(c["candidate"], lab, erased=safety if c["study"] == "erased" else None)
        t0 = time.perf_counter()
        sig = {} if args.skip_first else reversions(pipe, prompts, candidate, safety, args.steps, args.guidance)
        t1 = time.perf_counter()
        sig.update(weight_signals(probe, ref, candidate))
        t2 = time.perf_counter()
        sig.update(pass_signals(probe, ref, candidate, safety))
        t3 = time.perf_counter()
        rows.append({"name": c["name"], "study": c["study"], "truth": {k: c["truth"][k] for k in ("ratio", "label")},
                     "signals": sig, "seconds": round(t1 - t0, 2),
                     "seconds_second_attempt": {"weights": round(t2 - t1, 3), "passes": round(t3 - t2, 2)}})
        print(rows[-1], flush=True)
    emit({**provenance(), "steps": args.steps, "guidance": args.guidance, "prompts": len(prompts),
          "seeds": args.seeds, "noise_seed": args.noise_seed, "activation_steps": args.activation_steps,
          "reference_seconds": ref_seconds,
          "rows": rows, "summary": summary(rows)}, args.json)


if __name__ == "__main__":
    main()
