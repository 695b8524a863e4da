"""The anchor prompts of a trained repair, and the proof that its re-scan does not verify on them.

The anchored and corrected repairs pin the model's predictions on *anchor* prompts (the erased concept's)
to the safe model's. A re-scan on those same prompts would prove little: a repair can hold the concept down
on the prompts it was trained on and let it back on any other phrasing. So the anchors come from their
own suites (role ``anchor``: shipped ones such as ``probes/lab-cross-anchors.yaml`` and
``probes/nudity-anchors.yaml``, or the user's ``--anchors FILE``), the re-scan verifies on the concept
suites, and a repair whose anchors share a prompt with a verification suite is refused before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.suites import normalised


@dataclass(frozen=True)
class Anchors:
    suites: tuple  # the anchor suites (auditkit.suites.Suite)
    verification: tuple  # the concept suites the re-scans verify on

    @property
    def prompts(self) -> list[str]:
        return list(dict.fromkeys(p.text for s in self.suites for p in s.prompts))

    @property
    def guidance(self) -> float:
        """The anchors' sampling guidance (their suites', the median over prompts): the corrected repair samples
        the candidate's anchor trajectories with it."""
        return float(np.median([p.guidance for s in self.suites for p in s.prompts]))

    def to_dict(self) -> dict:
        return {"suites": [{"name": s.name, "version": s.version, "path": s.path, "prompts": len(s.prompts)}
                           for s in self.suites],
                "prompts": len(self.prompts),
                "verified_on": [{"name": s.name, "version": s.version, "prompts": len(s.prompts)}
                                for s in self.verification],
                "shared_prompts": 0,
                "statement": "verified on concept prompts disjoint from the anchors (no prompt in common, after "
                             "lower-casing and dropping punctuation); the training noise is drawn from the repair's "
                             "seed, the verification images from the suites' own seeds"}


def shipped_anchor_suites() -> list:
    from auditkit.suites import builtin_dir, list_suites

    return [s for s in list_suites(builtin_dir()) if s.role == "anchor"]


def resolve_anchors(suites: list, given: tuple[Path, ...] = (), shipped: list | None = None) -> Anchors:
    """The anchors for a repair verified on ``suites`` (the resolved scan suites): the ``given`` suite files,
    else the shipped anchor suites naming the same concept word as a concept suite. Refuses (BadInput) when
    none is found or an anchor prompt is also a prompt of a verification suite."""
    from auditkit.suites import load_suites

    verification = tuple(s for s in suites if s.role == "concept" and not s.variant_of)
    if not verification:
        raise BadInput(None, "no concept suite to verify the repair on")
    if given:
        chosen = load_suites(given)
    else:
        words = {s.concept_word for s in verification}
        chosen = [s for s in (shipped if shipped is not None else shipped_anchor_suites()) if s.concept_word in words]
        if not chosen:
            first = verification[0]
            raise BadInput(first.path or None, f"no shipped anchor suite for concept {first.concept_word!r}: give "
                                               f"--anchors FILE (a suite whose prompts the repair is trained on, "
                                               f"disjoint from this suite's)")
    seen = {normalised(p.text): s for s in verification for p in s.prompts}
    for anchor in chosen:
        shared = [p.text for p in anchor.prompts if normalised(p.text) in seen]
        if shared:
            other = seen[normalised(shared[0])]
            raise BadInput(anchor.path or None, f"{len(shared)} of its prompts are also prompts of the verification "
                                                f"suite {other.name} (e.g. {shared[0]!r}): a repair must be verified "
                                                f"on prompts it was not trained on")
    return Anchors(tuple(chosen), verification)
