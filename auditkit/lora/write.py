"""Write canonical LoRA modules to ``.safetensors`` in the kohya, diffusers or peft layout.

Used by the example generator, the tests (one update written in every layout) and repairs.
Outputs are written atomically and never overwrite the input adapter of an operation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.fsutil import atomic_write_bytes, atomic_write_text
from auditkit.lora import formats
from auditkit.lora.adapter import LoraModule
from auditkit.lora.io import serialize
from auditkit.models.architectures import Architecture, sgm_name


def kohya_name(arch: Architecture, canonical: str, sgm: bool | None = None) -> str:
    """The kohya module name of a canonical module (SGM block names for SDXL, as kohya writes them)."""
    component, _, path = canonical.partition(".")
    if component == "unet":
        use_sgm = arch.name == "sdxl" if sgm is None else sgm
        name = sgm_name(path, arch.unet_layout) if use_sgm else None
        return "lora_unet_" + (name or path).replace(".", "_")
    if component not in arch.kohya_prefixes:
        raise KeyError(f"{arch.name} has no kohya prefix for component {component!r}")
    return arch.kohya_prefixes[component] + path.replace(".", "_")


def _factor_tensors(module: LoraModule, arch: Architecture, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Factors in the on-disk shape: conv modules get 4-D kernels, as trainers save them."""
    shape = arch.modules[module.name]
    down = np.ascontiguousarray(module.down, dtype=dtype)
    up = np.ascontiguousarray(module.up, dtype=dtype)
    if shape.kind == "conv":
        down = down.reshape(module.rank, shape.in_features, *shape.kernel)
        up = up.reshape(shape.out_features, module.rank, 1, 1)
    return down, up


