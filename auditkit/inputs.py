"""Safety modules and candidates as users hold them: adapter files, or full models.

A **safety module** is a Safety LoRA, or the erased model itself (ESD, UCE, MACE and AdvUnlearn ship
full UNets, text encoders or pipelines): its update is its difference to the base. A **candidate**
is an adapter, or a full fine-tuned checkpoint: its update is its difference to the model it was
trained from, ``candidate_from``: the safe model (the base with the safety module applied: the usual
case, fine-tuning a published safe model) or the base. That choice is the static scan's: the dynamic
scan and the data-free checks always run a full fine-tune as it is (its difference to the safe model,
added over the safe model), since a checkpoint is used as it is and a wrong ``base`` would otherwise
render the safety update twice. Either way both become an
:class:`~auditkit.lora.adapter.Adapter` (a full model's modules are its truncated update, its
``update`` the exact one; :mod:`auditkit.models.difference`), so every later stage reads one form.

Which kind a path is (:data:`INPUT_KINDS`, first match wins): a folder, or a ``.safetensors`` file whose keys
are a full model's (:func:`auditkit.lora.identify.is_full_model`), is a full model; anything else is
read as an adapter (whose reader refuses pickles and names what a file is when it holds no adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from auditkit.config import CANDIDATE_FROM
from auditkit.errors import BadInput
from auditkit.lora.adapter import Adapter, read_adapter
from auditkit.lora.identify import is_full_model
from auditkit.lora.io import PICKLE_SUFFIXES, open_safetensors
from auditkit.models.architectures import Architecture
from auditkit.models.base import Base


@dataclass(frozen=True)
class InputKind:
    name: str  # Adapter.kind
    matches: Callable[[Path], bool]


def _full_model(path: Path) -> bool:
    if path.is_dir():
        return True
    if not path.is_file() or path.suffix.lower() in PICKLE_SUFFIXES:
        return False  # the adapter reader refuses it with its own message
    st = open_safetensors(path)
    return is_full_model(list(st.tensors), {k: t.shape for k, t in st.tensors.items()})


INPUT_KINDS: tuple[InputKind, ...] = (InputKind("full model", _full_model), InputKind("adapter", lambda p: True))


def input_kind(path: str | Path) -> str:
    """``full model`` or ``adapter`` (see :data:`INPUT_KINDS`)."""
    path = Path(path)
    return next(k.name for k in INPUT_KINDS if k.matches(path))


def _need_base(path: Path, base: str | None, role: str) -> str:
    if base is None:
        raise BadInput(path, f"the {role} is a full model (an erased checkpoint or a fine-tune): its update is its "
                             "difference to the base, so give the base (--base)")
    return base


def with_base_weights(adapter: Adapter, base: Base | None) -> Adapter:
    """The adapter with its DoRA modules made exact from the base's weights (read from the base's
    safetensors, no model loaded); unchanged without DoRA modules or without a base."""
    if base is None or not any(m.needs_base for m in adapter.modules.values()):
        return adapter
    from auditkit.models.base_weights import BaseWeights

    return adapter.with_base(BaseWeights.for_base(base))


def reference_for(safety: Adapter | None, base: Base, candidate_from: str):
    """The model a full-model candidate is compared with: the safe model (``candidate_from="safety"``:
    the erased model over the base, or the base with the safety adapter merged) or the base."""
    from auditkit.models.difference import Reference, open_base

    base_model = open_base(base)
    if safety is None or candidate_from == "base":
        return Reference(base_model, label="base")
    if safety.update is not None:
        return Reference(base_model, model=safety.update.checkpoint, label="safe model (the erased model)")
    return Reference(base_model, lora=safety.modules, label="safe model (base + safety adapter)")


def read_input(path: str | Path, role: str, base: Base | None = None, base_arch: Architecture | None = None,
               arch: str | Architecture | None = None, extra_architectures: tuple = (), energy: float | None = None,
               reference=None, compared_with: str = "base") -> Adapter:
    """One safety module or candidate, adapter or full model, as an :class:`Adapter`.

    Args:
        path: the file or folder.
        role: ``safety`` or ``candidate`` (for messages).
        base: the resolved base (:func:`auditkit.models.base.resolve_base`; a full model needs it).
        base_arch: the base's architecture (computed from ``base`` when not given).
        arch, extra_architectures: as for :func:`~auditkit.lora.adapter.read_adapter`.
        energy: the share of each full-model module's difference energy the truncation keeps.
        reference, compared_with: what a full model is compared with (default: the base).
    """
    path = Path(path)
    if input_kind(path) == "full model":
        from auditkit.models.difference import read_full_model

        base = _need_base(path, base, role)
        return read_full_model(path, base, base_arch or base.architecture, energy=energy,
                               reference=reference, compared_with=compared_with)
    adapter = read_adapter(path, arch=arch, extra_architectures=extra_architectures)
    if base is not None:
        adapter = for_base(adapter, role, base, base_arch or base.architecture, arch is None)
    return with_base_weights(adapter, base)


def for_base(adapter: Adapter, role: str, base: Base, base_arch: Architecture, may_reread: bool = True) -> Adapter:
    """``adapter`` as it changes ``base``, checked before any model loads: read again for the base's
    architecture when it fits several and another was assumed (``may_reread``: no ``--arch`` was given);
    BadInput naming both architectures when it does not fit the base at all (an SD1.5 LoRA on an SDXL base
    would fail deep inside the model, or change nothing)."""
    if adapter.architecture.name == base_arch.name:
        return adapter
    if may_reread and base_arch.name in adapter.architecture_candidates:
        return read_adapter(adapter.path, arch=base_arch)
    raise BadInput(adapter.path, f"the {role} adapts {adapter.architecture.name} ({adapter.architecture.label}): "
                                 f"another architecture than --base {base} ({base_arch.name}: {base_arch.label})")


def read_pair(candidate_path: str | Path, safety_path: str | Path, arch: str | None = None,
              extra_architectures: tuple = (), base: Base | None = None, base_arch: Architecture | None = None,
              energy: float | None = None, candidate_from: str = "safety") -> tuple[Adapter, Adapter]:
    """Read both for one architecture, or refuse: they must change the same model.

    Adapters read beside a full model are read against the base's architecture. A full-model candidate
    is compared with the model it was fine-tuned from (``candidate_from``)."""
    if candidate_from not in CANDIDATE_FROM:
        raise ValueError(f"candidate_from must be one of {', '.join(CANDIDATE_FROM)}")
    full = [p for p in (safety_path, candidate_path) if input_kind(p) == "full model"]
    if full:
        base = _need_base(Path(full[0]), base, "safety module" if full[0] == safety_path else "candidate")
        base_arch = base_arch or base.architecture
        arch = arch or base_arch
    common = {"base": base, "base_arch": base_arch, "arch": arch, "extra_architectures": extra_architectures,
              "energy": energy}
    safety = read_input(safety_path, "safety module", **common)
    if input_kind(candidate_path) == "full model":
        candidate = read_input(candidate_path, "candidate", **common,
                               reference=reference_for(safety, base, candidate_from), compared_with=candidate_from)
        if candidate_from != "safety":  # the static scan compares it with the base; the dynamic scan runs it as is
            candidate.update.rendered_over = reference_for(safety, base, "safety")
        return candidate, safety
    candidate = read_input(candidate_path, "candidate", **common)
    if candidate.architecture.name != safety.architecture.name:
        # Small adapters can fit several architectures; settle on one both fit.
        if safety.architecture.name in candidate.architecture_candidates:
            candidate = with_base_weights(read_adapter(candidate_path, arch=safety.architecture), base)
        elif candidate.architecture.name in safety.architecture_candidates and safety.update is None:
            safety = with_base_weights(read_adapter(safety_path, arch=candidate.architecture), base)
        else:
            raise BadInput(candidate_path, f"adapts {candidate.architecture.name} but the safety module {safety_path} "
                                           f"changes {safety.architecture.name}; they must target the same model")
    return candidate, safety
