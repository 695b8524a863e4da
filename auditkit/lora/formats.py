"""Recognise LoRA key layouts and split keys into (module, part).

Layouts people publish (see ../shared/FIELD.md):

* ``kohya``     ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
                ``lora_te_`` (SDXL ``lora_te1_``/``lora_te2_``); conv "LoCon" kernels included.
* ``diffusers`` ``unet.<dotted.path>.lora.down.weight`` / ``.lora.up.weight`` (older),
                ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (peft-backed), legacy
                attention-processor names (``attn1.processor.to_q_lora.down.weight``), ``text_encoder.…``.
* ``peft``      ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` + ``adapter_config.json``.

The functions here are pure: they look at key names only. Resolution of module names against
an architecture and the shape checks live in :mod:`auditkit.lora.adapter`.
"""

from __future__ import annotations

import re
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


def detect_layout(keys: list[str]) -> str | None:
    """``kohya``, ``diffusers``, ``peft`` or None, by the majority of key prefixes."""
    votes = {KOHYA: 0, DIFFUSERS: 0, PEFT: 0}
    for key in keys:
        if key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            votes[KOHYA] += 1
        elif key.startswith("base_model.model."):
            votes[PEFT] += 1
        elif key.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            votes[DIFFUSERS] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] else None


def is_ignored(key: str) -> bool:
    return bool(_IGNORED.search(key))


def split_key(key: str, layout: str) -> KeyPart | None:
    """Split one key into its module and part, or None when the key is not a LoRA factor."""
    if layout == KOHYA:
        m = _KOHYA_PART.match(key)
        return KeyPart(key, m.group(1), _PART_NAMES[m.group(2)]) if m else None
    m = _DIFFUSERS_PART.match(key)
    if not m:
        return None
    module, suffix = m.group(1), m.group(2)
    if suffix in ("down.weight", "up.weight"):
        # bare down/up only exist under legacy processor names: "...attn1.processor.to_q_lora.down.weight"
        if not _PROCESSOR.search(module):
            return None
    module = _PROCESSOR.sub(lambda p: "." + ("to_out.0" if p.group(1) == "to_out" else p.group(1)), module)
    if layout == PEFT:
        if not module.startswith("base_model.model."):
            return None
        module = module[len("base_model.model."):]
    return KeyPart(key, module, _PART_NAMES[suffix])
