"""Benchmark: exact dense vs truncated SVD of an erased model's difference, as the static scan uses it.

An SD1.5-shaped safety update: every linear/conv module of the SD1.5 UNet (282 modules, shapes from
the SD1.5 architecture table built on the meta device), each a random difference ΔW_safe = a few
strong directions (rank 8, decaying) plus full-rank noise carrying ``--noise`` of its energy, as a
fine-tuned erased checkpoint's difference looks; and a candidate's difference that undoes half of the
strong part, plus its own low-rank update and noise. Differences are generated module by module in
float32 (as checkpoints store them) and dropped after use, as the scan reads a checkpoint module by
module.

Methods, per module, then the static scan's metrics (:func:`auditkit.analysis.factors.pair_metrics`):

* ``dense``: the exact option (``--energy 1``): the dense SVD, every direction kept;
* ``truncated@E``: :func:`auditkit.lora.truncation.truncate` keeping a share E of each module's
  energy (randomized range finder, dense fallback).

Measured: time (truncation + metrics), energy kept per module (min, median), ranks, the size of the
factors, the overall cancellation and its error against the dense reference (−Σ⟨ΔW_c, ΔW_s⟩/Σ‖ΔW_s‖²
from the dense matrices), and peak memory (tracemalloc's peak of NumPy allocations while one module
is processed, over the largest modules; in a separate pass so that tracing does not slow the timings).

Usage: ``python benchmarks/extract.py [--json benchmarks/results/extract.json]`` (SD1.5, tens of
minutes on 2 cores); ``--arch lab`` runs the same at the lab's tiny size (seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from harness import emit, provenance

from auditkit.analysis.factors import low_rank_svd, pair_metrics
from auditkit.lora.truncation import truncate
from auditkit.models import architectures

STRONG_RANK = 8


def unet_modules(arch_name: str) -> list[tuple[str, int, int]]:
    arch = architectures.get(arch_name)
    return [(n, s.out_features, s.flat_in) for n, s in sorted(arch.modules.items()) if n.startswith("unet.")]


def differences(index: int, out: int, inp: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ΔW_safe, ΔW_cand) of one module, float32: strong low-rank parts plus noise of share ``noise``."""
    rng = np.random.default_rng([seed, index])
    k = min(STRONG_RANK, out, inp)
    weights = np.geomspace(1.0, 0.1, k).astype(np.float32)
    u = rng.standard_normal((out, k), dtype=np.float32)
    v = rng.standard_normal((k, inp), dtype=np.float32)
    strong = (u * weights) @ v / np.float32(np.sqrt(out * inp))
    safe = strong + _noise(rng, strong, noise)
    own = rng.standard_normal((out, k), dtype=np.float32) @ rng.standard_normal((k, inp), dtype=np.float32)
    own *= np.float32(0.5 / np.sqrt(out * inp * k))
    cand = -0.5 * strong + own
    return safe, cand + _noise(rng, cand, noise)


def _noise(rng, signal: np.ndarray, share: float) -> np.ndarray:
    """Gaussian noise with ‖noise‖² / (‖signal‖² + ‖noise‖²) = share."""
    if share <= 0:
        return np.zeros_like(signal)
    std = np.sqrt(share / (1 - share) * float(np.sum(signal.astype(np.float64) ** 2)) / signal.size)
    return rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(std)


def process(d_safe: np.ndarray, d_cand: np.ndarray, energy: float) -> dict:
    """One module through one method: truncations, then the scan's pair metrics from the factors."""
    ts, tc = truncate(d_safe, energy=energy), truncate(d_cand, energy=energy)
    pm = pair_metrics(low_rank_svd(tc.up, tc.down), low_rank_svd(ts.up, ts.down))
    return {"inner": pm.inner, "safety_energy": pm.safety_energy, "kept_safe": ts.energy_kept,
            "kept_cand": tc.energy_kept, "rank_safe": ts.rank, "rank_cand": tc.rank,
            "floats": ts.up.size + ts.down.size + tc.up.size + tc.down.size}


