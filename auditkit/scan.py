"""`auditkit scan` as a library call: read, check, analyse, decide. No printing here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from auditkit.analysis.verdict import Verdict, static_verdict
from auditkit.analysis.weights import StaticFindings, static_scan
from auditkit.config import StaticThresholds
from auditkit.errors import BadInput, Unscannable
from auditkit.lora.adapter import Adapter, read_adapter


@dataclass
class StaticScan:
    candidate: Adapter
    safety: Adapter
    findings: StaticFindings
    verdict: Verdict
    thresholds: StaticThresholds


def read_pair(candidate_path: str | Path, safety_path: str | Path, arch: str | None = None) -> tuple[Adapter, Adapter]:
    """Read both adapters for one architecture, or refuse: they must adapt the same model."""
    safety = read_adapter(safety_path, arch=arch)
    candidate = read_adapter(candidate_path, arch=arch)
    if candidate.architecture.name != safety.architecture.name:
        # Small adapters can fit several architectures; settle on one both fit.
        if safety.architecture.name in candidate.architecture_candidates:
            candidate = read_adapter(candidate_path, arch=safety.architecture)
        elif candidate.architecture.name in safety.architecture_candidates:
            safety = read_adapter(safety_path, arch=candidate.architecture)
        else:
            raise BadInput(
                candidate_path,
                f"adapts {candidate.architecture.name} but the safety adapter {safety_path} adapts "
                f"{safety.architecture.name}; they must target the same model",
            )
    return candidate, safety


def run_static_scan(
    candidate_path: str | Path,
    safety_path: str | Path,
    thresholds: StaticThresholds = StaticThresholds(),
    arch: str | None = None,
) -> StaticScan:
    candidate, safety = read_pair(candidate_path, safety_path, arch)
    try:
        findings = static_scan(candidate, safety)
    except ValueError as exc:
        raise Unscannable(safety_path, str(exc)) from None
    verdict = static_verdict(
        findings, {"candidate": candidate.coverage.fraction, "safety": safety.coverage.fraction}, thresholds
    )
    return StaticScan(candidate, safety, findings, verdict, thresholds)
