"""The adapter pack a repair writes: the repaired fine-tuning adapter, the safety module it is meant
to be composed with, and a manifest saying how to compose them. With a safety adapter::

    pack/
      finetune.safetensors   the repaired adapter (kohya layout; Flux and SD3: diffusers layout)
      safety.safetensors     a byte-exact copy of the safety adapter
      combined.safetensors   both in one LoRA: factors concatenated along the rank (the same layout,
                             rank r_safe + r_ft, alpha = rank), for tools that load one file
      manifest.json          files, hashes, ranks, multipliers and the diffusers snippet

With a full-model safety module (an erased checkpoint) the pack holds ``finetune.safetensors`` and the
manifest: the erased model is not copied (it can be gigabytes) and cannot be one LoRA with the
fine-tuning adapter; the manifest names it (path, form, SHA-256) and its diffusers snippet loads it in
place of the base, then the adapter on top. How each kind of safety module is packed is one
:class:`PackLayout` record in :data:`LAYOUTS`.

Every file is written atomically; the pack never overwrites the inputs it was made from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from auditkit.errors import BadInput
from auditkit.fsutil import atomic_write_bytes, atomic_write_text
from auditkit.lora.adapter import Adapter, LoraModule, read_adapter
from auditkit.lora.write import save_adapter
from auditkit.models.architectures import Architecture
from auditkit.models.base import Base
from auditkit.repair.algebra import concatenate

if TYPE_CHECKING:
    from auditkit.models.checkpoint import Checkpoint

SCHEMA = "auditkit.pack/1"
FILES = {"finetune": "finetune.safetensors", "safety": "safety.safetensors", "combined": "combined.safetensors"}


def diffusers_snippet(folder: str) -> str:
    return (f'for name in ("safety", "finetune"): pipe.load_lora_weights({folder!r}, '
            f'weight_name=f"{{name}}.safetensors", adapter_name=name)\n'
            'pipe.set_adapters(["safety", "finetune"], adapter_weights=[1.0, 1.0])\n')


@dataclass(frozen=True)
class PackLayout:
    """How a repair is packed for one kind of safety module (:attr:`auditkit.lora.adapter.Adapter.kind`)."""

    files: tuple[str, ...]  # FILES roles written
    # (targets, safety, finetune, arch, method, out_dir, base, file layout) -> manifest entries
    write: Callable[..., dict]


def _with_adapter(targets, safety: Adapter, finetune, arch: Architecture, method: str, out_dir: Path, base,
                  layout: str) -> dict:
    atomic_write_bytes(targets["safety"], Path(safety.path).read_bytes())
    try:
        combined = concatenate((safety.modules, 1.0), (finetune, 1.0))
    except ValueError as exc:
        raise BadInput(safety.path, str(exc)) from None
    save_adapter(combined, targets["combined"], arch, layout, metadata={
        "auditkit.kind": "combined", "auditkit.repair": method,
        "auditkit.note": "safety + repaired fine-tuning adapter, factors concatenated along the rank"})
    return {
        "safety_source": {"kind": safety.kind, "path": str(safety.path), "sha256": safety.sha256},
        "compose": [{"file": FILES["safety"], "adapter_name": "safety", "weight": 1.0},
                    {"file": FILES["finetune"], "adapter_name": "finetune", "weight": 1.0}],
        "diffusers": diffusers_snippet(str(out_dir)),
        "single_file": {"file": FILES["combined"], "weight": 1.0,
                        "note": "equals safety + finetune at weight 1; scaling it scales both"},
    }


def _with_model(targets, safety: Adapter, finetune, arch: Architecture, method: str, out_dir: Path, base,
                layout: str) -> dict:

    if base is None:
        raise BadInput(safety.path, "a full-model safety module needs the base (--base) to be packed")
    folder = str(base.folder)
    checkpoint = safety.update.checkpoint
    load = checkpoint_snippet(checkpoint, folder, base.family.pipeline_class)
    return {
        "safety_source": {"kind": safety.kind, "path": str(safety.path), "sha256": safety.sha256,
                          "form": checkpoint.form, "components": list(checkpoint.components), "base": str(base)},
        "compose": [{"model": str(safety.path), "role": "safety", "weight": 1.0,
                     "note": "the erased model itself, in place of the base (its components over the base's)"},
                    {"file": FILES["finetune"], "adapter_name": "finetune", "weight": 1.0}],
        "diffusers": "import diffusers\n" + load + f"pipe.load_lora_weights({str(out_dir)!r}, "
                     'weight_name="finetune.safetensors", adapter_name="finetune")\n',
        "single_file": None,
        "note": "a full-model safety module and a LoRA cannot be one adapter file: load the erased model, then the "
                "fine-tuning adapter on top (the adapter was trained on the base, separately from the safety module)",
    }


def checkpoint_snippet(checkpoint: Checkpoint, base: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """diffusers code that puts ``checkpoint`` into ``pipe`` (a pipeline of ``base``): for a repair pack's manifest."""
    path = str(checkpoint.path)
    if checkpoint.form == "pipeline folder":
        return f"pipe = diffusers.{pipeline_class}.from_pretrained({path!r}, use_safetensors=True)\n"
    load = f"pipe = diffusers.{pipeline_class}.from_pretrained({base!r}, use_safetensors=True)\n"
    if checkpoint.form == "component folder":
        (component,) = checkpoint.components
        return load + f"pipe.{component} = type(pipe.{component}).from_pretrained({path!r}, use_safetensors=True)\n"
    if checkpoint.naming == "original" and checkpoint.components == ("transformer",):  # a BFL/SAI transformer file
        return load + (f"pipe.transformer = type(pipe.transformer).from_single_file({path!r}, config={base!r}, "
                       'subfolder="transformer")\n')
    if checkpoint.naming == "original":
        return f"pipe = diffusers.{pipeline_class}.from_single_file({path!r}, config={base!r})\n"
    lines = [load, "from safetensors.torch import load_file\n", f"state = load_file({path!r})\n"]
    for component in checkpoint.components:
        keys = "state" if checkpoint.naming == "component" else \
            f"{{k[{len(component) + 1}:]: v for k, v in state.items() if k.startswith({component + '.'!r})}}"
        lines.append(f"pipe.{component}.load_state_dict({keys}, strict=False)  # it holds {component}'s tensors\n")
    return "".join(lines)


