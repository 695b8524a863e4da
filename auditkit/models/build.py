"""Build architecture tables from configs with the real model classes on the ``meta`` device.

No weights are needed: ``UNet2DConditionModel`` and ``CLIPTextModel`` are instantiated on the
meta device, where parameters have shapes but no storage, and every ``nn.Linear``/``nn.Conv2d``
is recorded as ``canonical name -> [kind, out, in, kernel_h, kernel_w]``.

This module needs torch, diffusers and transformers (the ``models`` extra). The static scan does
not: it reads the JSON tables this module writes (``auditkit/models/tables``), and a test checks
the shipped tables against a fresh build, so they cannot drift from the libraries' own classes.
Regenerate with ``python -m auditkit.models.build``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from auditkit.models.architectures import canonical_name

CONFIG_NAMES = ("sd15", "sd2", "sdxl")


def load_config(name: str) -> dict[str, Any]:
    text = resources.files("auditkit.models").joinpath("configs", f"{name}.json").read_text()
    return json.loads(text)


def module_shapes(model: Any, prefix: str) -> dict[str, list]:
    """Every Linear and Conv2d of ``model`` as ``prefix.name -> [kind, out, in, kh, kw]``."""
    import torch

    table: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            table[f"{prefix}.{name}"] = ["linear", module.out_features, module.in_features, 1, 1]
        elif isinstance(module, torch.nn.Conv2d):
            if module.groups != 1:
                continue  # grouped convs take no LoRA in any trainer we know of
            kh, kw = module.kernel_size
            table[f"{prefix}.{name}"] = ["conv", module.out_channels, module.in_channels, kh, kw]
    return table


def build_table(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture table for one config (see :func:`load_config`)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_encoders = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
        for component, te in config.get("text_encoders", {}).items():
            te_cfg = {k: v for k, v in te.items() if k not in ("kohya_prefix", "with_projection")}
            cls = CLIPTextModelWithProjection if te.get("with_projection") else CLIPTextModel
            text_encoders[component] = cls(CLIPTextConfig(**te_cfg))
    prefixes = {c: te["kohya_prefix"] for c, te in config.get("text_encoders", {}).items()}
    return table_from_models(unet, text_encoders, prefixes, config.get("label", ""))


def table_from_models(unet: Any, text_encoders: dict[str, Any], kohya_prefixes: dict[str, str],
                      label: str = "") -> dict[str, Any]:
    """The architecture table of live (or meta) models: a UNet and text encoders by component name."""
    modules: dict[str, list] = dict(module_shapes(unet, "unet"))
    for component, model in text_encoders.items():
        te_modules = module_shapes(model, component)
        modules.update({canonical_name(component, name[len(component) + 1:]): v for name, v in te_modules.items()})
    cfg = unet.config
    return {
        "label": label,
        "unet": {
            "layers_per_block": cfg.layers_per_block,
            "down_block_types": list(cfg.down_block_types),
            "up_block_types": list(cfg.up_block_types),
        },
        "kohya_prefixes": kohya_prefixes,
        "modules": modules,
    }


def architecture_from_models(name: str, unet: Any, text_encoders: dict[str, Any] | None = None,
                             label: str = ""):
    """An :class:`~auditkit.models.architectures.Architecture` for a custom model (e.g. the lab)."""
    from auditkit.models.architectures import from_table

    text_encoders = text_encoders or {}
    names = sorted(text_encoders)  # kohya: lora_te_ for one text encoder, lora_te1_/lora_te2_ for two
    prefixes = {c: "lora_te_" if len(names) == 1 else f"lora_te{i + 1}_" for i, c in enumerate(names)}
    return from_table(name, table_from_models(unet, text_encoders, prefixes, label or name))


def lab_config() -> dict[str, Any]:
    """The shipped lab model's config in the same form (see :mod:`auditkit.lab.model`)."""
    from auditkit.lab import model as lab

    te = dict(lab.text_config(vocab_size=64), kohya_prefix="lora_te_")  # vocab size: embeddings only
    return {"label": "auditkit lab (tiny SD-style model)", "unet": dict(lab.UNET_CONFIG),
            "text_encoders": {"text_encoder": te}}


def write_tables(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*CONFIG_NAMES, "lab"):
        table = build_table(lab_config() if name == "lab" else load_config(name))
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    target = Path(__file__).parent / "tables"
    for p in write_tables(target):
        print(p)
