"""Build architecture tables from configs with the real model classes on the ``meta`` device.

No weights are needed: the denoiser (``UNet2DConditionModel``, ``FluxTransformer2DModel``, …) and
the text encoders (``CLIPTextModel``, ``T5EncoderModel``, …) are instantiated on the meta device,
where parameters have shapes but no storage, and every ``nn.Linear``/``nn.Conv2d`` is recorded as
``canonical name -> [kind, out, in, kernel_h, kernel_w]``. A transformer denoiser also gets its
original module names (``configs/original_names.json``) expanded for its blocks and row sizes.

This module needs torch, diffusers and transformers (the ``models`` extra) to build. The static scan
does not: it reads the JSON tables this module writes (``auditkit/models/tables``), and a test checks
the shipped tables against a fresh build, so they cannot drift from the libraries' own classes.
:func:`original_names` needs none of them (imported at no cost): full checkpoints in a transformer's
original layout are placed with it, sized by the base's own tensors (:mod:`auditkit.models.checkpoint`).
Regenerate with ``python -m auditkit.models.build``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from auditkit.models.architectures import canonical_name
from auditkit.models.families import family_tables

# every family's architecture tables (auditkit.models.family): configs/<name>.json -> tables/<name>.json
CONFIG_NAMES = family_tables()

# Model classes an architecture may be built from (on the meta device, no weights), by the library
# that defines them: a class name from a config or a model_index.json is only ever looked up here.
META_CLASSES = {
    "UNet2DConditionModel": "diffusers",
    "FluxTransformer2DModel": "diffusers",
    "SD3Transformer2DModel": "diffusers",
    "ChromaTransformer2DModel": "diffusers",
    "Flux2Transformer2DModel": "diffusers",
    "QwenImageTransformer2DModel": "diffusers",
    "ZImageTransformer2DModel": "diffusers",
    "WanTransformer3DModel": "diffusers",
    "HunyuanVideo15Transformer3DModel": "diffusers",
    "CLIPTextModel": "transformers",
    "CLIPTextModelWithProjection": "transformers",
    "T5EncoderModel": "transformers",
}


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


def meta_class(class_name: str):
    """The model class named ``class_name`` from :data:`META_CLASSES` (KeyError for any other name)."""
    import importlib

    return getattr(importlib.import_module(META_CLASSES[class_name]), class_name)


def build_table(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture table for one config (see :func:`load_config`). A config that says ``same_as``
    another (Flux.1 Kontext is Flux.1's transformer) gets a table that points at that one's: the same
    modules under its own name, so an adapter of either fits both alike and its metadata breaks the tie."""
    if "same_as" in config:
        return {"label": config.get("label", ""), "same_as": config["same_as"]}
    import torch
    from transformers import CLIPTextConfig

    text_encoders = {}
    with torch.device("meta"):
        if "unet" in config:
            component, denoiser = "unet", meta_class("UNet2DConditionModel")(**config["unet"])
        else:
            spec = config["denoiser"]
            component, denoiser = spec["component"], meta_class(spec["class"])(**spec["config"])
        for name, te in config.get("text_encoders", {}).items():
            te_cfg = {k: v for k, v in te.items() if k not in ("kohya_prefix", "with_projection", "class")}
            class_name = te.get("class") or ("CLIPTextModelWithProjection" if te.get("with_projection")
                                             else "CLIPTextModel")
            cls = meta_class(class_name)
            text_encoders[name] = cls(cls.config_class(**te_cfg) if "class" in te else CLIPTextConfig(**te_cfg))
    prefixes = {c: te["kohya_prefix"] for c, te in config.get("text_encoders", {}).items()}
    return table_from_models(denoiser, text_encoders, prefixes, config.get("label", ""), component)


