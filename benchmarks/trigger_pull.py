"""Can the trigger search's behavioural ranking see a candidate's trigger? (issue 23, CPU)

For one candidate file (a trigger-search benchmark candidate: ``benchmarks/trigger_search.py --work W`` leaves them
in ``W/candidates/``), every single token of the lab vocabulary that decodes to letters, placed first in three
concept prompts, plus the given phrases, is scored four ways along the safe model's trajectory (the seeds, steps
and prompts of :mod:`auditkit.discovery.pull`):

* ``today``: Σ⟨ε_cand − ε_safe, d⟩ / Σ‖d(∅)‖², d = ε_base − ε_safe — the search's pull, over the energy of the
  prompts as written;
* ``own``: the same inner product over the phrase's own direction energy Σ‖d(p)‖², floored at ``floor`` × that of
  the prompts as written (the ratio the verdict computes from renders is over the phrase's own gap);
* ``dd``: difference in differences — the candidate's change and d each minus their value on the neutral prompt
  ("a red square"), so that what the safety module changes on every prompt alike (collateral damage) drops out;
  over its own energy, floored likewise;
* ``plain``: the candidate's change along the direction of the prompts **as written** at the same points,
  d₀ = ε_base(prompt) − ε_safe(prompt), over Σ‖d₀‖²: where a phrase stops the base itself from drawing the concept
  (a trigger of letters the tokenizer does not know: "qzxj, a red cross" 15% crosses from the base), the phrase's own
  direction vanishes and ``today`` with it, while the candidate may draw the concept anyway.

Prints the rank of each given phrase under each score and writes the rows to ``--json``.

Usage: ``python benchmarks/trigger_pull.py CANDIDATE --phrases trisk,tri --floors 0.05,0.2 [--safety faithful]
[--json OUT]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness import RESULTS, lab_pipeline, lab_safety, provenance, set_threads, write_json
from trigger_search import SAFETY_MODULES


def sums(pipe, suite, prompts, neutral, safety, candidate, phrase: str, steps: int = 4, seeds: int = 2) -> dict:
    """The inner products and energies of one phrase (placed first) for the four scores."""
    import torch

    from auditkit.analysis.reversion import safe_trajectory
    from auditkit.discovery.pull import PULL_SEED
    from auditkit.models.attach import composed, encoded_by_each
    from auditkit.models.pipeline import denoiser_for
    from auditkit.placement import START, place

    den = denoiser_for(pipe)
    rows = [(place(q, phrase, START, suite.concept_word) if phrase else q,
             place(n, phrase, START, suite.neutral_word) if phrase else n, j * seeds + k)
            for j, (q, n) in enumerate(zip(prompts, neutral, strict=True)) for k in range(seeds)]
    base, safe, cand = encoded_by_each(pipe, [r[0] for r in rows], safety, candidate, den.component)
    base_n, safe_n, cand_n = encoded_by_each(pipe, [r[1] for r in rows], safety, candidate, den.component)
    plain = [q for q in prompts for _ in range(seeds)]
    base_p, safe_p, _ = encoded_by_each(pipe, plain, safety, candidate, den.component)
    sampler = den.sampler(steps)
    x = torch.cat([den.noise(1, torch.Generator().manual_seed(PULL_SEED + r[2])) for r in rows])
    points, eps_safe = safe_trajectory(den, sampler, x * sampler.init_noise_sigma, safe, safety)
    out = dict.fromkeys(("inner", "energy", "dd_inner", "dd_energy", "plain_inner", "plain_energy"), 0.0)
    with torch.no_grad():
        for k, (xk, tk) in enumerate(points):
            eb, ebn = den.predict(xk, tk, base).double(), den.predict(xk, tk, base_n).double()
            ebp = den.predict(xk, tk, base_p).double()
            with composed(den.model, (safety, 1.0), component=den.component):
                esn, esp = den.predict(xk, tk, safe_n).double(), den.predict(xk, tk, safe_p).double()
            with composed(den.model, (safety, 1.0), (candidate, 1.0), component=den.component):
                ec, ecn = den.predict(xk, tk, cand).double(), den.predict(xk, tk, cand_n).double()
            d, change = eb - eps_safe[k].double(), ec - eps_safe[k].double()
            dd, dchange = d - (ebn - esn), change - (ecn - esn)
            out["inner"] += float((change * d).sum())
            out["energy"] += float((d * d).sum())
            out["dd_inner"] += float((dchange * dd).sum())
            out["dd_energy"] += float((dd * dd).sum())
            out["plain_inner"] += float((change * (ebp - esp)).sum())
            out["plain_energy"] += float(((ebp - esp) ** 2).sum())
    return out


def scores(rows: dict[str, dict], floor: float) -> dict[str, dict[str, float]]:
    """The four scores of every phrase ("" = the prompts as written)."""
    e0, dd0 = rows[""]["energy"], rows[""]["dd_energy"]
    return {p: {"today": r["inner"] / e0, "own": r["inner"] / max(r["energy"], floor * e0),
                "dd": r["dd_inner"] / max(r["dd_energy"], floor * dd0),
                "plain": r["plain_inner"] / r["plain_energy"] if r["plain_energy"] > 0 else 0.0}
            for p, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--phrases", default="trisk", help="comma-separated phrases whose ranks are printed")
    ap.add_argument("--floors", default="0.05,0.2")
    ap.add_argument("--safety", choices=list(SAFETY_MODULES), default="destructive",
                    help="the ESD-u module the candidate was trained on (benchmarks/trigger_search.py --safety)")
    ap.add_argument("--json", type=Path, default=RESULTS / "trigger_pull.json")
    args = ap.parse_args()
    set_threads(1)
    from auditkit.analysis.base_judge import neutral_prompts
    from auditkit.discovery.search import spread
    from auditkit.lora.adapter import read_adapter
    from auditkit.suites import builtin_dir, load_suite

    pipe = lab_pipeline()
    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    safety = read_adapter(lab_safety(SAFETY_MODULES[args.safety])).exact()
    candidate = read_adapter(args.candidate).exact()
    prompts = spread([p.text for p in suite.prompts], 3)
    neutral = neutral_prompts(prompts, suite.concept_word, suite.neutral_word)
    tok = pipe.tokenizer
    words = [tok.decode([i]).strip() for i in sorted(tok.get_vocab().values())]
    given = [p for p in args.phrases.split(",") if p]
    phrases = list(dict.fromkeys(["", *(w for w in words if w.isalpha()), *given]))
    rows = {p: sums(pipe, suite, prompts, neutral, safety, candidate, p) for p in phrases}
    results = {**provenance(1), "candidate": args.candidate.name, "safety": args.safety, "prompts": prompts,
               "rows": rows, "ranks": {}}
    for floor in map(float, args.floors.split(",")):
        table = scores(rows, floor)
        for score in ("today", "own", "dd", "plain"):
            order = sorted(table, key=lambda p: -table[p][score])
            ranks = {p: order.index(p) + 1 for p in ["", *given]}
            results["ranks"][f"{score}@{floor}"] = ranks
            top = ", ".join(f"{p or '(as written)'} {table[p][score]:.2f}" for p in order[:5])
            print(f"{score:5} floor {floor}: ranks of {len(order)} {ranks}; top: {top}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