def to_state_dict(
    modules: dict[str, LoraModule], arch: Architecture, layout: str, dtype=np.float32
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata for ``modules`` in ``layout`` (peft config goes in the metadata dict)."""
    if layout not in formats.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    return formats.LAYOUTS[layout].write_state_dict(modules, arch, dtype)


def _writable(modules: dict[str, LoraModule], bias: bool) -> None:
    """Refuse what a layout cannot hold exactly, instead of writing a different update."""
    for m in modules.values():
        if m.needs_base:
            raise ValueError(f"{m.name} is a DoRA module: compute its exact update with the base weights "
                             "(Adapter.with_base) before writing it")
        if m.bias is not None and not bias:
            raise ValueError(f"{m.name} changes a bias, which this layout cannot hold; write the diffusers or "
                             "peft layout")


def _bias_tensor(m: LoraModule, dtype) -> np.ndarray:
    """peft's lora_B.bias is scaled like lora_B: the stored bias is Δb / scale. peft gives every
    layer a lora_B bias once one has it (diffusers then leaves the missing ones on the meta device),
    so modules without a bias update get explicit zeros."""
    if m.bias is None:
        return np.zeros(m.up.shape[0], dtype)
    return (m.bias / m.scale).astype(dtype)


def diffusers_source(adapter, native_layouts: tuple[str, ...] = (formats.KOHYA, formats.DIFFUSERS, formats.PEFT)):
    """What to hand diffusers' ``load_lora_weights`` for ``adapter``: the file itself when diffusers
    reads it as the plain LoRA it is (a layout of ``native_layouts``: the pipeline family's, see
    :class:`auditkit.models.families.Family`), else auditkit's exact conversion (LoHa, LoKr, full diff,
    DoRA resolved with the base weights, bias updates, fused Flux modules split) as a diffusers state
    dict of the same updates."""
    # diffusers (0.42) applies none of a prefix-less legacy file's modules (tests/lora/test_legacy_diffusers_files.py)
    native = adapter.layout in native_layouts and all(
        m.algorithm == "lora" and m.form == "factors" and m.magnitude is None and m.bias is None
        for m in adapter.modules.values())
    if native:
        return str(adapter.path)
    import torch

    tensors, _ = diffusers_state_dict(adapter.modules, adapter.architecture, np.float32)
    # copies: factors read from a memory map are read-only, which torch.from_numpy warns of (and could write to)
    return {k: torch.from_numpy(np.array(v, order="C")) for k, v in tensors.items()}


def kohya_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    """kohya names; a transformer's modules under its original names (``lora_unet_double_blocks_0_img_attn_qkv``,
    fused as sd-scripts writes Flux and SD3: see :func:`fuse_original`). A transformer whose original names are
    its diffusers paths but for a few fused modules (Z-Image's ``attention.qkv``: its table lists only those) has
    its other modules written under their own paths (``lora_unet_layers_0_feed_forward_w1``, as musubi-tuner)."""
    _writable(modules, bias=False)
    tensors = {}
    component = _denoiser_component(arch)
    denoiser = {n: m for n, m in modules.items() if component and n.split(".", 1)[0] == component}
    fused = fuse_original(denoiser, arch, formats.is_bfl_name) if component and _original_names_cover(arch, component) \
        else _own_paths_but_fused(denoiser, arch)
    for original, (down, up, scale) in fused.items():
        name = "lora_unet_" + original.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down.astype(dtype), up.astype(dtype)
        tensors[f"{name}.alpha"] = np.asarray(scale * down.shape[0], dtype=np.float32)
    for m in modules.values():
        if m.name in denoiser:
            continue
        name = kohya_name(arch, m.name)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = _factor_tensors(m, arch, dtype)
        tensors[f"{name}.alpha"] = np.asarray(m.scale * m.rank, dtype=np.float32)
    return tensors, {}


def original_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    """A transformer's original (BFL/SAI) module names with peft-style factors and alphas:
    ``double_blocks.0.img_attn.qkv.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``."""
    _writable(modules, bias=False)
    tensors = {}
    for original, (down, up, scale) in fuse_original(modules, arch, formats.is_bfl_name).items():
        tensors[f"{original}.lora_A.weight"] = down.astype(dtype)
        tensors[f"{original}.lora_B.weight"] = up.astype(dtype)
        tensors[f"{original}.alpha"] = np.asarray(scale * down.shape[0], dtype=np.float32)
    return tensors, {}


def xlabs_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    """XLabs' processor names (``double_blocks.0.processor.qkv_lora1.down.weight``): no alphas, so each
    scale is folded into the up factor, as XLabs' files hold it (diffusers reads them at scale 1)."""
    _writable(modules, bias=False)
    tensors = {}
    for original, (down, up, scale) in fuse_original(modules, arch, formats.is_xlabs_name).items():
        tensors[f"{original}.down.weight"] = down.astype(dtype)
        tensors[f"{original}.up.weight"] = (up.astype(np.float64) * scale).astype(dtype)
    return tensors, {"format": "pt"}


def _own_paths_but_fused(denoiser: dict[str, LoraModule], arch: Architecture) -> dict[str, tuple]:
    """:func:`fuse_original` of the modules the architecture's original names hold; every other module under its
    own path (original name -> (down, up, scale))."""
    held = {c for pieces in arch.original_names.values() for c, _, _ in pieces}
    out = fuse_original({n: m for n, m in denoiser.items() if n in held}, arch, formats.is_bfl_name)
    for n, m in denoiser.items():
        if n not in held:
            out[n.split(".", 1)[1]] = (np.asarray(m.down), np.asarray(m.up), m.scale)
    return out


def _original_names_cover(arch: Architecture, component: str) -> bool:
    """Whether the architecture's original names hold every module of its denoiser ``component`` (Flux, SD3),
    not only its fused ones (Z-Image)."""
    held = {c for pieces in arch.original_names.values() for c, _, _ in pieces}
    return all(n in held for n in arch.modules if n.split(".", 1)[0] == component)


def _denoiser_component(arch: Architecture) -> str | None:
    first = next(iter(arch.original_names.values()), None)
    return first[0][0].split(".", 1)[0] if first else None


def fuse_original(modules: dict[str, LoraModule], arch: Architecture, use) -> dict[str, tuple]:
    """The modules as updates of the architecture's original modules whose names pass ``use``:
    original name -> (down, up, scale), exact.

    A module that is the whole of one original module keeps its factors and scale. A fused original
    module (Flux ``img_attn.qkv`` = q, k, v) stacks its modules' down factors and puts each one's up
    factor (scale folded in) in its rows and its columns, zeros elsewhere: ΔW = up @ down is then their
    updates' rows stacked, as kohya's ``split_qkv`` files hold it. Raises ValueError for a module no
    original name holds, or a fused module the adapter updates only in part (write the diffusers layout).
    """
    out: dict[str, tuple] = {}
    claimed: set[str] = set()
    for original, pieces in arch.original_names.items():
        targets = list(dict.fromkeys(c for c, _, _ in pieces))
        if not use(original) or not any(t in modules for t in targets) or claimed.intersection(targets):
            continue
        missing = [t for t in targets if t not in modules]
        if missing:
            raise ValueError(f"{original} fuses {', '.join(targets)}; the adapter updates only some of them "
                             "(write the diffusers layout)")
        claimed.update(targets)
        whole = len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][2] == arch.modules[targets[0]].out_features
        if whole:
            m = modules[targets[0]]
            out[original] = (np.asarray(m.down), np.asarray(m.up), m.scale)
            continue
        cols = {}
        for t in targets:
            cols[t] = (sum(modules[c].rank for c in cols), modules[t].rank)
        total = sum(modules[t].rank for t in targets)
        blocks = []
        for canonical, start, stop in pieces:
            m = modules[canonical]
            block = np.zeros((stop - start, total))
            first, rank = cols[canonical]
            block[:, first:first + rank] = m.up[start:stop].astype(np.float64) * m.scale
            blocks.append(block)
        down = np.concatenate([modules[t].down.astype(np.float64) for t in targets])
        out[original] = (down, np.concatenate(blocks), 1.0)
    leftover = sorted(set(modules) - claimed)
    if leftover:
        raise ValueError(f"no original module name holds {leftover[0]}" + (f" (and {len(leftover) - 1} more)"
                                                                           if len(leftover) > 1 else ""))
    return out


