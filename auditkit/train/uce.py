"""Closed-form concept erasure of the text key/value projections, with preserved concepts (UCE: Gandikota,
Orgad, Belinkov, Materzyńska, Bau, "Unified Concept Editing in Diffusion Models", WACV 2024;
rohitgandikota/unified-concept-editing).

For each linear layer W0 that reads the prompt's encoding itself (UNet cross-attention ``attn2.to_k``/``to_v``;
an MMDiT's ``context_embedder`` and pooled-text embedder: the family's ``text_readers`` in
:mod:`auditkit.models.denoising`), the edited W' solves

    W' = argmin_W  Σ_i ‖W c_i − v*_i‖² + w_p · Σ_j ‖W p_j − W0 p_j‖² + λ ‖W − W0‖²_F

with c_i the token embeddings of the concept prompts, v*_i = W0 g_i those of a guide prompt at the same
position (the concept word swapped for a neutral one: "a red cross" -> "a red square", so the colour the prompt
names is kept), and p_j the token embeddings of the preserved prompts (other shapes and colours, and the
unconditional prompt). Setting the gradient to zero:

    W' = (Σ v*_i c_iᵀ + w_p W0 Σ p_j p_jᵀ + λ W0) (Σ c_i c_iᵀ + w_p Σ p_j p_jᵀ + λ I)⁻¹

(:func:`closed_form_edit`, pure; tested against a dense least-squares solve). The edit ΔW = W' − W0 is written
as a LoRA of the rank it needs to be exact (:func:`auditkit.train.lora.lora_from_delta` of ΔW's full SVD), so
the module is the edited model itself, not an approximation of it.

Every position of a prompt takes part: the lab UNet's text encoder is causal, so the positions before the concept
word are the same in concept and guide prompts (their constraint is W c = W0 c, a preservation) and the ones
after it (the end token, padding) carry the concept forward and are moved with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule
from auditkit.train.lora import check_number


@dataclass(frozen=True)
class UCEConfig:
    preserve: float = 1.0  # w_p: weight of the preserved prompts' constraints
    lam: float = 0.1  # λ: the pull towards W0 (keeps the solve well posed where no prompt reaches)

    def __post_init__(self) -> None:
        for name in ("preserve", "lam"):
            check_number(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise BadInput(None, f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.lam == 0 and self.preserve == 0:
            raise BadInput(None, "UCE needs preserve > 0 or lam > 0 (else the solve is not determined)")


def closed_form_edit(w0: np.ndarray, concepts: np.ndarray, targets: np.ndarray, preserved: np.ndarray,
                     preserve: float = 1.0, lam: float = 0.1) -> np.ndarray:
    """W' = argmin Σ‖W c_i − v*_i‖² + preserve·Σ‖W p_j − W0 p_j‖² + lam·‖W − W0‖² (module docstring).

    Args:
        w0: out × d, the original projection.
        concepts: n × d, the c_i (rows).
        targets: n × out, the v*_i (rows).
        preserved: m × d, the p_j (rows; m may be 0).
        preserve, lam: the weights (lam > 0 or a full-rank system keeps it solvable).

    Returns W' (out × d, float64).

    Example:
        >>> w0 = np.eye(2); c = np.array([[1.0, 0.0]]); v = np.array([[0.0, 1.0]])
        >>> np.round(closed_form_edit(w0, c, v, np.array([[0.0, 1.0]]), lam=0.0), 6)
        array([[0., 0.],
               [1., 1.]])
    """
    w0 = np.asarray(w0, dtype=np.float64)
    c = np.asarray(concepts, dtype=np.float64).reshape(-1, w0.shape[1])
    v = np.asarray(targets, dtype=np.float64).reshape(-1, w0.shape[0])
    p = np.asarray(preserved, dtype=np.float64).reshape(-1, w0.shape[1])
    if len(c) != len(v):
        raise ValueError(f"{len(c)} concept rows but {len(v)} target rows")
    gram_p = p.T @ p
    lhs = c.T @ c + preserve * gram_p + lam * np.eye(w0.shape[1])
    rhs = v.T @ c + preserve * w0 @ gram_p + lam * w0
    # W' lhs = rhs with lhs symmetric: solve lhs W'ᵀ = rhsᵀ
    return np.linalg.solve(lhs, rhs.T).T


def reader_inputs(cond, source: str) -> np.ndarray:
    """The rows a text-reading layer sees for a conditioning batch: every token's embedding (``hidden``,
    N·L × d) or one vector per prompt (a key of ``cond.added``, such as the pooled prompt)."""
    x = cond.hidden if source == "hidden" else cond.added[source]
    x = x.detach().double().cpu().numpy()
    return x.reshape(-1, x.shape[-1])


def train_uce(pipe, concept_prompts: Sequence[str], guide_prompts: Sequence[str], preserved_prompts: Sequence[str],
              cfg: UCEConfig = UCEConfig()) -> dict[str, LoraModule]:
    """The UCE edit of the denoiser's layers that read the prompt's encoding (its family's ``text_readers``: UNet
    cross-attention ``to_k``/``to_v``; an MMDiT's ``context_embedder`` and pooled-text embedder) as exact
    canonical LoRA modules.

    ``guide_prompts[i]`` is what ``concept_prompts[i]`` should look like to the model (same words, the concept
    swapped for a neutral one); ``preserved_prompts`` keep their encodings' images (the unconditional prompt is
    always added: classifier-free guidance reads it). Raises BadInput on mismatched lists or a preserved prompt
    that is also a concept prompt."""
    import re

    from auditkit.models.pipeline import denoiser_for, encode
    from auditkit.train.esd import ESDConfig, check_anchor_prompts
    from auditkit.train.lora import lora_from_delta

    if len(concept_prompts) != len(guide_prompts):
        raise BadInput(None, f"{len(concept_prompts)} concept prompts but {len(guide_prompts)} guide prompts")
    preserved = check_anchor_prompts(concept_prompts, list(preserved_prompts) or [""], ESDConfig(preserve=1.0))
    den = denoiser_for(pipe)
    conds = [encode(pipe, list(p)) for p in (concept_prompts, guide_prompts, preserved)]
    modules: dict[str, LoraModule] = {}
    for pattern, source in den.record.text_readers.items():
        c, g, p = (reader_inputs(cond, source) for cond in conds)
        for name, module in den.model.named_modules():
            if not re.fullmatch(pattern, name):
                continue
            w0 = module.weight.detach().double().cpu().numpy()
            delta = closed_form_edit(w0, c, g @ w0.T, p, cfg.preserve, cfg.lam) - w0
            canonical = f"{den.component}.{name}"
            modules[canonical] = lora_from_delta(canonical, delta, min(delta.shape))
    if not modules:
        raise BadInput(None, f"the {den.label} has no layer reading the prompt's encoding (nothing to edit)")
    return modules
