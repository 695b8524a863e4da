"""``auditkit extract``: a full model's update written as a LoRA file.

An erased checkpoint's safety update, extracted once, can be published and reused as a Safety LoRA
(scanned against, composed with, repaired against), and a full fine-tune's update can be handled as
any adapter. The update is the model's difference to the base, module by module
(:mod:`auditkit.models.difference`), as a truncated SVD keeping a stated share of each module's
energy (``energy``, default 0.99; 1 keeps every direction: exact) or a fixed ``rank`` — what kohya's
``extract_lora_from_models.py`` does, with the rank chosen per module and the energy kept recorded.

The file is in kohya layout (up = U·S, down = Vᵀ, alpha = rank: scale 1), readable by auditkit and by
diffusers' ``load_lora_weights``, and its safetensors metadata says how it was made (``auditkit.extract.*``:
source and base by name (no local path) with their SHA-256, energy or rank, the least energy kept, unchanged
modules, what a LoRA cannot hold; ``auditkit.version``). A LoRA holds the linear/conv weights' update only:
changed biases, norms and embeddings are counted in the metadata and in :class:`Extracted`, not written.

Example:
    >>> result = extract("esd-unet/", "sd15-pipeline/", Path("esd-safety.safetensors"))  # doctest: +SKIP
    >>> result.modules, result.min_energy_kept >= 0.99                                     # doctest: +SKIP
    (160, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit import __version__
from auditkit.errors import BadInput, Unscannable
from auditkit.fsutil import check_writable
from auditkit.lora.adapter import LoraModule
from auditkit.lora.formats import KOHYA
from auditkit.lora.write import save_adapter
from auditkit.models.base import Base

PREFIX = "auditkit.extract."


@dataclass(frozen=True)
class Extracted:
    """What :func:`extract` wrote."""

    path: Path
    modules: int  # modules written (changed linear/conv weights)
    unchanged: int  # modules whose difference is exactly zero
    ranks: list[int]
    min_energy_kept: float
    not_written: list[str]  # changed tensors a LoRA cannot hold (biases, norms, embeddings)
    metadata: dict[str, str]


def _check_out(out: Path, model: Path) -> None:
    if out.suffix != ".safetensors":
        raise BadInput(out, "output must be a .safetensors file")
    if out.is_dir():
        raise BadInput(out, "output is a folder; give a .safetensors file path")
    model = model.resolve()
    target = out.resolve()
    if target == model or model in target.parents:
        raise BadInput(out, "output would overwrite or lie inside the model it is extracted from; choose another path")
    check_writable(out)  # a read-only or impossible --out fails now, not after the SVDs


def extract(model: str | Path, base: Base, out: str | Path, energy: float | None = None,
            rank: int | None = None) -> Extracted:
    """Write ``model``'s update (its difference to ``base``) to ``out`` as a kohya LoRA.

    Args:
        model: a full model: pipeline folder, component folder or single ``.safetensors`` file.
        base: the base it is compared with (:func:`auditkit.models.base.resolve_base`).
        out: the ``.safetensors`` file to write (atomically; nothing is written on an error).
        energy: share of each module's ‖ΔW‖² to keep, in (0, 1] (default 0.99).
        rank: keep this rank per module instead.

    Raises:
        BadInput: bad settings, a bad model or base (see :mod:`auditkit.models.checkpoint`), a bad output path.
        Unscannable: the model changes no linear/conv module of the base.
    """
    from auditkit.models.difference import open_base, read_full_model

    model, out = Path(model), Path(out)
    if energy is not None and rank is not None:
        raise BadInput(None, "give energy or rank, not both")
    if energy is not None and not 0 < energy <= 1:
        raise BadInput(None, f"energy must lie in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise BadInput(None, f"rank must be at least 1, got {rank}")
    _check_out(out, model)
    arch = base.architecture
    adapter = read_full_model(model, base, arch, energy=energy, rank=rank)
    update = adapter.update
    if not adapter.modules:
        raise Unscannable(model, f"its linear/conv weights equal the base's ({len(update.unchanged)} modules "
                                 "compared): there is no update to extract")
    modules = {n: LoraModule(n, m.down.astype(np.float32), m.up.astype(np.float32), 1.0)
               for n, m in adapter.modules.items()}
    not_written = sorted([f"{n}.bias" for n, m in adapter.modules.items() if m.bias is not None] + update.outside)
    summary = update.summary()
    metadata = {
        "auditkit.version": __version__,
        "auditkit.kind": "extracted",
        PREFIX + "source": model.name,  # names and hashes only: a shared LoRA carries no local paths
        PREFIX + "source_form": update.checkpoint.form,
        PREFIX + "source_sha256": adapter.sha256,
        PREFIX + "base": Path(base.name).name,  # "lab", or the base folder's name
        PREFIX + "base_sha256": open_base(base).sha256,
        PREFIX + "method": "truncated SVD of each module's difference to the base (randomized, dense fallback)",
        PREFIX + ("rank" if rank is not None else "energy"): str(rank if rank is not None else update.energy),
        PREFIX + "min_energy_kept": repr(summary["min_energy_kept"]),
        PREFIX + "modules_unchanged": str(len(update.unchanged)),
        PREFIX + "not_written": json.dumps({"count": len(not_written), "first": not_written[:20]}),
    }
    path = save_adapter(modules, out, arch, layout=KOHYA, metadata=metadata)
    return Extracted(path, len(modules), len(update.unchanged), summary["ranks"], summary["min_energy_kept"],
                     not_written, metadata)