def diffusers_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    _writable(modules, bias=True)
    any_bias = any(m.bias is not None for m in modules.values())
    tensors = {}
    for m in modules.values():
        tensors[f"{m.name}.lora_A.weight"], tensors[f"{m.name}.lora_B.weight"] = _factor_tensors(m, arch, dtype)
        if any_bias:
            tensors[f"{m.name}.lora_B.bias"] = _bias_tensor(m, dtype)
    by_component: dict[str, list[LoraModule]] = {}
    for m in modules.values():
        by_component.setdefault(m.name.split(".", 1)[0], []).append(m)
    config = {}
    for component, mods in by_component.items():
        for field_name, value in peft_config(mods).items():
            config[f"{component}.{field_name}"] = value
    return tensors, {"lora_adapter_metadata": json.dumps(config, sort_keys=True), "format": "pt"}


def _folded(modules: dict[str, LoraModule], arch: Architecture, dtype, layout_name: str, holds: str, key) -> dict:
    """Layouts without alphas (the scale folded into up) that hold only some modules: key(module) ->
    (down key, up key)."""
    layout = formats.LAYOUTS[layout_name]
    _writable(modules, bias=False)
    tensors = {}
    for m in modules.values():
        if not layout.can_hold(m.name):
            raise ValueError(f"the {layout.name} layout holds {holds} only, not {m.name}")
        down, up = _factor_tensors(m, arch, dtype)
        down_key, up_key = key(m.name)
        tensors[down_key], tensors[up_key] = down, (up.astype(np.float64) * m.scale).astype(dtype)
    return tensors


def legacy_unet_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    """diffusers' attention-processor files of before mid-2023 (``pytorch_lora_weights``): UNet
    attention projections only, no component prefix, no alphas (the scale is folded into up)."""

    def key(canonical: str) -> tuple[str, str]:
        path, _, proj = canonical[len("unet."):].rpartition(".")
        if proj == "0":  # to_out.0
            path, _, proj = path.rpartition(".")
        return f"{path}.processor.{proj}_lora.down.weight", f"{path}.processor.{proj}_lora.up.weight"

    return _folded(modules, arch, dtype, formats.DIFFUSERS_UNET, "UNet attention projections", key), {"format": "pt"}


def bare_transformer_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    """A transformer's LoRA under its own module paths, no component prefix and no alphas (the scale is
    folded into lora_B): peft's state dict of the transformer saved as it is."""

    def key(canonical: str) -> tuple[str, str]:
        path = canonical.removeprefix("transformer.")
        return f"{path}.lora_A.weight", f"{path}.lora_B.weight"

    tensors = _folded(modules, arch, dtype, formats.DIFFUSERS_TRANSFORMER, "a transformer's modules", key)
    return tensors, {"format": "pt"}


def peft_state_dict(modules: dict[str, LoraModule], arch: Architecture, dtype) -> tuple[dict, dict]:
    components = {m.name.split(".", 1)[0] for m in modules.values()}
    if len(components) != 1:
        raise ValueError("a peft adapter file adapts one model; got modules of " + ", ".join(sorted(components)))
    _writable(modules, bias=True)
    any_bias = any(m.bias is not None for m in modules.values())
    tensors = {}
    for m in modules.values():
        rel = m.name.split(".", 1)[1]
        down, up = _factor_tensors(m, arch, dtype)
        tensors[f"base_model.model.{rel}.lora_A.weight"] = down
        tensors[f"base_model.model.{rel}.lora_B.weight"] = up
        if any_bias:
            tensors[f"base_model.model.{rel}.lora_B.bias"] = _bias_tensor(m, dtype)
    return tensors, {}


