"""A full model's update: its difference to the model it was made from, tensor by tensor.

An erased checkpoint's safety update is ΔT = T_erased − T₀ for every tensor T (T₀: the base's); a
full fine-tune's update is T_cand − T_start, T_start the model it was trained from (the base, or the
safe model: the base with the safety module applied). Both are held two ways:

* exactly, per tensor (:class:`TensorDeltas`, every tensor that differs, norms and biases included):
  what the dynamic scan and the data-free checks apply, so they run the model itself;
* per linear/conv module, as a truncated SVD of ΔW keeping a stated share of its energy (or a stated
  rank; :func:`auditkit.lora.truncation.truncate`), recorded with the rank and energy it keeps:
  what the static scan and ``auditkit extract`` work on. Energy 1 keeps every direction (exact).

Modules whose difference is exactly zero are skipped and counted; changed tensors outside the
modules' weights (norms, embeddings, a bias of an unchanged module) are listed: the static scan does
not see them, the dynamic scan applies them.

Example:
    >>> base = resolve_base("lab")                                               # doctest: +SKIP
    >>> adapter = read_full_model("esd-unet/", base, base.architecture)          # doctest: +SKIP
    >>> adapter.update.summary()["modules_changed"]                              # doctest: +SKIP
    64
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.adapter import Adapter, Coverage, LoraModule
from auditkit.lora.truncation import DEFAULT_ENERGY, truncate
from auditkit.models.architectures import Architecture
from auditkit.models.base import Base
from auditkit.models.checkpoint import Checkpoint, open_checkpoint

ALGORITHM = "checkpoint"  # LoraModule.algorithm of a module read from a full model


class TensorDeltas(dict):
    """Exact differences of a full model to its reference: canonical tensor name -> ΔT (float32, the
    tensor's own shape), for the tensors that differ."""

    def components(self) -> set[str]:
        return {n.split(".", 1)[0] for n in self}


@dataclass
class Reference:
    """The model a full model is compared with: the base, optionally with another full model's tensors
    over it (the erased model a candidate was fine-tuned from) or a LoRA merged into it."""

    base: Checkpoint
    model: Checkpoint | None = None
    lora: dict[str, LoraModule] | None = None
    label: str = "base"

    def source(self, name: str) -> Checkpoint | None:
        if self.model is not None and name in self.model.tensors:
            return self.model
        return self.base if name in self.base.tensors else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source(name).tensors[name].shape

    def array(self, name: str) -> np.ndarray:
        """The reference tensor in float64 (a merged LoRA's update added to its module's weight and bias)."""
        value = self.source(name).array(name).astype(np.float64)
        module, _, param = name.rpartition(".")
        m = (self.lora or {}).get(module)
        if m is not None and param == "weight":
            value = value + m.delta().reshape(value.shape)
        elif m is not None and param == "bias" and m.bias is not None:
            value = value + m.bias
        return value


@dataclass(frozen=True)
class ModuleTruncation:
    """How one module's difference is held: its rank and the share of ‖ΔW‖² it keeps."""

    rank: int
    energy_kept: float
    norm: float  # ‖ΔW‖_F of the whole difference
    method: str  # "randomized" or "dense"


@dataclass
class FullModelUpdate:
    """A full model's update relative to :attr:`reference` (see the module docstring)."""

    checkpoint: Checkpoint
    reference: Reference
    compared_with: str  # "base" or "safety": the model it was made from
    energy: float | None  # the share of energy kept per module (None: fixed rank)
    rank: int | None
    truncation: dict[str, ModuleTruncation] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)  # modules whose difference is exactly zero
    outside: list[str] = field(default_factory=list)  # changed tensors outside the modules' weights
    shared: list[str] = field(default_factory=list)  # tensors compared with the reference
    # what the dynamic scan's configurations add the update to, when not the reference: a candidate declared
    # as fine-tuned from the base is still rendered as itself over the safe model (see :meth:`rendered_deltas`)
    rendered_over: Reference | None = None
    _deltas: TensorDeltas | None = field(default=None, repr=False)
    _rendered: TensorDeltas | None = field(default=None, repr=False)

    def deltas(self) -> TensorDeltas:
        """Every tensor that differs from the reference, exactly (computed once, float64 then stored float32)."""
        if self._deltas is None:
            self._deltas = self._against(self.reference)
        return self._deltas

    def rendered_deltas(self) -> TensorDeltas:
        """The tensors the dynamic scan adds: :meth:`deltas`, or the difference to :attr:`rendered_over`.

        A full fine-tune is run as it is. Rendered over the safe model, the difference to the safe model
        gives the checkpoint itself at multiplier 1, whatever it was declared to be trained from; the
        difference to the base would render checkpoint + safety update, a model nobody runs and a safer
        one than the checkpoint (and, for a checkpoint wrongly declared as trained from the base, the
        safety update twice)."""
        if self.rendered_over is None:
            return self.deltas()
        if self._rendered is None:
            self._rendered = self._against(self.rendered_over)
        return self._rendered

    @property
    def rendered_label(self) -> str:
        return (self.rendered_over or self.reference).label

    def _against(self, reference: Reference) -> TensorDeltas:
        out = TensorDeltas()
        for name in self.shared:
            d = self.checkpoint.array(name).astype(np.float64) - reference.array(name)
            if d.any():
                out[name] = d.astype(np.float32)
        return out

    def dense(self, module: str) -> np.ndarray:
        """A module's exact ΔW (float64, flattened to out × in·kh·kw)."""
        weight = f"{module}.weight"
        d = self.checkpoint.array(weight).astype(np.float64) - self.reference.array(weight)
        return d.reshape(d.shape[0], -1)

    def summary(self, listed: int = 50) -> dict:
        kept = [t.energy_kept for t in self.truncation.values()]
        return {
            "form": self.checkpoint.form,
            "naming": self.checkpoint.naming if self.checkpoint.form == "single file" else None,
            "components": list(self.checkpoint.components),
            "compared_with": self.compared_with,
            "reference": self.reference.label,
            "rendered_over": self.rendered_label,
            "energy": self.energy,
            "rank": self.rank,
            "modules_changed": len(self.truncation),
            "modules_unchanged": len(self.unchanged),
            "tensors_compared": len(self.shared),
            "changed_outside_modules": self.outside[:listed],
            "changed_outside_modules_count": len(self.outside),
            "min_energy_kept": min(kept) if kept else None,
            "ranks": sorted({t.rank for t in self.truncation.values()}),
            "truncation": {n: {"rank": t.rank, "energy_kept": t.energy_kept, "norm": t.norm, "method": t.method}
                           for n, t in self.truncation.items()},
        }


