"""Recognise adapter key layouts and split keys into (module, part).

Layouts people publish (see ../shared/FIELD.md):

* ``kohya``     ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
                ``lora_te_`` (SDXL ``lora_te1_``/``lora_te2_``); LyCORIS files use the same names with
                their own suffixes (``hada_w1_a``, ``lokr_w1``, ``diff``, ``lora_mid.weight``,
                ``dora_scale``), and LyCORIS' own wrapper writes ``lycoris_<path>``. Flux/SD3 files name
                the transformer's original modules (``lora_unet_double_blocks_0_img_attn_qkv``, fused
                q/k/v; early sd-scripts ``lora_flux_…``) or its diffusers paths (``lora_transformer_…``),
                and the T5 encoder ``lora_te3_``.
* ``diffusers`` ``unet.<dotted.path>.lora.down.weight`` / ``.lora.up.weight`` (older),
                ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (peft-backed), legacy
                attention-processor names (``attn1.processor.to_q_lora.down.weight``), ``text_encoder.…``,
                ``transformer.…`` (Flux/SD3: diffusers, ai-toolkit).
* ``original``  a transformer's original module names (BFL Flux, SAI MMDiT), optionally under
                ``diffusion_model.`` (ComfyUI): ``double_blocks.0.img_attn.qkv.lora_A.weight`` or
                ``.lora_down.weight`` / ``.alpha``, SD3's ``joint_blocks.0.x_block.attn.qkv…``; fused
                modules as for kohya.
* ``xlabs``     XLabs' Flux processor LoRAs: ``double_blocks.0.processor.qkv_lora1.down.weight`` (no alphas).
* ``diffusers-unet`` the same legacy names with no component prefix (``down_blocks.0.…``): what
                diffusers' training scripts wrote as ``pytorch_lora_weights.safetensors`` before mid-2023.
* ``diffusers-transformer`` a Flux/SD3 transformer's diffusers paths with no component prefix
                (``single_transformer_blocks.0.attn.to_q.lora_A.weight``): peft's state dict of the
                transformer saved as it is by custom training scripts; no alphas (scale 1, as diffusers).
* ``peft``      ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight`` + ``adapter_config.json``
                (also peft's LoHa/LoKr ``hada_*``/``lokr_*`` and DoRA ``lora_magnitude_vector``).

Each layout is one :class:`Layout` record in :data:`LAYOUTS`: the key prefixes that identify it, how
a key splits into (module, part), how module names resolve to an architecture's canonical names
(pure lookups in its tables), and its writer. The shape checks live in :mod:`auditkit.lora.adapter`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass

KOHYA, DIFFUSERS, DIFFUSERS_UNET, PEFT = "kohya", "diffusers", "diffusers-unet", "peft"
DIFFUSERS_TRANSFORMER = "diffusers-transformer"
ORIGINAL, XLABS = "original", "xlabs"

# Adapter algorithms auditkit recognises but cannot read: named so users are told what they hold.
_UNSUPPORTED = (
    (re.compile(r"\.oft_(blocks|diag)|\.oft_r\b|\.boft_|\.oft_R\b"), "OFT/BOFT"),
    (re.compile(r"\.(glora_|ia3_|on_input\b)|\.weight_ia3"), "LyCORIS GLoRA/IA3"),
)

# Layouts recognised but not read: (a key of the layout matches, what it is and why it is not read).
_UNREADABLE_LAYOUTS = (
    # cloneofsimo/lora's lora_diffusion (2022-23): "unet:0:up", "text_encoder:5:down", and metadata listing the
    # target classes; a module is only its index in a walk over the model's modules of those classes, an order
    # that depends on the diffusers version it was trained with (attention class names changed since)
    (re.compile(r"^(unet|text_encoder):\d+:(up|down)$"),
     "cloneofsimo's lora_diffusion format (positional keys such as 'unet:0:up'), which is not supported: it names "
     "modules only by their position in the model, which auditkit cannot place with certainty; convert it to the "
     "kohya or diffusers layout with the tools of the diffusers version it was trained with"),
)

# Keys that carry no weight update of a scanned module: textual-inversion embeddings bundled by
# kohya, and framework bookkeeping.
_IGNORED = re.compile(r"^(bundle_emb\.|emb_params$|clip_l$|clip_g$|string_to_param\.|string_to_token\.)")

# Every key suffix a weight-update part is stored under -> the part name the algorithms use
# (auditkit.lora.algorithms). The module name is what precedes the suffix.
SUFFIX_PARTS = {
    # LoRA / LoCon (kohya, diffusers old and peft-backed, legacy attention processors, peft)
    "lora_down.weight": "down", "lora.down.weight": "down", "lora_A.weight": "down",
    "lora_linear_layer.down.weight": "down", "down.weight": "down",
    "lora_up.weight": "up", "lora.up.weight": "up", "lora_B.weight": "up",
    "lora_linear_layer.up.weight": "up", "up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_B.bias": "bias", "lora_up.bias": "bias",
    "alpha": "alpha",
    # LyCORIS LoHa, LoKr, full
    **{f"hada_{w}": f"hada_{w}" for w in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{w}": f"lokr_{w}" for w in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "diff": "diff", "diff_b": "bias",
    # DoRA magnitude: kohya/LyCORIS dora_scale, peft lora_magnitude_vector
    "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
}
_SUFFIXES = "|".join(re.escape(k) for k in sorted(SUFFIX_PARTS, key=len, reverse=True))
_KOHYA_PART = re.compile(rf"^((?:lora_(?:unet|te\d?|transformer|flux)|lycoris)_[A-Za-z0-9_]+)\.({_SUFFIXES})$")
_DOTTED_PART = re.compile(rf"^(.+?)\.({_SUFFIXES})$")
# diffusers' legacy attention-processor LoRA names: attn1.processor.to_q_lora -> attn1.to_q
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# diffusers' training scripts before mid-2023 wrote UNet keys with no component prefix
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
# A DiT transformer's own module paths (diffusers' FluxTransformer2DModel, SD3Transformer2DModel)
_DIT_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
              "time_text_embed.", "norm_out.", "proj_out.", "pos_embed.")
# Original transformer module names (BFL Flux, SAI MMDiT); ComfyUI puts them under diffusion_model.
_ORIGINAL_ROOTS = ("diffusion_model.", "double_blocks.", "single_blocks.", "joint_blocks.", "final_layer.",
                   "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "x_embedder.", "t_embedder.",
                   "y_embedder.")
_XLABS_PART = re.compile(r"^(?:diffusion_model\.)?((?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
                         r"\.(down|up)\.weight$")


@dataclass(frozen=True)
class KeyPart:
    key: str
    module: str  # layout-specific module name (kohya name, or dotted path with component prefix)
    part: str  # a part name of SUFFIX_PARTS: "down", "up", "alpha", "hada_w1_a", "lokr_w1", "diff", …


def unsupported_algorithm(keys: list[str]) -> str | None:
    """The name of an adapter algorithm auditkit cannot read, if any key belongs to one."""
    for key in keys:
        for pattern, label in _UNSUPPORTED:
            if pattern.search(key):
                return label
    return None


def unreadable_layout(keys: list[str]) -> str | None:
    """What a file in a layout auditkit recognises but does not read is, and why, if any key is of one."""
    return next((why for pattern, why in _UNREADABLE_LAYOUTS if any(pattern.match(k) for k in keys)), None)


def is_ignored(key: str) -> bool:
    return bool(_IGNORED.search(key))


def _split_kohya(key: str) -> KeyPart | None:
    m = _KOHYA_PART.match(key)
    return KeyPart(key, m.group(1), SUFFIX_PARTS[m.group(2)]) if m else None


def _split_dotted(key: str) -> KeyPart | None:
    """A diffusers/peft key's (module, part); legacy processor names mapped to module paths."""
    m = _DOTTED_PART.match(key)
    if not m:
        return None
    module, suffix = m.group(1), m.group(2)
    if suffix in ("down.weight", "up.weight"):
        # bare down/up only exist under legacy processor names: "...attn1.processor.to_q_lora.down.weight"
        if not _PROCESSOR.search(module):
            return None
    module = _PROCESSOR.sub(lambda p: "." + ("to_out.0" if p.group(1) == "to_out" else p.group(1)), module)
    return KeyPart(key, module, SUFFIX_PARTS[suffix])