def peft_config(modules: list[LoraModule]) -> dict:
    """A peft LoraConfig dict reproducing each module's rank and scale exactly."""
    rank = max(m.rank for m in modules)
    alpha = modules[0].scale * modules[0].rank
    rank_pattern, alpha_pattern = {}, {}
    for m in modules:
        rel = m.name.split(".", 1)[1]
        if m.rank != rank:
            rank_pattern[rel] = m.rank
        if abs(m.scale * m.rank - alpha) > 1e-9 * max(1.0, abs(alpha)):
            alpha_pattern[rel] = m.scale * m.rank
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(m.name.split(".", 1)[1] for m in modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "lora_bias": any(m.bias is not None for m in modules),
        "peft_type": "LORA",
    }


def uniform_alpha(modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """The same updates with one alpha (scale·rank) for every module, the rest folded into ``up``.

    diffusers (0.36) ignores per-module alphas of kohya files whose alphas differ between modules
    and applies other modules' scales (see ``auditkit.models.attach.load_adapters``); files auditkit writes
    load correctly everywhere.
    """
    alphas = [round(m.scale * m.rank, 9) for m in modules.values()]
    if len(set(alphas)) <= 1:
        return modules
    common = max(set(alphas), key=alphas.count)
    out = {}
    for name, m in modules.items():
        scale = common / m.rank
        up = (m.up.astype(np.float64) * (m.scale / scale)).astype(m.up.dtype)
        out[name] = m if abs(m.scale - scale) <= 1e-12 else LoraModule(m.name, m.down, up, scale)
    return out


def save_adapter(
    modules: dict[str, LoraModule],
    path: str | Path,
    arch: Architecture,
    layout: str = formats.KOHYA,
    metadata: dict[str, str] | None = None,
    dtype=np.float32,
    require_trained: bool = False,
) -> Path:
    """Write ``modules`` to ``path`` (peft also writes ``adapter_config.json`` beside it).

    With ``require_trained`` (trainers' outputs), :func:`check_trained` runs first and nothing is
    written for a non-finite or all-zero adapter. Off by default: tests and examples write such
    files on purpose, to check that the scanner refuses them.
    """
    path = Path(path)
    if require_trained:
        check_trained(modules, path)
    if layout not in formats.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    if formats.LAYOUTS[layout].one_alpha:
        modules = uniform_alpha(modules)
    tensors, meta = to_state_dict(modules, arch, layout, dtype)
    meta.update(metadata or {})
    if formats.LAYOUTS[layout].config_file:
        cfg = peft_config(list(modules.values()))
        atomic_write_text(path.with_name("adapter_config.json"), json.dumps(cfg, indent=2, sort_keys=True))
    return atomic_write_bytes(path, serialize(tensors, meta))


def check_trained(modules: dict[str, LoraModule], path: str | Path | None = None) -> None:
    """Raise BadInput for an adapter not worth publishing: no modules, NaN/Inf factors or scales, or
    every update zero (0 steps, alpha 0, or a training signal that never moved the zero-initialised B).
    """
    if not modules:
        raise BadInput(path, "the adapter has no modules; nothing written")
    for m in modules.values():
        if not (math.isfinite(m.scale) and np.isfinite(m.down).all() and np.isfinite(m.up).all()):
            raise BadInput(path, f"the adapter has non-finite (NaN/Inf) values in {m.name}; nothing written "
                                 "(training diverged? try a lower lr)")
    if not any(update_norm(m) > 0 for m in modules.values()):
        raise BadInput(path, "every update of the adapter is zero (untrained); nothing written")


def update_norm(module: LoraModule) -> float:
    """‖scale · B · A‖_F from the r × r Gram matrices: the dense update is never formed."""
    if module.scale == 0:
        return 0.0
    b = module.up.astype(np.float64)
    a = module.down.astype(np.float64)
    squared = float(np.sum((b.T @ b) * (a @ a.T)))  # trace(BᵀB · AAᵀ), both symmetric
    return abs(module.scale) * math.sqrt(max(squared, 0.0))  # rounding can leave a tiny negative