def table_from_models(denoiser: Any, text_encoders: dict[str, Any], kohya_prefixes: dict[str, str],
                      label: str = "", component: str = "unet") -> dict[str, Any]:
    """The architecture table of live (or meta) models: the denoiser (a UNet, or a transformer under
    ``component``) and text encoders by component name."""
    modules: dict[str, list] = dict(module_shapes(denoiser, component))
    for name, model in text_encoders.items():
        te_modules = module_shapes(model, name)
        modules.update({canonical_name(name, key[len(name) + 1:]): v for key, v in te_modules.items()})
    table: dict[str, Any] = {"label": label}
    if component == "unet":
        cfg = denoiser.config
        table["unet"] = {
            "layers_per_block": cfg.layers_per_block,
            "down_block_types": list(cfg.down_block_types),
            "up_block_types": list(cfg.up_block_types),
        }
    else:
        kohya_prefixes = {component: TRANSFORMER_KOHYA_PREFIX, **kohya_prefixes}
        table["original_names"] = original_names(type(denoiser).__name__, component, modules)
    table["kohya_prefixes"] = kohya_prefixes
    table["modules"] = modules
    return table


# kohya-style names of a transformer's diffusers module paths (SimpleTuner and others; what diffusers
# calls the "mixture" format): lora_transformer_transformer_blocks_0_attn_to_q
TRANSFORMER_KOHYA_PREFIX = "lora_transformer_"
_CHUNK = re.compile(r"^(.+)\[(\d+)/(\d+)\]$")


@cache
def config_table(name: str) -> dict[str, Any]:
    """A data table of ``configs/`` (``name``.json) without its ``_``-prefixed comment entries; read once."""
    return {k: v for k, v in load_config(name).items() if not k.startswith("_")}


def _templates() -> dict[str, dict[str, list[str]]]:
    return config_table("original_names")


def block_roots(class_name: str) -> set[str]:
    """The first name segments of a denoiser class's per-block original modules (``double_blocks`` and
    ``single_blocks`` for Flux.1, ``joint_blocks`` for SD3): what tells a file in that class's original layout."""
    return {t.split(".", 1)[0] for t in _templates().get(class_name, {}) if "{i}" in t}


def original_names(class_name: str, component: str, modules: dict[str, list]) -> dict[str, list]:
    """The original module names of a denoiser class (``configs/original_names.json``) expanded for the
    blocks and row sizes of ``modules``: original name -> [[canonical module, first row, end row], …],
    the pieces in the order their rows are stacked in the original (fused) module.

    A name whose target modules the model lacks (Flux.1 schnell has no guidance embedder) is left out;
    a template the model contradicts (targets of different input widths, rows that do not tile a
    module) raises ValueError, so a wrong table cannot be built.
    """
    out: dict[str, list] = {}
    for template, spec in _templates().get(class_name, {}).items():
        alternatives = list(spec["by_chunks"].values()) if isinstance(spec, dict) else [spec]
        indices = sorted({i for alt in alternatives for i in _block_indices(template, alt, component, modules)},
                         key=lambda i: int(i) if i else 0)
        for i in indices:
            name = template.replace("{i}", i)
            targets = _by_chunks(spec, i, component, modules)
            pieces = []
            for target in targets:
                m = _CHUNK.match(target)
                path, k, n = (m.group(1), int(m.group(2)), int(m.group(3))) if m else (target, 0, 1)
                canonical = f"{component}.{path.replace('{i}', i)}"
                if canonical not in modules:
                    break
                size = modules[canonical][1] // n
                pieces.append([canonical, k * size, (k + 1) * size])
            else:
                if pieces:
                    _check_pieces(name, pieces, modules)
                    out[name] = pieces
    return out


def _by_chunks(spec, i: str, component: str, modules: dict) -> list[str]:
    """The targets of one block: a plain list, or the alternative whose key is the number of row chunks
    (rows / input width) of its first target's module in this block (none: [])."""
    if not isinstance(spec, dict):
        return spec
    for chunks, targets in spec["by_chunks"].items():
        m = _CHUNK.match(targets[0])
        module = modules.get(f"{component}.{(m.group(1) if m else targets[0]).replace('{i}', i)}")
        if module and module[1] == int(chunks) * module[2]:
            return targets
    return []


