"""Pure factor-space operations of the repairs (no dense ΔW is ever formed; dense references in tests).

* :func:`concatenate` — one LoRA whose update is the sum of several: the factors stacked along the
  rank, each adapter's scale and multiplier folded into its up factor (rank r₁ + r₂, scale 1). This is
  how a Modular-LoRA pack ships as a single file for tools that load one adapter.
* :func:`sign_aware_projection` — removes the part of a candidate update that sits inside the safety
  update's own subspace and does not reinforce it. With ΔW_s = U·Σ·Vᵀ and M = Uᵀ·ΔW_c·V (k×k), the
  repaired update is ΔW_c − U·(M − D₊)·Vᵀ, D₊ = diag(max(Mᵢᵢ, 0)): inside the safety subspace only
  the components along the safety's own singular directions with the safety's sign remain, so
  ⟨ΔW', ΔW_s⟩ = Σᵢ σᵢ·max(Mᵢᵢ, 0) ≥ 0 — no weight-space cancellation is left. Everything outside the
  subspace (what the candidate was made for, if it lives elsewhere) is kept exactly. The result is
  exact in factor form: up = [B_c, −U·(M − D₊)], down = [A_c; Vᵀ], rank r_c + k.
* :func:`safelora_projection` — Safe LoRA (Hsu et al., NeurIPS 2024, arXiv 2405.16833): per module,
  the candidate update is compared with its projection onto the column space of the alignment
  update (here ΔW_s); where the similarity ‖P·ΔW_c‖/‖ΔW_c‖ is below a threshold the module is
  replaced by its projection P·ΔW_c. Safe LoRA writes P = V·Vᵀ/‖V‖_F; this uses the exact orthogonal
  projector U·Uᵀ onto the same column space. Modules the safety adapter does not touch are kept
  (there is no alignment direction for them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from auditkit.analysis.factors import low_rank_svd, update_energy
from auditkit.lora.adapter import LoraModule


def concatenate(*adapters: tuple[dict[str, LoraModule], float]) -> dict[str, LoraModule]:
    """One adapter with ΔW = Σ mᵢ·ΔWᵢ per module, from (modules, multiplier) pairs: factors concatenated along
    the rank (scale 1, rank Σ rᵢ; a LoKr or LoHa module enters as its exact factors), bias updates summed.

    Raises ValueError for a DoRA module whose exact update has not been made with the base weights (its
    factors are only its direction: their sum would not be the adapters' sum)."""
    names: list[str] = []
    for mods, _ in adapters:
        names += [n for n in mods if n not in names]
    out = {}
    for name in names:
        parts = [(m[name], mult) for m, mult in adapters if name in m]
        if any(p.needs_base for p, _ in parts):
            raise ValueError(f"{name} is a DoRA module: its exact update needs the base weights (give --base)")
        up = np.concatenate([p.up.astype(np.float64) * (p.scale * mult) for p, mult in parts], axis=1)
        down = np.concatenate([p.down.astype(np.float64) for p, _ in parts], axis=0)
        biases = [np.asarray(p.bias, np.float64) * mult for p, mult in parts if p.bias is not None]
        bias = np.sum(biases, axis=0).astype(np.float32) if biases else None
        out[name] = LoraModule(name, down.astype(np.float32), up.astype(np.float32), 1.0, bias=bias)
    return out


@dataclass(frozen=True)
class ModuleRepair:
    name: str
    changed: bool
    cancellation_before: float  # −⟨ΔW_c, ΔW_s⟩/‖ΔW_s‖²
    cancellation_after: float
    energy_kept: float  # ‖ΔW'‖² / ‖ΔW_c‖²
    similarity: float | None = None  # Safe LoRA: ‖P·ΔW_c‖/‖ΔW_c‖

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _inner(a: LoraModule, b: LoraModule) -> float:
    """⟨ΔW_a, ΔW_b⟩_F from the factors: tr((B_aᵀB_b)(A_b A_aᵀ))."""
    ua, da = a.up.astype(np.float64), a.down.astype(np.float64)
    ub, db = b.up.astype(np.float64), b.down.astype(np.float64)
    return float(a.scale * b.scale * np.sum((ua.T @ ub) * (da @ db.T)))


def _energy(m: LoraModule) -> float:
    return update_energy(m.up, m.down, m.scale)


def _report(name: str, changed: bool, cand: LoraModule, new: LoraModule, safe: LoraModule,
            similarity: float | None = None) -> ModuleRepair:
    se, ce = _energy(safe), _energy(cand)
    return ModuleRepair(name, changed, -_inner(cand, safe) / se if se > 0 else 0.0,
                        -_inner(new, safe) / se if se > 0 else 0.0, _energy(new) / ce if ce > 0 else 1.0,
                        similarity)


def sign_aware_module(cand: LoraModule, safe: LoraModule) -> tuple[LoraModule, ModuleRepair]:
    s = low_rank_svd(safe.up, safe.down, safe.scale)
    b = cand.up.astype(np.float64) * cand.scale
    a = cand.down.astype(np.float64)
    m = (s.u.T @ b) @ (a @ s.v)  # k × k: the candidate inside the safety subspace
    remove = m - np.diag(np.maximum(np.diag(m), 0.0))
    if not np.any(remove):
        return cand, _report(cand.name, False, cand, cand, safe)
    new = LoraModule(cand.name, np.concatenate([a, s.v.T]).astype(np.float32),
                     np.concatenate([b, -s.u @ remove], axis=1).astype(np.float32), 1.0)
    return new, _report(cand.name, True, cand, new, safe)


def safelora_module(cand: LoraModule, safe: LoraModule, threshold: float) -> tuple[LoraModule, ModuleRepair]:
    s = low_rank_svd(safe.up, safe.down, safe.scale)
    b = cand.up.astype(np.float64) * cand.scale
    a = cand.down.astype(np.float64)
    pb = s.u @ (s.u.T @ b)
    ce = _energy(cand)
    similarity = float(np.sqrt(update_energy(pb, a) / ce)) if ce > 0 else 1.0
    if similarity >= threshold:
        return cand, _report(cand.name, False, cand, cand, safe, similarity)
    new = LoraModule(cand.name, a.astype(np.float32), pb.astype(np.float32), 1.0)
    return new, _report(cand.name, True, cand, new, safe, similarity)


def project(candidate: dict[str, LoraModule], safety: dict[str, LoraModule],
            repair_module: Callable[[LoraModule, LoraModule], tuple[LoraModule, ModuleRepair]] | None = None,
            ) -> tuple[dict[str, LoraModule], list[ModuleRepair]]:
    """Repair every module the candidate shares with the safety adapter with ``repair_module``
    (default :func:`sign_aware_module`); the others are kept as they are."""
    repair_module = repair_module or sign_aware_module
    out, reports = {}, []
    for name, cand in candidate.items():
        if name not in safety:
            out[name] = cand
            continue
        out[name], rep = repair_module(cand, safety[name])
        reports.append(rep)
    return out, reports


def overall_cancellation(candidate: dict[str, LoraModule], safety: dict[str, LoraModule]) -> float:
    """−Σ⟨ΔW_c, ΔW_s⟩ / Σ‖ΔW_s‖² over all safety modules (the static scan's headline number)."""
    energy = sum(_energy(m) for m in safety.values())
    inner = sum(_inner(candidate[n], m) for n, m in safety.items() if n in candidate)
    return -inner / energy if energy > 0 else 0.0

