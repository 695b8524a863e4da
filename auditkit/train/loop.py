"""The optimisation loop every training shares: resume, step, check, report, checkpoint.

A training supplies ``step_loss(step)`` (the loss tensor of one step, drawn from its own random streams);
this loop owns what is the same everywhere: resuming from a checkpoint of the same fingerprint (parameters,
AdamW state and both random streams, so a resumed run ends with the same weights as an uninterrupted one),
refusing a non-finite loss, the optimiser step, progress, and saving every ``every`` steps and at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from auditkit.train.lora import check_loss

StepProgress = Callable[[int, int, float], None]  # (step, steps, loss): a training's progress


def optimise(step_loss: Callable[[int], object], params: list, optimizer, steps: int, rng: np.random.Generator, gen,
             progress: StepProgress | None = None, checkpoint: str | Path | None = None, fingerprint: str = "",
             every: int = 50) -> list[float]:
    """Run ``steps`` optimisation steps (those a checkpoint already holds are skipped); returns every step's loss."""
    from auditkit.train import checkpoint as ckpt

    start, losses = 0, []
    if checkpoint is not None:
        resumed = ckpt.restore(checkpoint, fingerprint, params, optimizer, rng, gen)
        if resumed is not None:
            start, losses = resumed.step, resumed.losses
            if progress:
                progress(start, steps, losses[-1] if losses else float("nan"))
    for step in range(start, steps):
        loss = step_loss(step)
        losses.append(float(loss.detach()))
        check_loss(losses[-1], step + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, steps, losses[-1])
        if checkpoint is not None and ((step + 1) % every == 0 or step + 1 == steps):
            ckpt.save(checkpoint, step + 1, params, optimizer, rng, gen, losses, fingerprint)
    return losses