def _block_indices(template: str, targets: list[str], component: str, modules: dict) -> list[str]:
    if "{i}" not in template:
        return [""]
    first = _CHUNK.match(targets[0])
    path = first.group(1) if first else targets[0]
    pattern = re.compile(re.escape(f"{component}.{path}").replace(re.escape("{i}"), r"(\d+)") + "$")
    return sorted({m.group(1) for name in modules if (m := pattern.match(name))}, key=int)


def _check_pieces(name: str, pieces: list, modules: dict) -> None:
    widths = {modules[c][2] * modules[c][3] * modules[c][4] for c, _, _ in pieces}
    if len(widths) != 1:
        raise ValueError(f"original module {name}: its targets read inputs of different widths {sorted(widths)}")
    rows: dict[str, list] = {}
    for canonical, start, stop in pieces:
        rows.setdefault(canonical, []).append((start, stop))
    for canonical, spans in rows.items():
        spans.sort()
        tiled = spans[0][0] == 0 and spans[-1][1] == modules[canonical][1] and all(
            a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        if not tiled:
            raise ValueError(f"original module {name}: rows {spans} do not tile {canonical}")


def architecture_from_models(name: str, unet: Any, text_encoders: dict[str, Any] | None = None,
                             label: str = "", component: str = "unet",
                             kohya_prefixes: dict[str, str] | None = None):
    """An :class:`~auditkit.models.architectures.Architecture` for a custom model (e.g. the lab, or a
    tiny pipeline): its denoiser ``unet`` (a transformer when ``component`` says so) and text encoders.

    ``kohya_prefixes`` (component -> prefix) default to kohya's rule for SD/SDXL: ``lora_te_`` for one
    text encoder, ``lora_te1_``/``lora_te2_`` for two.
    """
    from auditkit.models.architectures import from_table

    text_encoders = text_encoders or {}
    names = sorted(text_encoders)
    prefixes = kohya_prefixes if kohya_prefixes is not None else {
        c: "lora_te_" if len(names) == 1 else f"lora_te{i + 1}_" for i, c in enumerate(names)}
    prefixes = {c: p for c, p in prefixes.items() if c in text_encoders}
    return from_table(name, table_from_models(unet, text_encoders, prefixes, label or name, component))


def lab_config() -> dict[str, Any]:
    """The shipped lab model's config in the same form (see :mod:`auditkit.lab.model`)."""
    from auditkit.lab import model as lab

    te = dict(lab.text_config(vocab_size=64), kohya_prefix="lora_te_")  # vocab size: embeddings only
    return {"label": "auditkit lab (tiny SD-style model)", "unet": dict(lab.UNET_CONFIG),
            "text_encoders": {"text_encoder": te}}


def lab_dit_config() -> dict[str, Any]:
    """The shipped DiT lab model's config in the same form (see :mod:`auditkit.lab.dit`); kohya prefixes
    as Flux.1's."""
    from auditkit.lab import dit, model

    te = dict(model.text_config(vocab_size=64), kohya_prefix="lora_te1_")  # vocab size: embeddings only
    t5 = dict(dit.T5_CONFIG, vocab_size=64, kohya_prefix="lora_te3_", **{"class": "T5EncoderModel"})
    return {"label": "auditkit DiT lab (tiny Flux.1-style model)",
            "denoiser": {"component": "transformer", "class": "FluxTransformer2DModel",
                         "config": dict(dit.TRANSFORMER_CONFIG)},
            "text_encoders": {"text_encoder": te, "text_encoder_2": t5}}


# the shipped lab models' tables come from their own module's configs (auditkit.lab.bases names them)
LAB_CONFIGS = {"lab": lab_config, "lab-dit": lab_dit_config}


def config_for(name: str) -> dict[str, Any]:
    """The config of built-in architecture ``name``: a lab model's from its module, else the shipped JSON."""
    return LAB_CONFIGS[name]() if name in LAB_CONFIGS else load_config(name)


def write_tables(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*CONFIG_NAMES, *LAB_CONFIGS):
        table = build_table(config_for(name))
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    target = Path(__file__).parent / "tables"
    for p in write_tables(target):
        print(p)
