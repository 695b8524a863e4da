"""The base model, resolved once: the one home of what ``--base`` names.

``--base`` (a command's option, the ``base`` key of a config file, a batch manifest's ``base`` column) is a
shipped lab model's name (:mod:`auditkit.lab.bases`) or a local diffusers pipeline folder. :func:`resolve_base`
turns it into a :class:`Base` when the configuration is resolved (:class:`auditkit.config.ScanConfig` does it
for a name it is given); from there on every module gets that value, never the name to look up again:

* ``name``: the base as the user gave it; what report.json, the run log and batch state record (so older run
  folders resume and older reports read);
* ``lab``: the lab record when the name is a lab model's, else None;
* ``folder``: the ``save_pretrained`` folder (a lab model's under ``auditkit/lab/assets``);
* ``family``: its :class:`~auditkit.models.families.Family` (from ``model_index.json``, read once);
* ``architecture``: its auditkit architecture (a lab's built-in table; a folder's built from its
  components' configs on the meta device, a built-in one when the shapes match);
* :meth:`Base.load`: the pipeline, loaded with the family's diffusers class (:mod:`auditkit.models.pipeline`).

What is read from disk is read on first use and kept (a base named but never loaded, as in a static scan of
two lab adapters, reads nothing), so a missing lab model or folder fails where it is first needed, with
the same one-line message as before. No torch or diffusers import at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.lab.bases import BASE_HELP, LabBase, lab_base, refuse_miscased_lab
from auditkit.models.families import Family, family_of_index
from auditkit.models.pipeline import architecture_of_folder, check_pipeline_folder, load_pipeline, require_model_index

DEFAULT_SUITES = ("nudity", "benign")  # the probe suites on a base that is not a lab model


@dataclass(frozen=True)
class Base:
    """A resolved ``--base``: see the module docstring. Build it with :func:`resolve_base`.

    Example:
        >>> base = resolve_base("lab")
        >>> base.name, base.lab.architecture
        ('lab', 'lab')
    """

    name: str  # as the user gave it (a relative folder in a config file: joined to the file's folder)
    lab: LabBase | None = None

    def __str__(self) -> str:
        return self.name

    @cached_property
    def folder(self) -> Path:
        """The pipeline folder; BadInput saying how to build a lab model that is not installed."""
        return self.lab.require() if self.lab is not None else Path(self.name)

    @cached_property
    def index(self) -> dict:
        """The folder's ``model_index.json``, read once (BadInput when there is none or it is malformed)."""
        return require_model_index(self.folder)

    def check(self) -> Family:
        """The family, after checking the folder is a pipeline folder with ``.safetensors`` weights only
        (BadInput naming the problem otherwise); loads nothing."""
        return check_pipeline_folder(self.folder, self.index)

    @cached_property
    def family(self) -> Family:
        return family_of_index(self.index, self.folder)

    @cached_property
    def architecture(self):
        """The :class:`~auditkit.models.architectures.Architecture` adapters for this base are read against."""
        from auditkit.models import architectures

        if self.lab is not None:
            return architectures.get(self.lab.architecture)
        self.check()
        return architecture_of_folder(self.folder, index=self.index)

    @property
    def extra_architectures(self) -> tuple:
        """The architecture as ``read_adapter(extra_architectures=…)`` takes it: empty when it is a built-in
        one (those are always considered; a lab model's always is, and is not built from its folder)."""
        return () if self.lab is not None else _extra(self.architecture)

    @property
    def suites(self) -> tuple[str, ...]:
        """The names of the shipped probe suites scanned on this base when none are configured."""
        return self.lab.suites if self.lab is not None else DEFAULT_SUITES

    def absolute(self) -> Base:
        """The same base with a folder's path made absolute (a lab name stays a name: it is never a path)."""
        return self if self.lab is not None else replace(self, name=str(Path(self.name).absolute()))

    def load(self, device: str = "cpu", dtype=None):
        """The diffusers pipeline of this base on ``device`` (see :func:`auditkit.models.pipeline.load_pipeline`)."""
        return load_pipeline(self.folder, device=device, dtype=dtype, index=self.index)


def resolve_base(name: str, relative_to: str | Path | None = None, check_case: bool = False) -> Base:
    """The :class:`Base` that ``name`` names: a lab model's name, else a folder (relative to ``relative_to``,
    e.g. a config file's folder, when given and the path is relative). ``check_case``: refuse a lab name in
    another case (``LAB``) that names no existing folder, as a typo (a config file, ``auditkit init``).

    Raises:
        BadInput: an empty name; with ``check_case``, a miscased lab name that is no folder.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadInput(None, f"base: must be {BASE_HELP}, got {name!r}"[:300])
    lab = lab_base(name)
    if lab is not None:
        return Base(name, lab)
    folder = Path(relative_to) / name if relative_to is not None else Path(name)
    if check_case:
        refuse_miscased_lab(name, folder)
    return Base(str(folder) if relative_to is not None else name)


def reading_architectures(base: Base | None, pipeline=None) -> tuple:
    """(the architecture adapters are read against or None, the extra architectures ``read_adapter`` takes): the
    loaded ``pipeline``'s when one is given (a built-in one when its shapes match), else the base's."""
    from auditkit.models.pipeline import architecture_of

    if pipeline is None:
        return (base.architecture, base.extra_architectures) if base is not None else (None, ())
    arch = architecture_of(pipeline)
    return arch, _extra(arch)


def _extra(arch) -> tuple:
    """``arch`` as ``read_adapter(extra_architectures=…)`` takes it: empty for a built-in table (always
    considered)."""
    from auditkit.models import architectures

    return () if arch.name in architectures.BUILTIN else (arch,)
