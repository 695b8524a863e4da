"""Modular-LoRA repair with data: retrain the fine-tuning adapter on the base alone.

Kim et al. ("Safety Alignment Backfires", arXiv 2412.00357): a LoRA trained on top of a safety
module is free to learn −ΔW_safe; trained separately from it (the safety module frozen and never in
the trained update or the forward pass) and added only at inference, W* = W0 + ΔW_safe + ΔW_ft,
it is not. The retrained adapter copies the candidate's shape by default: its denoiser modules (the
UNet's, or the transformer's for SD3 and Flux), rank and alpha (read from the file and its kohya ``ss_``
metadata), and its training length when recorded. Training uses the family's own objective
(:mod:`auditkit.train.finetune`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from auditkit.lora.adapter import Adapter
from auditkit.setting import setting

DEFAULT_STEPS = 400


@dataclass(frozen=True)
class Retraining:
    """What a trained repair is asked for (``auditkit repair``'s retraining options): each None takes the
    candidate's own value (:func:`settings_from`). Checked when made: a value that is not finite or out of range
    is one line (:class:`auditkit.errors.BadInput`), before any work."""

    rank: int | None = setting(None, "retraining: LoRA rank (default: the candidate's).")
    alpha: float | None = setting(None, "retraining: LoRA alpha (default: the candidate's).")
    steps: int | None = setting(None, f"retraining: training steps (default: ss_max_train_steps of the candidate, "
                                      f"else {DEFAULT_STEPS}).", flag="train-steps")
    lr: float = setting(1e-3, "retraining: learning rate.")
    batch: int = setting(32, "retraining: batch size.", flag="train-batch")
    seed: int = setting(0, "retraining: seed.")

    def __post_init__(self) -> None:
        from auditkit.train.lora import MAX_TRAIN_SEED, check_int, check_number

        if self.rank is not None:
            check_int("--rank", self.rank, 1)
        if self.steps is not None:
            check_int("--train-steps", self.steps, 1)
        if self.alpha is not None:
            check_number("--alpha", self.alpha, positive=True)
        check_number("--lr", self.lr, positive=True)
        check_int("--train-batch", self.batch, 1)
        check_int("--seed", self.seed, 0, MAX_TRAIN_SEED)


@dataclass(frozen=True)
class RetrainSettings:
    targets: str  # regex over the denoiser's module paths (the candidate's own modules)
    modules: int
    rank: int
    alpha: float
    steps: int
    lr: float = Retraining.lr
    batch: int = Retraining.batch
    seed: int = Retraining.seed
    sources: dict = field(default_factory=dict)  # where each value came from
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _float(meta: dict, key: str) -> float | None:
    try:
        return float(meta[key])
    except (KeyError, ValueError):
        return None


def settings_from(candidate: Adapter, asked: Retraining = Retraining(), component: str = "unet",
                  label: str = "UNet") -> RetrainSettings:
    """The candidate's own training shape, overridden by what ``asked`` sets; ``component`` is the base's
    denoiser (``unet``, or ``transformer`` for SD3 and Flux), ``label`` its name in messages."""
    rank, alpha, steps = asked.rank, asked.alpha, asked.steps
    prefix = f"{component}."
    denoiser = sorted(n.split(".", 1)[1] for n in candidate.modules if n.startswith(prefix))
    if not denoiser:
        raise ValueError(f"the candidate has no {label} modules to retrain")
    notes = []
    skipped = [n for n in candidate.modules if not n.startswith(prefix)]
    if skipped:
        notes.append(f"{len(skipped)} text-encoder modules of the candidate are not retrained and not kept "
                     f"(the repaired adapter changes the {label} only)")
    meta = candidate.metadata
    ranks = Counter(m.rank for m in candidate.modules.values() if m.name.startswith(prefix))
    file_rank = ranks.most_common(1)[0][0]
    sources = {}
    if rank is None:
        rank, sources["rank"] = file_rank, "candidate file (most common rank)"
    else:
        sources["rank"] = "option"
    if alpha is None:
        meta_alpha, meta_dim = _float(meta, "ss_network_alpha"), _float(meta, "ss_network_dim")
        if meta_alpha is not None and meta_dim:
            alpha, sources["alpha"] = meta_alpha * rank / meta_dim, "ss_network_alpha (scaled to the rank)"
        else:
            scales = Counter(round(m.scale, 6) for m in candidate.modules.values())
            alpha, sources["alpha"] = scales.most_common(1)[0][0] * rank, "candidate file (scale × rank)"
    else:
        sources["alpha"] = "option"
    if steps is None:
        meta_steps = _float(meta, "ss_max_train_steps")
        if meta_steps:
            steps, sources["steps"] = int(meta_steps), "ss_max_train_steps"
        else:
            steps, sources["steps"] = DEFAULT_STEPS, f"default ({DEFAULT_STEPS}; the file does not record it)"
    else:
        sources["steps"] = "option"
    targets = "(" + "|".join(re.escape(n) for n in denoiser) + ")"
    return RetrainSettings(targets, len(denoiser), int(rank), float(alpha), int(steps), asked.lr, asked.batch,
                           asked.seed, sources, tuple(notes))


def retrain(pipe, images, captions, settings: RetrainSettings, checkpoint=None, progress=None,
            safety=None, anchor_prompts=None):
    """Train the repaired adapter; returns the finetune result.

    Without ``anchor_prompts``: modular (on the base alone, the safety module never seen). With them
    (and ``safety``): anchored — on top of the merged safety module, its predictions on the anchor
    (concept) prompts pinned to the safe model's, so it can repair what the safety module damaged
    in the candidate's domain without learning the concept back.
    """
    from auditkit.train.finetune import FinetuneConfig, finetune

    mode = "on-top" if anchor_prompts else "modular"
    cfg = FinetuneConfig(mode=mode, targets=settings.targets, rank=settings.rank, alpha=settings.alpha,
                         steps=settings.steps, lr=settings.lr, batch=settings.batch, seed=settings.seed)
    return finetune(pipe, images, captions, cfg, safety=safety if anchor_prompts else None, progress=progress,
                    checkpoint=checkpoint, anchor_prompts=anchor_prompts)
