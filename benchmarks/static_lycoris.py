"""Benchmark: static scan of SD1.5-shaped LyCORIS pairs (LoHa, LoKr) against a LoRA pair of about the
same parameter count, each against a dense reference, in one run on this machine.

Every pair covers the 160 attention and feed-forward modules of SD1.5's 16 transformer blocks
(as ``benchmarks/static_scan.py``), stored in fp16 with kohya/LyCORIS names:

* LoRA rank 16: up (out×16) and down (16×in) per module;
* LoHa rank 8: two Hadamard halves of rank 8, the same parameter count as LoRA rank 16; auditkit
  holds ΔW as rank-64 Khatri-Rao factors;
* LoKr factor 4: ``lokr_w1`` whole (4×4) and ``lokr_w2_a/_b`` of rank 64 on the (out/4)×(in/4)
  half: the parameter count of LoRA rank 16 plus 16 per module; held as its Kronecker halves
  (the analysis never forms the rank-256 factors).

For each pair: the time to read both files (``read_adapter``: parsing plus the exact factor forms),
the analysis (``static_scan`` on the read adapters), and the dense reference (materialise every ΔW
from the read factors, inner products, SVDs; the metrics the static scan reports). The target of
issue 11: a LoKr/LoHa pair within 2x of the LoRA pair's time.

Usage: ``python benchmarks/static_lycoris.py [--repeat 5] [--json benchmarks/results/static_lycoris.json]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import provenance, write_json
from safetensors.numpy import save_file
from static_scan import TARGETS, dense_reference

from auditkit.analysis.weights import static_scan
from auditkit.examples import lycoris_tensors
from auditkit.lora.adapter import read_adapter
from auditkit.lora.write import kohya_name
from auditkit.models import architectures


def lora_tensors(arch, names, rank: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        s, key = arch.modules[n], kohya_name(arch, n)
        out[f"{key}.lora_down.weight"] = rng.normal(0, 0.1, (rank, s.flat_in)).astype(np.float32)
        out[f"{key}.lora_up.weight"] = rng.normal(0, 0.1, (s.out_features, rank)).astype(np.float32)
        out[f"{key}.alpha"] = np.asarray(rank / 2, np.float32)
    return out


PAIRS = {  # name -> (tensors of one file, seed)
    "lora-r16": lambda arch, names, seed: lora_tensors(arch, names, 16, seed),
    "loha-r8": lambda arch, names, seed: lycoris_tensors(arch, names, "loha", rank=8, seed=seed),
    "lokr-f4-r64": lambda arch, names, seed: lycoris_tensors(arch, names, "lokr", rank=64, factor=4, seed=seed),
}


def write_pair(out_dir: Path, kind: str) -> tuple[Path, Path, int]:
    arch = architectures.get("sd15")
    names = [n for n in arch.modules if n.startswith("unet.") and n.endswith(TARGETS)]
    assert len(names) == 160
    paths, params = [], 0
    for role, seed in (("candidate", 1), ("safety", 2)):
        tensors = {k: v.astype(np.float16) for k, v in PAIRS[kind](arch, names, seed).items()}
        params = sum(v.size for k, v in tensors.items() if not k.endswith(".alpha"))
        path = out_dir / f"{kind}-{role}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths[0], paths[1], params


def measure(cand_path: Path, safe_path: Path, repeat: int) -> dict:
    reads, analyses = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        cand, safe = read_adapter(cand_path), read_adapter(safe_path)
        t1 = time.perf_counter()
        findings = static_scan(cand, safe)
        reads.append(t1 - t0)
        analyses.append(time.perf_counter() - t1)
    t0 = time.perf_counter()
    ref = dense_reference(cand, safe)  # once: it takes minutes
    denses = [time.perf_counter() - t0]
    assert abs(findings.cancellation - ref["cancellation"]) < 1e-6 * max(1.0, abs(ref["cancellation"]))
    forms = sorted({f.candidate_form for f in findings.modules})
    ranks = sorted({m.rank for m in cand.modules.values()})
    return {
        "read_s": statistics.median(reads), "analysis_s": statistics.median(analyses),
        "read_plus_analysis_s": statistics.median(r + a for r, a in zip(reads, analyses, strict=True)),
        "dense_reference_s": statistics.median(denses),
        "speedup_vs_dense": statistics.median(denses) / statistics.median(analyses),
        "forms": forms, "held_ranks": ranks, "cancellation": findings.cancellation,
        "runs": {"read_s": reads, "analysis_s": analyses, "dense_reference_s": denses},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in PAIRS:
            cand, safe, params = write_pair(Path(tmp), kind)
            r = measure(cand, safe, args.repeat)
            r["parameters_per_file"] = params
            r["file_bytes"] = cand.stat().st_size
            results[kind] = r
            print(f"{kind:9s} params {params:>9,d}  read {r['read_s']:.3f} s  analysis {r['analysis_s']:.3f} s  "
                  f"dense reference {r['dense_reference_s']:.3f} s  forms {r['forms']}  ranks {r['held_ranks'][:3]}")
    lora = results["lora-r16"]["read_plus_analysis_s"]
    for kind in ("loha-r8", "lokr-f4-r64"):
        results[kind]["ratio_to_lora"] = results[kind]["read_plus_analysis_s"] / lora
        print(f"{kind}: read + analysis {results[kind]['ratio_to_lora']:.2f}x the LoRA pair's (target < 2x)")
    doc = {"benchmark": "static_lycoris", "command": f"python benchmarks/static_lycoris.py --repeat {args.repeat}",
           **provenance(), "results": results}
    if args.json:
        write_json(args.json, doc)


if __name__ == "__main__":
    main()
