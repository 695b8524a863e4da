"""Recognise LoRA key layouts and split keys into (module, part).

Layouts people publish (see ../shared/FIELD.md):

* ``kohya``     ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
                ``lora_te_`` (SDXL ``lora_te1_``/``lora_te2_``); conv "LoCon" kernels included.
* ``diffusers`` ``unet.<dotted.path>.lora.down.weight`` / ``.lora.up.weight`` (older),
                ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (peft-backed), legacy
                attention-processor names (``attn1.processor.to_q_lora.down.weight``), ``text_encoder.…``.
* ``peft``      ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` + ``adapter_config.json``.

Each layout is one :class:`Layout` record in :data:`LAYOUTS`: the key prefixes that identify it, how
a key splits into (module, part), how module names resolve to an architecture's canonical names
(pure lookups in its tables), and its writer. The shape checks live in :mod:`auditkit.lora.adapter`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

KOHYA, DIFFUSERS, PEFT = "kohya", "diffusers", "peft"

# LyCORIS and other non-LoRA adapter algorithms: recognised so we can say clearly we do not read them.
_UNSUPPORTED = (
    (re.compile(r"\.hada_(w|t)\d"), "LyCORIS LoHa (hada_*)"),
    (re.compile(r"\.lokr_(w|t)\d"), "LyCORIS LoKr (lokr_*)"),
    (re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    (re.compile(r"\.oft_(blocks|diag)|\.oft_r\b|\.boft_"), "OFT/BOFT"),
    (re.compile(r"\.(diff|diff_b)$"), "LyCORIS full-weight diff"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector)(\.weight)?$"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.lora_B\.bias$|\.lora_up\.bias$"), "LoRA with trainable bias (lora_bias)"),
)

# Keys that carry no weight update of a scanned module: textual-inversion embeddings bundled by
# kohya, and framework bookkeeping.
_IGNORED = re.compile(r"^(bundle_emb\.|emb_params$|clip_l$|clip_g$|string_to_param\.|string_to_token\.)")

_KOHYA_PART = re.compile(r"^(lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_DIFFUSERS_PART = re.compile(
    r"^(.+?)\.(lora\.down\.weight|lora\.up\.weight|lora_A\.weight|lora_B\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|down\.weight|up\.weight|alpha)$"
)
_PART_NAMES = {
    "lora_down.weight": "down", "lora.down.weight": "down", "lora_A.weight": "down",
    "lora_linear_layer.down.weight": "down", "down.weight": "down",
    "lora_up.weight": "up", "lora.up.weight": "up", "lora_B.weight": "up",
    "lora_linear_layer.up.weight": "up", "up.weight": "up",
    "alpha": "alpha",
}
# diffusers' legacy attention-processor LoRA names: attn1.processor.to_q_lora -> attn1.to_q
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


@dataclass(frozen=True)
class KeyPart:
    key: str
    module: str  # layout-specific module name (kohya name, or dotted path with component prefix)
    part: str  # "down", "up" or "alpha"


def unsupported_algorithm(keys: list[str]) -> str | None:
    """The name of an adapter algorithm auditkit cannot read yet, if any key belongs to one."""
    for key in keys:
        for pattern, label in _UNSUPPORTED:
            if pattern.search(key):
                return label
    return None


def is_ignored(key: str) -> bool:
    return bool(_IGNORED.search(key))


def _split_kohya(key: str) -> KeyPart | None:
    m = _KOHYA_PART.match(key)
    return KeyPart(key, m.group(1), _PART_NAMES[m.group(2)]) if m else None


def _split_dotted(key: str) -> tuple[str, str] | None:
    """(module, suffix) of a diffusers/peft key; legacy processor names mapped to module paths."""
    m = _DIFFUSERS_PART.match(key)
    if not m:
        return None
    module, suffix = m.group(1), m.group(2)
    if suffix in ("down.weight", "up.weight"):
        # bare down/up only exist under legacy processor names: "...attn1.processor.to_q_lora.down.weight"
        if not _PROCESSOR.search(module):
            return None
    module = _PROCESSOR.sub(lambda p: "." + ("to_out.0" if p.group(1) == "to_out" else p.group(1)), module)
    return module, suffix


def _split_diffusers(key: str) -> KeyPart | None:
    parsed = _split_dotted(key)
    return KeyPart(key, parsed[0], _PART_NAMES[parsed[1]]) if parsed else None


def _split_peft(key: str) -> KeyPart | None:
    parsed = _split_dotted(key)
    if parsed is None or not parsed[0].startswith("base_model.model."):
        return None
    return KeyPart(key, parsed[0][len("base_model.model."):], _PART_NAMES[parsed[1]])


def _resolve_kohya(modules: list[str], arch) -> dict[str, list[str]]:
    return {m: [arch.kohya_names[m]] for m in modules if m in arch.kohya_names}


def _resolve_diffusers(modules: list[str], arch) -> dict[str, list[str]]:
    return {m: [arch.aliases[m]] for m in modules if m in arch.aliases}


def _resolve_peft(modules: list[str], arch) -> dict[str, list[str]]:
    # paths are relative to one component; which one is told by the names (and then the shapes)
    components = sorted({name.split(".", 1)[0] for name in arch.modules})
    out = {}
    for m in modules:
        hits = [arch.aliases[f"{c}.{m}"] for c in components if f"{c}.{m}" in arch.aliases]
        if hits:
            out[m] = hits
    return out


@dataclass(frozen=True)
class Layout:
    """One LoRA file layout: how to recognise, read and write it. Adding a layout is one record in
    :data:`LAYOUTS` (and its writer in :mod:`auditkit.lora.write`)."""

    name: str
    prefixes: tuple[str, ...]  # key prefixes that vote for this layout in :func:`detect_layout`
    split: Callable[[str], KeyPart | None]  # key -> (layout module name, part), None: not a LoRA factor
    resolve: Callable[[list[str], object], dict[str, list[str]]]  # module names -> canonical names in an arch
    writer: str  # "module:attr" of (modules, arch, dtype) -> (tensors, metadata), imported when writing
    one_alpha: bool = False  # written with one alpha for every module (see write.uniform_alpha)
    config_file: bool = False  # scales come from an adapter_config.json beside the file (peft)

    def write_state_dict(self, modules, arch, dtype):
        module, _, attr = self.writer.partition(":")
        return getattr(importlib.import_module(module), attr)(modules, arch, dtype)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout(KOHYA, ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"), _split_kohya, _resolve_kohya,
           "auditkit.lora.write:kohya_state_dict", one_alpha=True),
    Layout(DIFFUSERS, ("unet.", "text_encoder.", "text_encoder_2."), _split_diffusers, _resolve_diffusers,
           "auditkit.lora.write:diffusers_state_dict"),
    Layout(PEFT, ("base_model.model.",), _split_peft, _resolve_peft, "auditkit.lora.write:peft_state_dict",
           config_file=True),
)}


def detect_layout(keys: list[str]) -> str | None:
    """The layout most keys' prefixes vote for, or None."""
    votes = dict.fromkeys(LAYOUTS, 0)
    for key in keys:
        for layout in LAYOUTS.values():
            if key.startswith(layout.prefixes):
                votes[layout.name] += 1
                break
    best = max(votes, key=votes.get)
    return best if votes[best] else None


def split_key(key: str, layout: str) -> KeyPart | None:
    """Split one key into its module and part, or None when the key is not a LoRA factor."""
    return LAYOUTS[layout].split(key)
