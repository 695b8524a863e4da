"""The BENCHMARKS.md section of ``benchmarks/predictors.py``, every figure read from its JSON: each signal's
Spearman with the true ratio and its false positives at the threshold that misses no re-emerging candidate."""

from __future__ import annotations

import json

import numpy as np
from harness import RESULTS
from predictor_signals import JUDGE_LEVELS, LABELS, NEW_SIGNALS, SIGNALS


def summary(rows: list[dict]) -> dict:
    from scipy.stats import spearmanr

    truth = np.array([r["truth"]["ratio"] for r in rows])
    reemerges = np.array([r["truth"]["label"] == "re-emerges" for r in rows])
    out = {}
    for s in (s for s in SIGNALS if s in rows[0]["signals"]):
        v = np.array([r["signals"][s] for r in rows])
        thr = float(v[reemerges].min()) if reemerges.any() else None  # the highest threshold missing none
        flagged = (v >= thr) & ~reemerges if thr is not None else np.zeros_like(reemerges)
        out[s] = {"spearman": float(spearmanr(v, truth).statistic),
                  "spearman_reemerging": float(spearmanr(v[reemerges], truth[reemerges]).statistic),
                  "threshold_no_fn": thr,
                  "fp_at_that_threshold": int(flagged.sum()) if thr is not None else None,
                  "false_positives": [r["name"] for r, f in zip(rows, flagged, strict=True) if f],
                  "safe_candidates": int((~reemerges).sum()), "reemerging": int(reemerges.sum())}
    return out


VARIANTS = (("noise seed 1", "predictors_noise1.json"), ("noise seed 2", "predictors_noise2.json"),
            ("4 draws per prompt", "predictors_seeds4.json"))  # re-runs of the second attempt (--skip-first)