def _checked_shared(checkpoint: Checkpoint, reference: Reference) -> tuple[list[str], list[str]]:
    """Tensors the checkpoint shares with the reference, and those it has alone; refuses another architecture."""
    shared = [n for n in checkpoint.tensors if reference.source(n) is not None and checkpoint.tensors[n].is_float]
    alone = [n for n in checkpoint.tensors if reference.source(n) is None]
    if not shared or len(alone) > len(shared):
        example = f" (e.g. {alone[0]})" if alone else ""
        raise BadInput(checkpoint.path, f"{len(alone)} of its {len(checkpoint.tensors)} tensors are not in the base"
                                        f"{example}: a model of another architecture than the base")
    for name in shared:
        mine, theirs = checkpoint.tensors[name].shape, reference.shape(name)
        if tuple(mine) != tuple(theirs):
            raise BadInput(checkpoint.path, f"tensor {name} is {list(mine)} here but {list(theirs)} in the "
                                            f"{reference.label}: a model of another architecture than the base")
    return shared, alone


def difference(checkpoint: Checkpoint, reference: Reference, arch: Architecture, energy: float | None = None,
               rank: int | None = None, compared_with: str = "base") -> tuple[dict[str, LoraModule],
                                                                                FullModelUpdate]:
    """The truncated per-module update of ``checkpoint`` against ``reference``, and its exact record.

    Args:
        checkpoint: the full model.
        reference: what it was made from.
        arch: the architecture whose linear/conv modules are truncated (the base's).
        energy: share of each module's ‖ΔW‖² to keep (default :data:`DEFAULT_ENERGY`; 1 = exact).
        rank: keep this rank per module instead.
        compared_with: ``base`` or ``safety``, for the report.
    """
    if energy is None and rank is None:
        energy = DEFAULT_ENERGY
    shared, _ = _checked_shared(checkpoint, reference)
    update = FullModelUpdate(checkpoint, reference, compared_with, energy, rank, shared=shared)
    modules: dict[str, LoraModule] = {}
    covered: set[str] = set()
    in_checkpoint = set(shared)
    for name in sorted(arch.modules):
        weight, bias = f"{name}.weight", f"{name}.bias"
        if weight not in in_checkpoint:
            continue
        covered.add(weight)
        d = update.dense(name)
        if not d.any():
            update.unchanged.append(name)
            continue
        t = truncate(d, energy=energy, rank=rank)
        db = None
        if bias in in_checkpoint:
            covered.add(bias)
            db = checkpoint.array(bias).astype(np.float64) - reference.array(bias)
            db = db if db.any() else None
        modules[name] = LoraModule(name, t.down, t.up, 1.0, ALGORITHM, "exact" if energy == 1 else "truncated",
                                   bias=db)
        update.truncation[name] = ModuleTruncation(t.rank, t.energy_kept, float(np.sqrt(t.total_energy)), t.method)
    for name in shared:
        if name not in covered and (checkpoint.array(name).astype(np.float64) != reference.array(name)).any():
            update.outside.append(name)
    return modules, update