def run(modules, methods: dict[str, float], noise: float, seed: int) -> tuple[dict, dict]:
    """Times and metrics of every method over every module, and the dense reference's cancellation."""
    acc = {m: {"s": 0.0, "inner": 0.0, "safety_energy": 0.0, "kept": [], "ranks": [], "floats": 0}
           for m in methods}
    ref_inner = ref_energy = 0.0
    for i, (_, out, inp) in enumerate(modules):
        d_safe, d_cand = differences(i, out, inp, noise, seed)
        s64, c64 = d_safe.astype(np.float64), d_cand.astype(np.float64)
        ref_inner += float(np.sum(s64 * c64))
        ref_energy += float(np.sum(s64 * s64))
        del s64, c64
        for name, energy in methods.items():
            t0 = time.perf_counter()
            r = process(d_safe, d_cand, energy)
            a = acc[name]
            a["s"] += time.perf_counter() - t0
            a["inner"] += r["inner"]
            a["safety_energy"] += r["safety_energy"]
            a["kept"] += [r["kept_safe"], r["kept_cand"]]
            a["ranks"] += [r["rank_safe"], r["rank_cand"]]
            a["floats"] += r["floats"]
    return acc, {"cancellation": -ref_inner / ref_energy}


def peak_memory(modules, methods: dict[str, float], noise: float, seed: int, largest: int) -> dict[str, float]:
    """Peak MiB of NumPy allocations while one module is processed, over the ``largest`` modules."""
    order = sorted(range(len(modules)), key=lambda i: -modules[i][1] * modules[i][2])[:largest]
    peaks = dict.fromkeys(methods, 0.0)
    tracemalloc.start()
    try:
        for i in order:
            _, out, inp = modules[i]
            d_safe, d_cand = differences(i, out, inp, noise, seed)
            for name, energy in methods.items():
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                process(d_safe, d_cand, energy)
                peaks[name] = max(peaks[name], (tracemalloc.get_traced_memory()[1] - base) / 2**20)
            del d_safe, d_cand
    finally:
        tracemalloc.stop()
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sd15", help="built-in architecture whose UNet modules the difference covers")
    ap.add_argument("--energies", default="0.9,0.99,0.999", help="truncation energies to compare with dense")
    ap.add_argument("--noise", type=float, default=0.05, help="share of each difference's energy that is noise")
    ap.add_argument("--limit", type=int, default=0, help="only the first N modules (0: all)")
    ap.add_argument("--memory-modules", type=int, default=4, help="largest modules the memory pass traces")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    modules = unet_modules(args.arch)[: args.limit or None]
    methods = {"dense": 1.0, **{f"truncated@{float(e):g}": float(e) for e in args.energies.split(",")}}
    t0 = time.perf_counter()
    acc, ref = run(modules, methods, args.noise, args.seed)
    total_s = time.perf_counter() - t0
    peaks = peak_memory(modules, methods, args.noise, args.seed, args.memory_modules)
    dense_floats = sum(2 * out * inp for _, out, inp in modules)
    out = {}
    for name, a in acc.items():
        cancellation = -a["inner"] / a["safety_energy"]
        out[name] = {
            "seconds": round(a["s"], 3),
            "speedup_vs_dense": round(acc["dense"]["s"] / a["s"], 2) if a["s"] > 0 else None,
            "cancellation": round(cancellation, 6),
            "cancellation_error_vs_dense_reference": float(f"{abs(cancellation - ref['cancellation']):.3g}"),
            "energy_kept_min": round(min(a["kept"]), 6),
            "energy_kept_median": round(statistics.median(a["kept"]), 6),
            "rank_median": statistics.median(a["ranks"]),
            "rank_max": max(a["ranks"]),
            "factors_mb": round(a["floats"] * 8 / 2**20, 1),
            "factors_share_of_dense": round(a["floats"] / dense_floats, 4),
            "peak_memory_mb": round(peaks[name], 1),
        }
    results = {
        **provenance(),
        "architecture": args.arch, "modules": len(modules),
        "parameters_millions": round(sum(o * i for _, o, i in modules) / 1e6, 1),
        "difference": f"rank {STRONG_RANK} strong part (singular values 1 to 0.1) + noise ({args.noise:.0%} of the "
                      "energy); candidate: -0.5 x the strong part + its own rank-8 update + noise",
        "dense_reference_cancellation": round(ref["cancellation"], 6),
        "methods": out, "wall_s": round(total_s, 1), "memory_traced_modules": args.memory_modules,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    emit(results, args.json)


if __name__ == "__main__":
    main()