def section(res: dict, variants: dict[str, dict] | None = None) -> str:
    """The BENCHMARKS.md section of a predictors.json (every figure read from it, and from the re-runs in
    ``variants``: label -> their JSON)."""
    variants = variants or {}
    rows, summ = res["rows"], res["summary"]
    study = json.loads((RESULTS / "candidate_study.json").read_text())
    scans = [c["scan"]["seconds"] for c in study["candidates"].values()]
    n_re, n_safe = summ["cond"]["reemerging"], summ["cond"]["safe_candidates"]
    old = [r["seconds"] for r in rows]
    new = [r["seconds_second_attempt"]["weights"] + r["seconds_second_attempt"]["passes"] for r in rows]
    weights = [r["seconds_second_attempt"]["weights"] for r in rows]
    refs = list(res["reference_seconds"].values())
    by = {r["name"]: r["signals"] for r in rows}
    truth = {r["name"]: r["truth"]["ratio"] for r in rows}
    goal = [s for s in SIGNALS if summ[s]["spearman"] >= 0.9]
    best = max(SIGNALS, key=lambda s: summ[s]["spearman"])
    others = [s for s in SIGNALS if not s.startswith("base_judge")]
    best_other = max(others, key=lambda s: summ[s]["spearman"])

    def f2(v: float) -> str:
        return f"{0.0 if abs(v) < 0.005 else v:.2f}"

    def span(values):
        return f"{f2(min(values))}–{f2(max(values))}"

    lines = [
        "## A cheap predictor of re-emergence (issue 15, CPU)",
        "",
        "Command: `.venv/bin/python benchmarks/predictors.py --threads 1` (results: "
        "`benchmarks/results/predictors.json`, "
        f"git commit {res['git_commit'][:12]} recorded there; re-runs of the second attempt with other noise: "
        "`--skip-first --noise-seed 1` / `--noise-seed 2` / `--seeds 4`, in `predictors_noise1.json`, "
        "`predictors_noise2.json`, `predictors_seeds4.json`; this section is printed from the JSON by "
        "`benchmarks/predictors.py --section`). Candidates: those of the candidate, erased-model and trigger studies, "
        f"read from their work folders, with the truths of their committed JSON: {len(rows)} candidates, {n_re} "
        f"re-emerging and {n_safe} safe (the trigger study's truth as written). No image is decoded, no detector runs; "
        "adapters are composed exactly.",
        "",
        "First attempt: the reverted fraction −⟨Δ_cand, Δ_safe⟩/‖Δ_safe‖² of the safety module's change "
        f"to one denoiser quantity, on the {res['prompts']} `lab-cross` prompts along {res['steps']} steps "
        "of the safe model's trajectory. Second attempt, at the points of the safe model's guided "
        f"trajectory on the concept prompts ({res['seeds']} noise draws per prompt): the same fraction for "
        "each weight update's output change on the inputs each module the safety module changes reads "
        f"while the safe model denoises the concept prompts ({res['activation_steps']} of the steps; "
        "−Σ⟨ΔW_c X, ΔW_s X⟩/Σ‖ΔW_s X‖², energy-weighted over the modules, all and per UNet block; a "
        "module the candidate does not change adds to the denominator only); concept-specific signals "
        "with the suite's neutral word (`square` for `cross`): the reversion on the concept prompts minus "
        "that on the neutral prompts, and the reverted fraction of the concept − neutral difference of "
        "the conditional prediction (difference of differences: the vector, and its projection on the "
        "base's difference), of the output and of each UNet block's output; the reversion of each block's "
        "output; the final latent of each model's own guided trajectory (reverted fraction, and the "
        "fraction of samples nearer the base's final latent than the safe model's); and the base as a "
        "zero-shot judge of those final latents: Σ over noise levels "
        f"{', '.join(str(t) for t in JUDGE_LEVELS)} of ‖ε − ε_base(z_t, neutral prompt)‖² − ‖ε − "
        "ε_base(z_t, concept prompt)‖² (a diffusion classifier, fixed noise), as (cand − safe)/(base − "
        "safe) of its mean (`base_judge`) and of the fraction of latents scored above the midpoint of the "
        "base's and the safe model's means (`base_judge_ratio`). The judge's levels and cut were fixed "
        "before any result was seen.",
        "",
        "Cost (1 thread, on a machine shared with other work, so timings vary with its load): the first attempt's six "
        "signals "
        f"{min(old):.1f}–{max(old):.1f} s per candidate; the second attempt's {len(NEW_SIGNALS)} signals "
        f"{min(new):.1f}–{max(new):.1f} s per candidate (of which the weight × activation signals "
        f"{min(weights):.2f}–{max(weights):.2f} s), after a reference computed once per safety module "
        f"({min(refs):.1f}–{max(refs):.1f} s: the safe model's trajectory, the base's and the safe model's predictions "
        "and module inputs there, both models' own trajectories and judge scores). A dynamic scan of a "
        f"candidate-study candidate takes {min(scans):.0f}–{max(scans):.0f} s: the second attempt costs "
        f"{100 * max(new) / min(scans):.1f}% of the fastest scan at most, "
        f"{100 * (max(new) + max(refs)) / min(scans):.1f}% with a whole reference charged to one candidate "
        "(goal ≤ 5%).",
        "",
        "| signal | Spearman with the true ratio | among the re-emerging | highest threshold with no false negative | "
        "false positives there |",
        "|---|---|---|---|---|",
    ]
    for s in SIGNALS:
        m = summ[s]
        fps = ", ".join(f"`{n}`" for n in m["false_positives"])
        fp = f"{m['fp_at_that_threshold']} of {n_safe}" + (f": {fps}" if fps else "")
        lines.append(f"| {LABELS[s]} (`{s}`) | {f2(m['spearman'])} | {f2(m['spearman_reemerging'])} | "
                     f"{f2(m['threshold_no_fn'])} | {fp} |")
    if variants:
        first = next(iter(variants.values()))
        lines += ["", f"The second attempt's signals re-run with other noise on the {len(first['rows'])} candidates of "
                  "the first run (Spearman with the true ratio; false positives at the no-false-negative threshold; "
                  "the first column is this run, on all candidates):", "",
                  "| signal | " + " | ".join(["noise seed 0 (above)", *variants]) + " |",
                  "|---|" + "---|" * (1 + len(variants))]
        for s in NEW_SIGNALS:
            cells = [f"{r['summary'][s]['spearman']:.2f}, {r['summary'][s]['fp_at_that_threshold']} FP"
                     for r in (res, *variants.values())]
            lines.append(f"| `{s}` | " + " | ".join(cells) + " |")
    pair = ("x-ontop-neon-r8", "x-ontop-concept-r8")
    runs = [res, *variants.values()]
    seen = {x["name"] for v in variants.values() for x in v["rows"]}

    def held_out_lines() -> list[str]:
        """The candidates added after the judge's levels and cut were fixed and first measured (those not in the
        re-runs), judged with the threshold the earlier runs set: what a held-out check says."""
        held = [r for r in rows if r["name"] not in seen]
        if not seen or len(held) < 3:
            return ["- The judge was designed and tested on the same set (no held-out candidates)."]
        out = []
        for sig in ("base_judge", "base_judge_ratio"):
            thr = min(v["summary"][sig]["threshold_no_fn"] for v in variants.values())
            rho = float(spearmanr([r["signals"][sig] for r in held], [r["truth"]["ratio"] for r in held]).statistic)
            fn = [r["name"] for r in held if r["truth"]["label"] == "re-emerges" and r["signals"][sig] < thr]
            fp = [r["name"] for r in held if r["truth"]["label"] != "re-emerges" and r["signals"][sig] >= thr]
            n_re_h = sum(r["truth"]["label"] == "re-emerges" for r in held)
            out.append(f"`{sig}` Spearman {f2(rho)} on them; at the threshold the earlier runs set ({f2(thr)}) it "
                       f"misses {len(fn)} of their {n_re_h} re-emerging candidates"
                       + (f" ({', '.join(f'`{n}`' for n in fn)})" if fn else "")
                       + f" and flags {len(fp)} of their {len(held) - n_re_h} that do not (safe or borderline)"
                       + (f" ({', '.join(f'`{n}`' for n in fp)})" if fp else ""))
        return [f"- **Held out**: {len(held)} candidates were added to the studies after the judge was fixed and first "
                f"measured on the other {len(seen)} (seeds, near-threshold, benign ESD-x, text-encoder-only): "
                + "; ".join(out) + "."]
    steady = [s for s in NEW_SIGNALS if all(r["summary"][s]["spearman"] >= 0.9 for r in runs)]

    def ispan(counts):
        return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"

    def fp_of(signal):
        return ispan([r["summary"][signal]["fp_at_that_threshold"] for r in runs])

    def fixed(signal):
        """One threshold for every run: the lowest re-emerging value over the runs, and what it flags."""
        thr = min(r["summary"][signal]["threshold_no_fn"] for r in runs)
        flagged = [sorted(x["name"] for x in r["rows"] if x["truth"]["label"] != "re-emerges"
                          and x["signals"][signal] >= thr) for r in runs]
        names = sorted({n for f in flagged for n in f})
        return (f"One threshold for all runs on `{signal}` ({f2(thr)}, the lowest re-emerging value of any run) "
                f"misses no re-emerging candidate in any run and flags {ispan([len(f) for f in flagged])} of {n_safe} "
                "safe ones"
                + (f" ({', '.join(f'`{n}`' for n in names)})." if names else "."))

    def margins(signal):
        """Per run: the lowest re-emerging candidate's value and the two highest safe candidates' (value, name)."""
        out = []
        for label, r in zip(["noise seed 0 (above)", *variants], runs, strict=True):
            re_ = sorted((x["signals"][signal], x["name"]) for x in r["rows"] if x["truth"]["label"] == "re-emerges")
            safe_ = sorted(((x["signals"][signal], x["name"]) for x in r["rows"]
                            if x["truth"]["label"] != "re-emerges"), reverse=True)
            out.append(f"| `{signal}` | {label} | {f2(re_[0][0])} (`{re_[0][1]}`) | {f2(safe_[0][0])} "
                       f"(`{safe_[0][1]}`) | {f2(safe_[1][0])} (`{safe_[1][1]}`) |")
        return out
    crosskv = "u-ontop-neon-crosskv"
    from scipy.stats import spearmanr

    in_study = [n for n in study["candidates"] if n in by]
    study_truth = [study["candidates"][n]["truth"]["ratio"] for n in in_study]
    scan_rho = float(spearmanr([study["candidates"][n]["scan"]["dynamic_ratio"] for n in in_study],
                               study_truth).statistic)
    judge_rho = float(spearmanr([by[n]["base_judge"] for n in in_study], study_truth).statistic)
    setter = min((r["signals"][best_other], r["name"]) for r in rows if r["truth"]["label"] == "re-emerges")[1]
    ontop = [n for n in by if "ontop" in n and n.startswith(("u-", "x-"))]
    cmn = {n: by[n]["concept_minus_neutral"] for n in ontop}
    lines += [
        "",
        f"The ESD-x pair (`{pair[0]}`, true ratio {truth[pair[0]]:.2f}, and `{pair[1]}`, {truth[pair[1]]:.2f}): "
        + "; ".join(f"`{s}` {f2(by[pair[0]][s])} vs {f2(by[pair[1]][s])}" for s in SIGNALS) + ".",
        "",
        "What this says:",
        "- " + (f"**The goal is met on this candidate set, narrowly.** In this run {', '.join(f'`{s}`' for s in goal)} "
                f"reach Spearman ≥ 0.9 with no false negative: `base_judge` {f2(summ['base_judge']['spearman'])} "
                f"({f2(summ['base_judge']['spearman'] - 0.9)} above the bar), "
                f"{summ['base_judge']['fp_at_that_threshold']} of {n_safe} false positives at its no-false-negative "
                f"threshold {f2(summ['base_judge']['threshold_no_fn'])}. "
                + (f"Spearman ≥ 0.9 in all {len(runs)} runs: {', '.join(f'`{s}`' for s in steady) or 'no signal'} "
                   "(" + "; ".join(f"`{s}` {span([r['summary'][s]['spearman'] for r in runs])}, "
                                   f"{fp_of(s)} false positives at each run's own no-false-negative threshold"
                                   for s in goal) + "). "
                   + " ".join(fixed(s) for s in goal)
                   if variants else "")
                if goal else
                f"**No signal meets the goal** (Spearman ≥ 0.9): the best is `{best}` at "
                f"{f2(summ[best]['spearman'])}, {f2(0.9 - summ[best]['spearman'])} short."),
        "- What meets it is not a property of the weights: the base judge samples each candidate's own guided "
        f"trajectory ({res['steps']} steps, {res['prompts'] * res['seeds']} latents) and asks the base model whether "
        "the results look like the concept or its neutral counterpart. It is a miniature dynamic scan whose detector "
        "is the base itself, in latent space; it needs a neutral word for the concept (the suites have one) and a "
        "base that draws the concept. It separates the ESD-x pair "
        f"({by[pair[0]]['base_judge']:.2f} vs {by[pair[1]]['base_judge']:.2f}) because it looks at what the "
        "candidate draws, where every reversion signal looks at how far it moved back.",
        "- How far apart the re-emerging and the safe candidates lie on the judge, run by run (a triage needs one "
        "threshold fixed in advance; `trigger/neon-ontop` is safe as written but re-emerges with its trigger):",
        "",
        "| signal | run | lowest re-emerging | highest safe | next highest safe |",
        "|---|---|---|---|---|",
        *[line for sig in ("base_judge", "base_judge_ratio") for line in margins(sig)],
        "",
        f"- For scale, on the {len(in_study)} candidates of the candidate study: the dynamic scan's own ratio "
        f"({min(scans):.0f}–{max(scans):.0f} s each) has Spearman {f2(scan_rho)} with the true ratio, `base_judge` "
        f"{f2(judge_rho)}.",
        f"- The best signal that does not judge is `{best_other}` ({summ[best_other]['spearman']:.2f}, "
        f"{summ[best_other]['fp_at_that_threshold']} of {n_safe} false positives: "
        f"{', '.join(f'`{n}`' for n in summ[best_other]['false_positives'])}; its threshold is set by "
        f"`{setter}`, true ratio {f2(truth[setter])}). `block_down` and `block_mid` separate the ESD-x pair the right "
        f"way ({f2(by[pair[0]]['block_down'])} vs {f2(by[pair[1]]['block_down'])}, {f2(by[pair[0]]['block_mid'])} vs "
        f"{f2(by[pair[1]]['block_mid'])}) but the ESD-x neon candidate still lies above their no-false-negative "
        f"thresholds ({f2(summ['block_down']['threshold_no_fn'])}, {f2(summ['block_mid']['threshold_no_fn'])}), set "
        "by weakly re-emerging ESD-u candidates. "
        "Every reversion signal, per block, "
        "concept-specific or at the trajectory's end, still calls the ESD-x neon candidate reverted: "
        f"`dod` {f2(by[pair[0]]['dod'])} vs {f2(by[pair[1]]['dod'])}, `endpoint` {f2(by[pair[0]]['endpoint'])} vs "
        f"{f2(by[pair[1]]['endpoint'])}. Subtracting the neutral prompts' reversion "
        f"(`concept_minus_neutral`, {summ['concept_minus_neutral']['spearman']:.2f}) removes the signal with the "
        "collateral damage: every on-top candidate of the candidate study scores between "
        f"{f2(min(cmn.values()))} and {f2(max(cmn.values()))}, whether its images show the concept or not.",
        "- The weight × activation signals fail for a structural reason: a candidate that changes modules the safety "
        f"module leaves alone cancels nothing in weight space (`{crosskv}`, cross-attention keys/values over ESD-u: "
        f"`weights` {f2(by[crosskv]['weights'])}, true ratio {truth[crosskv]:.2f}), so the no-false-negative "
        f"threshold falls to {f2(summ['weights']['threshold_no_fn'])} and flags "
        f"{summ['weights']['fp_at_that_threshold']} of {n_safe} safe candidates. On the ESD-x pair they point the "
        f"{'wrong' if by[pair[0]]['weights'] >= by[pair[1]]['weights'] else 'right'} way "
        f"({f2(by[pair[0]]['weights'])} vs {f2(by[pair[1]]['weights'])}).",
        *held_out_lines(),
        f"- Limits: {len(rows)} candidates from one lab model, {n_safe} of them safe with near-tied truths (which "
        "caps Spearman); no SD-scale check.",
    ]
    import textwrap

    def wrap(line: str) -> str:
        if line.startswith("|") or len(line) <= 115:
            return line
        return textwrap.fill(line, 115, subsequent_indent="  " if line.startswith("- ") else "",
                             break_long_words=False, break_on_hyphens=False)

    return "\n".join(wrap(line) for line in lines) + "\n"