def _split_unprefixed(key: str) -> KeyPart | None:
    kp = _split_dotted(key) if key.startswith(_UNET_ROOTS) else None
    return KeyPart(key, "unet." + kp.module, kp.part) if kp else None


def _split_unprefixed_transformer(key: str) -> KeyPart | None:
    kp = _split_dotted(key) if key.startswith(_DIT_ROOTS) else None
    return KeyPart(key, "transformer." + kp.module, kp.part) if kp else None


def _split_peft(key: str) -> KeyPart | None:
    kp = _split_dotted(key)
    if kp is None or not kp.module.startswith("base_model.model."):
        return None
    return KeyPart(key, kp.module[len("base_model.model."):], kp.part)


def _split_original(key: str) -> KeyPart | None:
    kp = _split_dotted(key.removeprefix("diffusion_model."))
    return KeyPart(key, kp.module, kp.part) if kp else None


def _split_xlabs(key: str) -> KeyPart | None:
    m = _XLABS_PART.match(key)
    return KeyPart(key, m.group(1), m.group(2)) if m else None


def is_xlabs_name(original: str) -> bool:
    """True for an original-name table entry that is an XLabs processor LoRA, not a BFL/SAI module."""
    return _XLABS_PART.match(original + ".down.weight") is not None


def is_bfl_name(original: str) -> bool:
    return not is_xlabs_name(original)


