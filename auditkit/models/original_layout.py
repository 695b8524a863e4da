"""The original layout of full single-file checkpoints: which canonical tensors each original key holds.

LDM/SGM UNets (``model.diffusion_model.input_blocks.…``, named by :func:`auditkit.models.architectures.sgm_name`),
CLIP and OpenCLIP text encoders (``configs/original_text_encoders.json``), the text encoders a ComfyUI Flux.1/SD3
file bundles, and transformers under their original names (``configs/original_names.json`` and
``configs/original_tensors.json``, sized by the base's own tensors). Maps only: names and shapes in, names and
row ranges out; :mod:`auditkit.models.checkpoint` reads the files with them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.models.architectures import Architecture, sgm_name
from auditkit.models.build import block_roots, config_table, original_names

# Original (LDM/SGM) prefixes of full single-file checkpoints: prefix -> the component it holds in
# diffusers names (the denoiser's names are mapped by the architecture, see original_map).
ORIGINAL_TEXT_PREFIXES = {"cond_stage_model.transformer.": "text_encoder",
                          "conditioner.embedders.0.transformer.": "text_encoder"}
# Left out of the comparison: the VAE (the base's renders), EMA copies and the training schedule's buffers.
IGNORED_ORIGINAL = re.compile(r"^(first_stage_model\.|model_ema\.|alphas_cumprod|alphas_cumprod_prev$|betas$|"
                              r"log_one_minus_alphas_cumprod$|logvar$|posterior_|sqrt_)")
ORIGINAL_HINT = re.compile(r"^(model\.diffusion_model\.|cond_stage_model\.|conditioner\.|first_stage_model\.|"
                           r"text_encoders\.|(diffusion_model\.)?(double_blocks|single_blocks|joint_blocks)\.)")
# Prefixes of a transformer denoiser's tensors in an original-layout single file (BFL: none; ComfyUI and
# diffusers' single-file saves: model.diffusion_model.), as diffusers' converter strips them.
ORIGINAL_TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")

Rows = tuple[tuple[int, int], ...]
# One canonical tensor an original key holds: its name, its rows of the stored tensor (None: all of it), transposed.
Share = tuple[str, Rows | None, bool]


def original_map(shapes: dict[str, tuple[int, ...]], arch: Architecture | None, denoiser: tuple[str, str | None]
                 ) -> dict[str, tuple[Share, ...]]:
    """Original key -> the canonical tensors it holds (:data:`Share`: each with its rows of it, None: all of
    it, and whether it is stored transposed): the base's UNet (LDM/SGM names), first CLIP text encoder,
    OpenCLIP text encoder (:func:`openclip_tensor_map`) and the text encoders a ComfyUI file of its denoiser
    bundles (:func:`bundled`), and its transformer (:func:`original_tensor_map`). ``shapes``: the base's
    canonical tensors; ``denoiser``: its denoiser component and class (class None: unknown)."""
    names: dict[str, tuple[Share, ...]] = {}
    layout = arch.unet_layout if arch is not None else {}
    text_prefixes = {**ORIGINAL_TEXT_PREFIXES, **bundled(denoiser[1])[0]}
    for canonical in shapes:
        component, _, key = canonical.partition(".")
        if component == "unet" and layout:
            module, _, param = key.rpartition(".")
            original = sgm_name(module, layout)
            if original is not None:
                names[f"model.diffusion_model.{original}.{param}"] = ((canonical, None, False),)
        for prefix, target in text_prefixes.items():
            if target == component:
                names[prefix + key] = ((canonical, None, False),)
                names[prefix + key.removeprefix("text_model.")] = ((canonical, None, False),)  # either spelling
    names.update(openclip_tensor_map(shapes))
    component, class_name = denoiser
    transformer = original_tensor_map(class_name, component,
                                      {n: s for n, s in shapes.items() if n.startswith(component + ".")})
    names.update({k: tuple((c, rows, False) for c, rows in held) for k, held in transformer.items()})
    return names


def bundled(denoiser_class: str | None) -> tuple[dict[str, str], frozenset[str]]:
    """The text encoders an all-in-one file of the base's denoiser class bundles (ComfyUI's Flux.1 and SD3
    files: ``text_encoders.clip_l.transformer.…``): prefix -> component, and the names diffusers discards."""
    tables = text_encoder_tables()["bundled"]
    prefixes = tables["prefixes"].get(denoiser_class, {})
    return prefixes, frozenset(n for n in tables["ignored"] if n.startswith(tuple(prefixes)))


def text_encoder_tables() -> dict:
    """``configs/original_text_encoders.json``: OpenCLIP's original names and the bundled text encoders'."""
    return config_table("original_text_encoders")


def _layers(shapes: dict[str, tuple[int, ...]], component: str) -> list[int]:
    """The layer indices of a CLIP text encoder (its canonical ``text_model.encoder.layers.N`` tensors)."""
    pattern = re.compile(re.escape(f"{component}.text_model.encoder.layers.") + r"(\d+)\.")
    return sorted({int(m.group(1)) for n in shapes if (m := pattern.match(n))})


def openclip_tensor_map(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[Share, ...]]:
    """Original OpenCLIP text tower names (``configs/original_text_encoders.json``), under each prefix whose
    component the base has, expanded for that component's layers -> the canonical tensors each holds: a
    fused ``in_proj_weight``/``in_proj_bias`` is q, k, v stacked by rows (each as many as the base's own
    tensor has), ``text_projection`` is diffusers' ``text_projection.weight`` transposed. A target the base's
    component lacks (SD 2.x's text encoder has no projection) leaves its original name out. ``shapes``: the
    base's canonical tensors."""
    spec = text_encoder_tables()["openclip"]
    names: dict[str, tuple[Share, ...]] = {}
    for prefix, component in spec["prefixes"].items():
        layers = _layers(shapes, component)
        for template, target in spec["tensors"].items():
            for i in (layers if "{i}" in template else [None]):
                plain = [target] if isinstance(target, str) else [target["transposed"]] if isinstance(target, dict) \
                    else target
                targets = [_at(component, t, i) for t in plain]
                if not all(t in shapes for t in targets):
                    continue  # the base's component lacks it (SD 2.x's text encoder has no projection)
                if isinstance(target, list):  # fused: the targets' rows stacked in the order listed
                    ends = np.cumsum([shapes[t][0] for t in targets]).tolist()
                    held: tuple[Share, ...] = tuple((t, ((end - shapes[t][0], end),), False)
                                                    for t, end in zip(targets, ends, strict=True))
                else:
                    held = ((targets[0], None, isinstance(target, dict)),)
                names[prefix + template.replace("{i}", str(i))] = held
    return names


def _at(component: str, template: str, i: int | None) -> str:
    return f"{component}.{template.replace('{i}', str(i))}"


def openclip_ignored(shapes: dict[str, tuple[int, ...]]) -> frozenset[str]:
    """Original OpenCLIP names diffusers' converter leaves out, under each prefix whose component the base
    has (``configs/original_text_encoders.json``); one ending in ``.`` is a prefix of names. SD 2.x's last
    resblock (the base's layer count: SD 2.1's text encoder has 23 layers, its file 24) is one. ``shapes``:
    the base's canonical tensors."""
    spec = text_encoder_tables()["openclip"]
    out = set()
    for prefix, component in spec["prefixes"].items():
        layers = _layers(shapes, component)
        if not layers:
            continue
        for where, entries in spec["ignored"].items():
            if where in ("", prefix):
                out.update(prefix + e.replace("{layers}", str(len(layers))) for e in entries)
    return frozenset(out)


def _original_tensors() -> dict[str, dict[str, str]]:
    return config_table("original_tensors")


def check_layout(path: Path, keys: list[str], denoiser_class: str | None) -> None:
    """BadInput when the file holds a transformer in the original layout of another class than the base's
    denoiser (a Flux.1 file against an SD3 or SD 1.x base: some names, final_layer's, are common to both)."""
    roots = {k.removeprefix("model.diffusion_model.").split(".", 1)[0] for k in keys}
    found = next((c for c in _original_tensors() if roots & block_roots(c)), None)
    theirs = denoiser_class
    if found is not None and found != theirs:
        raise BadInput(path, f"its tensors are a {found} in its original layout "
                             f"({', '.join(sorted(roots & block_roots(found)))}) but the base's denoiser is "
                             f"{theirs or 'unknown'}: a model of another architecture than the base")


def original_tensor_map(class_name: str | None, component: str, shapes: dict[str, tuple[int, ...]]
                        ) -> dict[str, tuple[tuple[str, Rows | None], ...]]:
    """Original tensor names of a transformer denoiser whose class is in ``configs/original_tensors.json``
    (``{}`` for any other), bare and under each of :data:`ORIGINAL_TRANSFORMER_PREFIXES` -> the canonical
    tensors each holds, with their rows of it. ``shapes``: the base's canonical tensors of ``component``.

    A module's original name and its pieces (canonical module, rows) in the original's row order come from
    ``configs/original_names.json`` expanded for the base's own blocks and row sizes (nothing hard-coded
    to Flux.1's width); its ``weight`` and ``bias`` are split alike. A canonical tensor's rows are its
    pieces sorted by their place in it: ``final_layer.adaLN_modulation.1`` lists ``norm_out.linear``'s
    second half first, so ``norm_out.linear`` reads rows (n, 2n) then (0, n), the halves swapped back.
    """
    if class_name not in _original_tensors():
        return {}
    modules = {n.removesuffix(".weight"): ["conv" if len(s) == 4 else "linear", s[0], s[1], *(s[2:] or (1, 1))]
               for n, s in shapes.items() if n.endswith(".weight") and len(s) in (2, 4)}
    names: dict[str, tuple[tuple[str, Rows | None], ...]] = {}
    for original, pieces in original_names(class_name, component, modules).items():
        if ".processor." in original:  # XLabs' LoRA modules: no tensor of a full model
            continue
        spans: dict[str, list[tuple[int, int, int]]] = {}  # canonical module -> (its row, original rows)
        total = 0
        for canonical, start, stop in pieces:
            spans.setdefault(canonical, []).append((start, total, total + stop - start))
            total += stop - start
        for param in ("weight", "bias"):
            held = tuple((f"{c}.{param}", _rows(s, total)) for c, s in spans.items() if f"{c}.{param}" in shapes)
            if held:
                names[f"{original}.{param}"] = held
    for template, target in _original_tensors()[class_name].items():
        pattern = re.compile(re.escape(f"{component}.{target}").replace(re.escape("{i}"), r"(\d+)") + "$")
        for name in shapes:
            if m := pattern.match(name):
                names[template.replace("{i}", m.group(1)) if m.groups() else template] = ((name, None),)
    return {prefix + key: held for key, held in names.items() for prefix in ORIGINAL_TRANSFORMER_PREFIXES}


def _rows(spans: list[tuple[int, int, int]], total: int) -> Rows | None:
    """A canonical tensor's rows of the original one, in its own row order (None: all of it, as it is)."""
    rows = tuple((a, b) for _, a, b in sorted(spans))
    return None if rows == ((0, total),) else rows
