"""The shipped lab models as ``--base`` names: one record each, the one home of the list and the only module
that tests a name for being a lab model's.

:func:`auditkit.models.base.resolve_base` looks a ``--base`` name up here once, when the configuration is
resolved; the :class:`~auditkit.models.base.Base` it builds carries the record (its folder under
``auditkit/lab/assets``, its architecture, its default suites). No torch or diffusers import here.

* ``lab`` -- the SD-style lab (``StableDiffusionPipeline``, UNet, DDPM/DDIM; :mod:`auditkit.lab.model`);
* ``lab-dit`` -- the Flux-family lab (``FluxPipeline``, MMDiT transformer, flow matching; :mod:`auditkit.lab.dit`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from auditkit.errors import BadInput


@dataclass(frozen=True)
class LabBase:
    name: str  # as --base takes it
    label: str
    folder: str  # under auditkit/lab/assets
    architecture: str  # the built-in architecture table (auditkit.models.architectures)
    train: str  # how to (re)build it, for the error when it is missing
    suites: tuple[str, ...] = ("lab-cross", "lab-neon")  # the default probe suites on this base
    # its shipped safety modules (files under assets/adapters): the faithful defaults (erasure with a preservation
    # term or preserved concepts: the rest of the model kept close to the base) and, for comparison, earlier
    # destructive ones (plain ESD: the cross erased and the colours with it); measured by benchmarks/lab_safety.py
    safety: tuple[str, ...] = ()
    destructive: tuple[str, ...] = ()

    def path(self) -> Path:
        """The model's ``save_pretrained`` folder (present or not)."""
        return Path(str(resources.files("auditkit.lab").joinpath("assets").joinpath(self.folder)))

    def adapter(self, file: str) -> Path:
        """A shipped safety module's path (present or not)."""
        return Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters", file)))

    def available(self) -> bool:
        return (self.path() / "model_index.json").is_file()

    def require(self) -> Path:
        """The folder; BadInput saying how to build it when it is not installed."""
        if not self.available():
            raise BadInput(self.path(), f"the {self.name} model is not installed ({self.train})")
        return self.path()


LAB_BASES: dict[str, LabBase] = {b.name: b for b in (
    LabBase("lab", "the SD-style lab (tiny StableDiffusionPipeline)", "pipeline", "lab",
            "run scripts/train_lab.py",
            safety=("safety-esd-u.safetensors", "safety-uce.safetensors"),
            destructive=("safety-esd-u-destructive.safetensors", "safety-esd-x-destructive.safetensors")),
    LabBase("lab-dit", "the Flux-family lab (tiny FluxPipeline, a diffusion transformer)", "pipeline-dit", "lab-dit",
            "run scripts/train_lab.py --stages latents,dit,dit-guidance,export-dit,eval-dit",
            safety=("dit-safety-esd-u.safetensors", "dit-safety-uce.safetensors")),
)}

# the sampling settings of both lab models' adherence figures (their cards) and of the lab suites
SAMPLING_STEPS = 25
SAMPLING_GUIDANCE = 5.0

DEFAULT_BASE = "lab"  # the commands' --base when none is given (train, repair's data-driven methods)
BASE_HELP = f"{' or '.join(repr(n) for n in LAB_BASES)} (the shipped lab models) or a local diffusers folder"


def lab_base(base: str | None) -> LabBase | None:
    """The lab model named ``base``, or None when ``base`` is not a lab name (a folder, or no base)."""
    return LAB_BASES.get(base) if isinstance(base, str) else None


def refuse_miscased_lab(base: str, folder: Path) -> None:
    """BadInput when ``base`` is a lab name in another case (``LAB``) and ``folder``, the folder it then
    names, does not exist: a typo, not a pipeline folder called ``LAB``."""
    close = next((name for name in LAB_BASES if name.lower() == base.lower()), None)
    if close is not None and close != base and not os.path.lexists(folder):
        raise BadInput(folder, f"base: no such folder, and lab names are lower-case (did you mean '{close}'?)")
