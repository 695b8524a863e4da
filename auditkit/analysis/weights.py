"""Static scan: a candidate adapter against a safety adapter, module by module, in factor space.

Overall cancellation = −Σₘ⟨ΔW_c, ΔW_s⟩ / Σₘ‖ΔW_s‖² over the safety adapter's modules (a module the
candidate leaves alone contributes 0). It is 1.0 when the candidate exactly undoes the safety
update, 0 when it is orthogonal to it, negative when it reinforces it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from auditkit.analysis.factors import (
    FactorPair,
    KronSVD,
    LowRankSVD,
    effective_rank,
    kron_pair_metrics_many,
    kronecker_svd,
    low_rank_svd,
    pair_metrics,
    pair_metrics_many,
    update_energy,
)
from auditkit.lora.adapter import Adapter, LoraModule
from auditkit.models.architectures import block_of, module_kind


@dataclass
class ModuleFinding:
    name: str
    block: str
    kind: str
    cancellation: float
    contribution: float  # this module's share of the overall cancellation (sums to it)
    cosine: float
    energy_in_safety_subspace: float
    energy_in_safety_columns: float
    energy_in_safety_rows: float
    column_angles_deg: list[float]
    row_angles_deg: list[float]
    candidate_norm: float
    safety_norm: float
    safety_share: float  # this module's share of the safety update's energy
    candidate_rank: int
    safety_rank: int
    candidate_effective_rank: float
    safety_effective_rank: float
    candidate_form: str = "factors"  # how each update was held (see auditkit.lora.algorithms)
    safety_form: str = "factors"


@dataclass
class GroupFinding:
    block: str
    kind: str
    modules: int
    cancellation: float
    contribution: float
    safety_share: float
    energy_in_safety_subspace: float


@dataclass
class StaticFindings:
    cancellation: float
    cosine: float
    energy_in_safety_subspace: float
    safety_energy: float
    candidate_energy: float
    shared_modules: int
    modules: list[ModuleFinding]  # shared modules, most safety-undoing first
    groups: list[GroupFinding]
    blocks: dict[str, dict]
    kinds: dict[str, dict]
    candidate_only: list[str] = field(default_factory=list)
    safety_only: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _energy(m: LoraModule) -> float:
    if m.kron is not None:  # ‖kron(W₁, W₂)‖² = ‖W₁‖²·‖W₂‖²
        u1, d1, u2, d2 = m.kron
        return update_energy(u1, d1, m.scale) * update_energy(u2, d2)
    return update_energy(m.up, m.down, m.scale)


def _form(m: LoraModule) -> str:
    """The algorithm and the form its update was analysed in, e.g. ``loha/khatri-rao``."""
    form = f"{m.algorithm}/{m.form}"
    return form + " (DoRA direction only)" if m.needs_base else form


def _svd(m: LoraModule) -> LowRankSVD | KronSVD:
    if m.kron is not None:
        return kronecker_svd(*m.kron, scale=m.scale)
    return low_rank_svd(m.up, m.down, m.scale)


def _same_split(c: LoraModule, s: LoraModule) -> bool:
    """Two LoKr modules whose first halves have one shape (their metrics factor over the halves)."""
    return (c.kron[0].shape[0], c.kron[1].shape[1]) == (s.kron[0].shape[0], s.kron[1].shape[1])


def _pair_metrics(candidate: Adapter, safety: Adapter, names: list[str]) -> list[tuple]:
    """(name, metrics, candidate singular values, safety singular values) per shared module: factor
    pairs and LoKr pairs of one split together from their Gram matrices (auditkit.analysis.factors),
    the rest (and ill-conditioned factors) one by one."""
    both = [(n, candidate.modules[n], safety.modules[n]) for n in names]
    factored = [(n, c, s) for n, c, s in both if c.kron is None and s.kron is None]
    kron = [(n, c, s) for n, c, s in both if c.kron is not None and s.kron is not None and _same_split(c, s)]
    batches = (
        (factored, pair_metrics_many([FactorPair(c.up, c.down, c.scale, s.up, s.down, s.scale)
                                      for _, c, s in factored])),
        (kron, kron_pair_metrics_many([(c.kron, c.scale, s.kron, s.scale) for _, c, s in kron])),
    )
    found = {n: got for group, results in batches for (n, _, _), got in zip(group, results, strict=True)}
    out = []
    for name, c, s in both:
        if found.get(name) is None:
            cs, ss = _svd(c), _svd(s)
            found[name] = (pair_metrics(cs, ss), cs.s, ss.s)
        out.append((name, *found[name]))
    return out


def static_scan(candidate: Adapter, safety: Adapter) -> StaticFindings:
    """Compare ``candidate`` with ``safety`` (same architecture; checked by the caller).

    One module at a time: the orthonormal bases of a module are dropped before the next is read,
    so memory stays near the size of the two files whatever their number of modules.
    """
    shared = sorted(set(candidate.modules) & set(safety.modules))
    safety_only = {n: _energy(m) for n, m in safety.modules.items() if n not in candidate.modules}
    cand_only = {n: _energy(m) for n, m in candidate.modules.items() if n not in safety.modules}
    pairs = _pair_metrics(candidate, safety, shared)
    total_safety = sum(pm.safety_energy for _, pm, _, _ in pairs) + sum(safety_only.values())
    total_cand = sum(pm.candidate_energy for _, pm, _, _ in pairs) + sum(cand_only.values())
    if total_safety <= 0:
        raise ValueError("the safety adapter's update is zero")

    findings: list[ModuleFinding] = []
    inner_total = 0.0
    projected_total = 0.0
    for name, pm, c_s, s_s in pairs:
        inner_total += pm.inner
        projected_total += pm.energy_in_safety_subspace * pm.candidate_energy
        findings.append(
            ModuleFinding(
                name=name,
                block=block_of(name),
                kind=module_kind(name),
                cancellation=pm.cancellation,
                contribution=-pm.inner / total_safety,
                cosine=pm.cosine,
                energy_in_safety_subspace=pm.energy_in_safety_subspace,
                energy_in_safety_columns=pm.energy_in_safety_columns,
                energy_in_safety_rows=pm.energy_in_safety_rows,
                column_angles_deg=[math.degrees(a) for a in pm.column_angles],
                row_angles_deg=[math.degrees(a) for a in pm.row_angles],
                candidate_norm=math.sqrt(pm.candidate_energy),
                safety_norm=math.sqrt(pm.safety_energy),
                safety_share=pm.safety_energy / total_safety,
                candidate_rank=int(c_s.size),
                safety_rank=int(s_s.size),
                candidate_effective_rank=effective_rank(c_s),
                safety_effective_rank=effective_rank(s_s),
                candidate_form=_form(candidate.modules[name]),
                safety_form=_form(safety.modules[name]),
            )
        )
    findings.sort(key=lambda f: f.contribution, reverse=True)
    # Per-module energy records over every safety module (untouched ones add safety energy only),
    # so block and group aggregates account for the whole safety update.
    records = [(f.block, f.kind, -f.cancellation * f.safety_norm**2, f.safety_norm**2, f.candidate_norm**2,
                f.energy_in_safety_subspace * f.candidate_norm**2) for f in findings]
    records += [(block_of(n), module_kind(n), 0.0, e, 0.0, 0.0) for n, e in safety_only.items()]
    denom = math.sqrt(total_cand * total_safety)
    return StaticFindings(
        cancellation=-inner_total / total_safety,
        cosine=inner_total / denom if denom > 0 else 0.0,
        energy_in_safety_subspace=projected_total / total_cand if total_cand > 0 else 0.0,
        safety_energy=total_safety,
        candidate_energy=total_cand,
        shared_modules=len(shared),
        modules=findings,
        groups=[GroupFinding(block=k[0], kind=k[1], **v)
                for k, v in sorted(_aggregate(records, lambda r: (r[0], r[1]), total_safety).items())],
        blocks=_aggregate(records, lambda r: r[0], total_safety),
        kinds=_aggregate(records, lambda r: r[1], total_safety),
        candidate_only=sorted(cand_only),
        safety_only=sorted(safety_only),
    )


def _aggregate(records, key, total_safety: float) -> dict:
    """Cancellation, contribution, safety share and subspace energy per key (block, kind or both).

    ``records`` are (block, kind, inner, safety energy, candidate energy, projected energy).
    """
    sums: dict = {}
    for r in records:
        acc = sums.setdefault(key(r), [0, 0.0, 0.0, 0.0, 0.0])
        acc[0] += 1 if r[4] > 0 else 0
        for i in range(4):
            acc[i + 1] += r[i + 2]
    return {
        k: {
            "modules": n,
            "cancellation": -inner / safe if safe > 0 else 0.0,
            "contribution": -inner / total_safety,
            "safety_share": safe / total_safety,
            "energy_in_safety_subspace": proj / cand if cand > 0 else 0.0,
        }
        for k, (n, inner, safe, cand, proj) in sums.items()
    }
