"""The adapter pack a repair writes: the repaired fine-tuning adapter, the safety adapter it is meant
to be composed with, one combined file, and a manifest saying how to compose them.

::

    pack/
      finetune.safetensors   the repaired adapter (kohya layout; Flux and SD3: diffusers layout)
      safety.safetensors     a byte-exact copy of the safety adapter
      combined.safetensors   both in one LoRA: factors concatenated along the rank (the same layout,
                             rank r_safe + r_ft, alpha = rank), for tools that load one file
      manifest.json          files, hashes, ranks, multipliers and the diffusers snippet

Every file is written atomically; the pack never overwrites the adapters it was made from.
"""

from __future__ import annotations

import json
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import atomic_write_bytes, atomic_write_text
from auditkit.lora.adapter import Adapter, LoraModule, read_adapter
from auditkit.lora.write import save_adapter
from auditkit.models.architectures import Architecture
from auditkit.repair.algebra import concatenate

SCHEMA = "auditkit.pack/1"
FILES = {"finetune": "finetune.safetensors", "safety": "safety.safetensors", "combined": "combined.safetensors"}


def diffusers_snippet(folder: str) -> str:
    return (f'for name in ("safety", "finetune"): pipe.load_lora_weights({folder!r}, '
            f'weight_name=f"{{name}}.safetensors", adapter_name=name)\n'
            'pipe.set_adapters(["safety", "finetune"], adapter_weights=[1.0, 1.0])\n')


def write_pack(out_dir: str | Path, finetune: dict[str, LoraModule], safety: Adapter, arch: Architecture,
               method: str, metadata: dict[str, str], inputs: tuple[Path, ...] = (), extra: dict | None = None,
               layout: str = "kohya") -> dict:
    """Write the pack into ``out_dir`` (the adapters in ``layout``: the base family's ``written_layout``);
    returns the manifest."""
    out_dir = Path(out_dir)
    targets = {role: out_dir / name for role, name in FILES.items()}
    for path in targets.values():
        for inp in inputs:
            if path.exists() and Path(inp).exists() and path.resolve() == Path(inp).resolve():
                raise BadInput(path, "the repair would overwrite one of its inputs; choose another --out")
    meta = {**metadata, "auditkit.kind": "finetune", "auditkit.repair": method,
            "auditkit.compose_with": safety.sha256}
    save_adapter(finetune, targets["finetune"], arch, layout, metadata=meta)
    atomic_write_bytes(targets["safety"], Path(safety.path).read_bytes())
    combined = concatenate((safety.modules, 1.0), (finetune, 1.0))
    save_adapter(combined, targets["combined"], arch, layout, metadata={
        "auditkit.kind": "combined", "auditkit.repair": method,
        "auditkit.note": "safety + repaired fine-tuning adapter, factors concatenated along the rank"})
    files = {}
    for role, path in targets.items():
        a = read_adapter(path, arch=arch)
        files[role] = {"file": path.name, "sha256": a.sha256, "modules": len(a.modules),
                       "ranks": sorted({m.rank for m in a.modules.values()})}
    manifest = {
        "schema": SCHEMA, "method": method, "architecture": arch.name, "files": files,
        "safety_source": {"path": str(safety.path), "sha256": safety.sha256},
        "compose": [{"file": FILES["safety"], "adapter_name": "safety", "weight": 1.0},
                    {"file": FILES["finetune"], "adapter_name": "finetune", "weight": 1.0}],
        "diffusers": diffusers_snippet(str(out_dir)),
        "single_file": {"file": FILES["combined"], "weight": 1.0,
                        "note": "equals safety + finetune at weight 1; scaling it scales both"},
        **(extra or {}),
    }
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