def _resolve_original(modules: list[str], arch) -> dict[str, list[str]]:
    """Original module names, or a transformer's own diffusers paths under ``diffusion_model.``: ComfyUI and
    musubi-tuner name Qwen-Image's and Z-Image's modules so (their original modules are the diffusers ones)."""
    out = {}
    for m in modules:
        target = arch.originals.get(m) or arch.aliases.get(f"transformer.{m}")
        if target is not None:
            out[m] = [target]
    return out


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
    writer: str | None  # "module:attr" of (modules, arch, dtype) -> (tensors, metadata); None: read only
    one_alpha: bool = False  # written with one alpha for every module (see write.uniform_alpha)
    config_file: bool = False  # scales come from an adapter_config.json beside the file (peft)
    holds: str = ""  # regex of the canonical modules the layout can name ("" = every module)
    vote_pattern: str = ""  # regex a key must also match to vote for the layout ("" = the prefix is enough)

    def votes(self, key: str) -> bool:
        return key.startswith(self.prefixes) and (not self.vote_pattern or bool(re.search(self.vote_pattern, key)))

    def can_hold(self, canonical: str) -> bool:
        return not self.holds or re.search(self.holds, canonical) is not None

    def write_state_dict(self, modules, arch, dtype):
        if self.writer is None:
            raise ValueError(f"auditkit reads the {self.name} layout but does not write it")
        module, _, attr = self.writer.partition(":")
        return getattr(importlib.import_module(module), attr)(modules, arch, dtype)


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout(KOHYA, ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_", "lora_flux_",
                   "lycoris_"), _split_kohya, _resolve_kohya, "auditkit.lora.write:kohya_state_dict", one_alpha=True),
    Layout(DIFFUSERS, ("unet.", "text_encoder.", "text_encoder_2.", "transformer."), _split_dotted,
           _resolve_diffusers, "auditkit.lora.write:diffusers_state_dict"),
    Layout(DIFFUSERS_UNET, _UNET_ROOTS, _split_unprefixed, _resolve_diffusers,
           "auditkit.lora.write:legacy_unet_state_dict", holds=r"^unet\..*\.attn\d\.(to_q|to_k|to_v|to_out\.0)$"),
    Layout(DIFFUSERS_TRANSFORMER, _DIT_ROOTS, _split_unprefixed_transformer, _resolve_diffusers,
           "auditkit.lora.write:bare_transformer_state_dict", holds=r"^transformer\."),
    Layout(PEFT, ("base_model.model.",), _split_peft, _resolve_peft, "auditkit.lora.write:peft_state_dict",
           config_file=True),
    # XLabs before original: both start with double_blocks., only XLabs keys have processor LoRAs
    Layout(XLABS, _ORIGINAL_ROOTS, _split_xlabs, _resolve_original, "auditkit.lora.write:xlabs_state_dict",
           vote_pattern=_XLABS_PART.pattern,
           holds=r"^transformer\.(transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|"
                 r"single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_out))$"),
    Layout(ORIGINAL, _ORIGINAL_ROOTS, _split_original, _resolve_original, "auditkit.lora.write:original_state_dict",
           vote_pattern=rf"\.({_SUFFIXES})$",  # a full BFL/SAI checkpoint (…qkv.weight) is no adapter
           holds=r"^transformer\."),
)}


def detect_layout(keys: list[str]) -> str | None:
    """The layout most keys' prefixes vote for, or None."""
    votes = dict.fromkeys(LAYOUTS, 0)
    for key in keys:
        for layout in LAYOUTS.values():
            if layout.votes(key):
                votes[layout.name] += 1
                break
    best = max(votes, key=votes.get)
    return best if votes[best] else None


def split_key(key: str, layout: str) -> KeyPart | None:
    """Split one key into its module and part, or None when the key is not a LoRA factor."""
    return LAYOUTS[layout].split(key)