LAYOUTS: dict[str, PackLayout] = {
    "adapter": PackLayout(("finetune", "safety", "combined"), _with_adapter),
    "full model": PackLayout(("finetune",), _with_model),
}


def write_pack(out_dir: str | Path, finetune: dict[str, LoraModule], safety: Adapter, arch: Architecture,
               method: str, metadata: dict[str, str], inputs: tuple[Path, ...] = (), extra: dict | None = None,
               base: Base | None = None, layout: str = "kohya", final_dir: str | Path | None = None) -> dict:
    """Write the pack into ``out_dir`` (the adapters in ``layout``: the base family's ``written_layout``);
    returns the manifest. ``base``: needed with a full-model safety module. ``final_dir``: where the pack will
    be once verified (the manifest's snippet loads it from there), when ``out_dir`` is a staging folder."""
    out_dir = Path(out_dir)
    pack = LAYOUTS[safety.kind]
    targets = {role: out_dir / FILES[role] for role in pack.files}
    for path in targets.values():
        for inp in inputs:
            if path.exists() and Path(inp).exists() and path.resolve() == Path(inp).resolve():
                raise BadInput(path, "the repair would overwrite one of its inputs; choose another --out")
    meta = {**metadata, "auditkit.kind": "finetune", "auditkit.repair": method,
            "auditkit.compose_with": safety.sha256}
    save_adapter(finetune, targets["finetune"], arch, layout, metadata=meta)
    entries = pack.write(targets, safety, finetune, arch, method, Path(final_dir or out_dir), base, layout)
    files = {}
    for role, path in targets.items():
        a = read_adapter(path, arch=arch)
        files[role] = {"file": path.name, "sha256": a.sha256, "modules": len(a.modules),
                       "ranks": sorted({m.rank for m in a.modules.values()})}
    manifest = {"schema": SCHEMA, "method": method, "architecture": arch.name, "files": files, **entries,
                **(extra or {})}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
