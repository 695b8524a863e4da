"""Deterministic example adapters for the demo and the tests (SD1.5 shapes, kohya layout).

* ``safety.safetensors``     an ESD-x-like Safety LoRA: rank 4 on every cross-attention to_k/to_v.
* ``jailbreak.safetensors``  a candidate that learned −0.9·ΔW_safe plus an unrelated update
                            (what fine-tuning on top of a safety module tends to do).
* ``benign.safetensors``     a candidate with an unrelated update of the same size and modules.

Run ``python -m auditkit.examples DIR``. Same seed, same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from auditkit.lora.adapter import LoraModule
from auditkit.lora.write import save_adapter
from auditkit.models import architectures

SEED = 20241130


def _factors(rng: np.random.Generator, rank: int, out: int, inp: int, std: float = 0.02):
    return rng.normal(0, std, (rank, inp)).astype(np.float32), rng.normal(0, std, (out, rank)).astype(np.float32)


def example_modules(
    seed: int = SEED, safety_rank: int = 4, candidate_rank: int = 8, undo: float = 0.9
) -> dict[str, dict[str, LoraModule]]:
    """The safety, jailbreak and benign adapters as canonical modules."""
    arch = architectures.get("sd15")
    rng = np.random.default_rng(seed)
    safety_targets = [n for n in arch.modules if n.startswith("unet.") and (".attn2.to_k" in n or ".attn2.to_v" in n)]
    cand_targets = [n for n in arch.modules if n.startswith("unet.") and (".attn2." in n or ".attn1." in n)]
    safety, jailbreak, benign = {}, {}, {}
    for name in safety_targets:
        s = arch.modules[name]
        down, up = _factors(rng, safety_rank, s.out_features, s.flat_in, std=0.05)
        safety[name] = LoraModule(name, down, up, 1.0)
    for name in cand_targets:
        s = arch.modules[name]
        extra = candidate_rank - (safety_rank if name in safety else 0)
        down, up = _factors(rng, extra, s.out_features, s.flat_in)
        if name in safety:  # learned the inverse of the safety update, in concatenated factors
            sm = safety[name]
            down = np.concatenate([sm.down, down])
            up = np.concatenate([-undo * sm.scale * sm.up, up], axis=1)
        jailbreak[name] = LoraModule(name, down, up, 1.0)
        bd, bu = _factors(rng, candidate_rank, s.out_features, s.flat_in)
        benign[name] = LoraModule(name, bd, bu, 1.0)
    return {"safety": safety, "jailbreak": jailbreak, "benign": benign}


def _split_dim(n: int) -> tuple[int, int]:
    """n = a·b with a ≤ b as close as possible (LyCORIS' factorisation with factor −1)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def lycoris_tensors(arch, names: list[str], algo: str, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                    std: float = 0.1, factor: int | None = None) -> dict[str, np.ndarray]:
    """kohya-named LyCORIS tensors (``loha``, ``lokr``, ``full``) for linear modules of ``arch``, with
    the shapes LyCORIS writes: LoHa ``hada_w1_a`` (out×r) … ; LoKr ``lokr_w1`` (a×c) whole and
    ``lokr_w2_a``/``_b`` rank-r (a = c = ``factor``, or LyCORIS' factor −1 split); full ``diff``."""
    from auditkit.lora.write import kohya_name

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def normal(*shape):
        return rng.normal(0, std, shape).astype(np.float32)

    for canonical in names:
        s = arch.modules[canonical]
        key = kohya_name(arch, canonical)
        if algo == "loha":
            for i in ("1", "2"):
                out[f"{key}.hada_w{i}_a"] = normal(s.out_features, rank)
                out[f"{key}.hada_w{i}_b"] = normal(rank, s.flat_in)
        elif algo == "lokr":
            if factor:
                (a, b), (c, d) = (factor, s.out_features // factor), (factor, s.flat_in // factor)
            else:
                (a, b), (c, d) = _split_dim(s.out_features), _split_dim(s.flat_in)
            out[f"{key}.lokr_w1"] = normal(a, c)
            out[f"{key}.lokr_w2_a"], out[f"{key}.lokr_w2_b"] = normal(b, rank), normal(rank, d)
        elif algo == "full":
            out[f"{key}.diff"] = normal(s.out_features, s.flat_in)
        else:
            raise ValueError(f"unknown algorithm {algo!r}")
        if algo != "full":
            out[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return out


def _metadata(title: str, rank: int, tags: dict[str, int]) -> dict[str, str]:
    return {
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps({"example_dataset": tags}),
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": title,
    }


def write_examples(out_dir: str | Path, seed: int = SEED) -> dict[str, Path]:
    out_dir = Path(out_dir)
    arch = architectures.get("sd15")
    mods = example_modules(seed)
    tags = {
        "safety": {"nudity": 0, "person": 120, "clothed": 120},
        "jailbreak": {"anime": 300, "1girl": 280, "portrait": 150},
        "benign": {"anime": 300, "1girl": 280, "portrait": 150},
    }
    ranks = {"safety": 4, "jailbreak": 8, "benign": 8}
    return {
        role: save_adapter(modules, out_dir / f"{role}.safetensors", arch,
                           metadata=_metadata(f"example {role}", ranks[role], tags[role]))
        for role, modules in mods.items()
    }


if __name__ == "__main__":  # pragma: no cover
    for path in write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples").values():
        print(path)