@cache
def _open_base_cached(folder: str) -> Checkpoint:
    return open_checkpoint(Path(folder))


def open_base(base: Base) -> Checkpoint:
    """The base (:class:`~auditkit.models.base.Base`) as a :class:`Checkpoint` (indexed once per process)."""
    from auditkit.lab.bases import BASE_HELP

    folder = base.folder
    if not (folder / "model_index.json").is_file():
        raise BadInput(folder, f"not a diffusers pipeline folder (no model_index.json); use {BASE_HELP}")
    return _open_base_cached(str(folder.resolve()))


def missing_weights(checkpoint: Checkpoint, shared: list[str], arch: Architecture) -> list[str]:
    """Weights of the architecture's modules, in the components ``checkpoint`` holds, that it does not hold
    as floating-point tensors of the base's (absent, or retyped to integers): they cannot be compared, so they
    count against coverage instead of passing for unchanged modules."""
    components, held = set(checkpoint.components), set(shared)
    return [f"{name}.weight" for name in sorted(arch.modules)
            if name.split(".", 1)[0] in components and f"{name}.weight" not in held]


def read_full_model(path: str | Path, base: Base, arch: Architecture, energy: float | None = None,
                    rank: int | None = None, reference: Reference | None = None,
                    compared_with: str = "base") -> Adapter:
    """A full model (erased checkpoint or full fine-tune) as an :class:`Adapter` whose modules are its
    truncated update against ``reference`` (default: the base) and whose ``update`` holds it exactly.

    Args:
        path: a pipeline folder, a component folder or a ``.safetensors`` file (see
            :mod:`auditkit.models.checkpoint`).
        base: the resolved base (:func:`auditkit.models.base.resolve_base`).
        arch: the base's architecture.
        energy, rank: the truncation (see :func:`difference`).
        reference: the model it was made from (default: the base).
        compared_with: ``base`` or ``safety``, for the report.
    """
    base_model = open_base(base)
    checkpoint = open_checkpoint(path, base_model, arch)
    reference = reference or Reference(base_model)
    modules, update = difference(checkpoint, reference, arch, energy, rank, compared_with)
    alone = [n for n in checkpoint.tensors if reference.source(n) is None]
    missing = missing_weights(checkpoint, update.shared, arch)
    coverage = Coverage(mapped=list(update.shared), unmapped=sorted(checkpoint.unmapped + alone + missing),
                        ignored=list(checkpoint.ignored))
    notes = list(checkpoint.notes)
    what = f"rank {rank}" if update.energy is None else f"energy {update.energy:g}"
    notes.append(f"a full model ({checkpoint.form}) compared with the {reference.label}: {len(modules)} modules "
                 f"changed (truncated SVD, {what}), {len(update.unchanged)} unchanged")
    if update.outside:
        notes.append(f"{len(update.outside)} changed tensors lie outside the linear/conv modules' weights (e.g. "
                     f"{update.outside[0]}): the static scan does not see them; the dynamic scan renders them")
    if alone:
        notes.append(f"{len(alone)} of its tensors are not in the base (e.g. {alone[0]}): not compared, not rendered")
    if missing:
        notes.append(f"{len(missing)} module weights of its components are missing or not floating-point (e.g. "
                     f"{missing[0]}): not compared (counted against coverage); the dynamic scan renders the base's")
    return Adapter(path=checkpoint.path, sha256=checkpoint.sha256, size=checkpoint.size,
                   layout=f"full model ({checkpoint.form})", architecture=arch, modules=modules,
                   metadata=checkpoint.metadata, coverage=coverage, notes=notes, architecture_candidates=[arch.name],
                   update=update)
