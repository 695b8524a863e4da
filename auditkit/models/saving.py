"""A full model written to disk: a pipeline component with an exact update applied, as a diffusers
component folder (``save_pretrained``, safetensors), the form :mod:`auditkit.models.checkpoint` reads back.

Written into a temporary folder beside the target and renamed into place, so a failed or killed write
leaves no half-written model; an existing target is refused, never merged into.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import check_writable


def check_new_folder(folder: str | Path) -> Path:
    """Raise :class:`BadInput` unless ``folder`` does not exist yet and can be created."""
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        raise BadInput(folder, "output folder already exists; give a new folder (nothing is overwritten)")
    check_writable(folder)
    return folder


def save_component(pipe, component: str, updates, folder: str | Path) -> Path:
    """Write ``pipe``'s ``component`` with ``updates`` (a :class:`~auditkit.models.difference.TensorDeltas`
    or LoRA modules, canonical names) added exactly, as a component folder at ``folder``; the pipeline is
    left as it was."""
    from auditkit.models.attach import composed

    folder = check_new_folder(folder)
    model = pipe.components[component]
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with composed(model, (updates, 1.0), component=component):
            model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
