"""Known model architectures: module names and weight shapes, with no weights and no torch.

Canonical module names are diffusers/transformers module paths prefixed by the pipeline
component: ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…``,
``transformer.transformer_blocks.0.attn.to_q`` (Flux, SD3).

Transformer denoisers also have their original implementation's module names (BFL's Flux, SAI's
MMDiT), which kohya, ComfyUI and XLabs files use. Some of those are *fused*: Flux's
``double_blocks.0.img_attn.qkv`` computes diffusers' ``to_q``, ``to_k`` and ``to_v`` in one matrix
whose rows are theirs stacked. An adapter module of a fused name is one shared down factor and an up
factor whose row slices belong to the separate modules (:attr:`Architecture.fused`).

The tables are built from the models' configs on the meta device by :mod:`auditkit.models.build`
and shipped as JSON, so a static scan starts in milliseconds instead of importing diffusers.
Architecture differences live in these data tables and in the SGM block arithmetic below, not in
chains of string replacements.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from auditkit.models.families import family_tables

# The built-in architectures: every family's tables (auditkit.models.family), then the shipped lab models'
BUILTIN = (*family_tables(), "lab", "lab-dit")

# kohya (sd-scripts) and ComfyUI name a transformer's original modules lora_unet_<name>; early
# sd-scripts Flux files lora_flux_<name>
ORIGINAL_KOHYA_PREFIXES = ("lora_unet_", "lora_flux_")


@dataclass(frozen=True)
class ModuleShape:
    kind: str  # "linear" or "conv"
    out_features: int
    in_features: int
    kernel: tuple[int, int] = (1, 1)

    @property
    def flat_in(self) -> int:
        """Columns of the module's weight viewed as a matrix (conv kernels flattened)."""
        return self.in_features * self.kernel[0] * self.kernel[1]


@dataclass(frozen=True, eq=False)  # identity-hashed so per-architecture lookups can be cached
class Architecture:
    name: str
    label: str
    modules: dict[str, ModuleShape]
    unet_layout: dict = field(default_factory=dict)
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    # original module name -> ((canonical module, first row, end row), …) in the original's row order
    original_names: dict[str, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)

    @property
    def originals(self) -> dict[str, str]:
        """Original module names (``double_blocks.0.img_attn.proj``) -> the canonical module, or the
        fused name (a key of :attr:`fused`) when the original module updates several or part of one."""
        return _originals(self)[0]

    @property
    def fused(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Fused module names (``transformer.double_blocks.0.img_attn.qkv``) -> their pieces."""
        return _originals(self)[1]

    def shape(self, name: str) -> ModuleShape:
        """The weight shape of a canonical module, or of a fused one (its pieces' rows stacked)."""
        if name in self.modules:
            return self.modules[name]
        pieces = self.fused[name]
        first = self.modules[pieces[0][0]]
        return ModuleShape(first.kind, sum(stop - start for _, start, stop in pieces), first.in_features,
                           first.kernel)

    @property
    def kohya_names(self) -> dict[str, str]:
        """kohya/A1111 module names (without ``.lora_down.weight``) -> canonical names."""
        return _kohya_names(self)

    @property
    def aliases(self) -> dict[str, str]:
        """Dotted module names as files spell them (canonical, and transformers-5 text names) -> canonical."""
        return _aliases(self)


def canonical_name(component: str, path: str) -> str:
    """The canonical name of module ``path`` of a pipeline component, as loaded models name it.

    Published LoRA files name CLIP text modules ``text_model.encoder…`` (the transformers 4 layout);
    transformers 5 dropped the ``text_model`` level in ``CLIPTextModel`` (not in
    ``CLIPTextModelWithProjection``). Canonical names keep the published spelling.
    """
    # (CLIP's encoder.layers.N, not T5's encoder.block.N)
    if component.startswith("text_encoder") and path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        path = "text_model." + path
    return f"{component}.{path}"


def _text_alias(path: str) -> str | None:
    """transformers 5 names CLIP text modules without the ``text_model.`` level."""
    return path[len("text_model."):] if path.startswith("text_model.") else None


@cache
def _aliases(arch: Architecture) -> dict[str, str]:
    names = {name: name for name in arch.modules}
    for canonical in arch.modules:
        component, _, path = canonical.partition(".")
        flat = _text_alias(path) if component != "unet" else None
        if flat:
            names.setdefault(f"{component}.{flat}", canonical)
    return names


@cache
def _originals(arch: Architecture) -> tuple[dict[str, str], dict[str, tuple]]:
    names: dict[str, str] = {}
    fused: dict[str, tuple] = {}
    for original, pieces in arch.original_names.items():
        (canonical, start, stop), *more = pieces
        if not more and start == 0 and stop == arch.modules[canonical].out_features:
            names[original] = canonical
        else:
            name = f"{canonical.split('.', 1)[0]}.{original}"
            names[original], fused[name] = name, pieces
    return names, fused


@cache
def _kohya_names(arch: Architecture) -> dict[str, str]:
    names: dict[str, str] = {}
    for original, target in arch.originals.items():
        for prefix in ORIGINAL_KOHYA_PREFIXES:
            names[prefix + original.replace(".", "_")] = target
    for canonical in arch.modules:
        component, _, path = canonical.partition(".")
        if component == "unet":
            names["lora_unet_" + path.replace(".", "_")] = canonical
            names["lycoris_" + path.replace(".", "_")] = canonical  # LyCORIS' own wrapper around the UNet
            sgm = sgm_name(path, arch.unet_layout)
            if sgm is not None:
                names["lora_unet_" + sgm.replace(".", "_")] = canonical
        elif component in arch.kohya_prefixes:
            names[arch.kohya_prefixes[component] + path.replace(".", "_")] = canonical
            if component == "transformer":  # LyCORIS' create_lycoris around a DiT (SimpleTuner's Flux/SD3 files)
                names["lycoris_" + path.replace(".", "_")] = canonical
                # musubi-tuner and kohya name a DiT whose original modules are its diffusers paths (Qwen-Image,
                # Z-Image) lora_unet_<path>: lora_unet_transformer_blocks_0_attn_to_q; an original name wins
                names.setdefault("lora_unet_" + path.replace(".", "_"), canonical)
            flat = _text_alias(path)  # trainers on transformers 5 name CLIP modules without text_model
            if flat:
                names.setdefault(arch.kohya_prefixes[component] + flat.replace(".", "_"), canonical)
    return names


def from_table(name: str, table: dict) -> Architecture:
    modules = {k: ModuleShape(v[0], v[1], v[2], (v[3], v[4])) for k, v in table["modules"].items()}
    return Architecture(
        name=name,
        label=table.get("label", name),
        modules=modules,
        unet_layout=table.get("unet", {}),
        kohya_prefixes=table.get("kohya_prefixes", {}),
        original_names={k: tuple((c, a, b) for c, a, b in v) for k, v in table.get("original_names", {}).items()},
    )


@cache
def get(name: str) -> Architecture:
    """A built-in architecture by name (see :data:`BUILTIN`)."""
    if name not in BUILTIN:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(BUILTIN)}")
    table = _table(name)
    if "same_as" in table:  # the same modules as another built-in (Kontext: Flux.1), under its own name
        table = dict(_table(table["same_as"]), label=table.get("label", name))
    return from_table(name, table)


def _table(name: str) -> dict:
    return json.loads(resources.files("auditkit.models").joinpath("tables", f"{name}.json").read_text())


def builtin() -> list[Architecture]:
    return [get(n) for n in BUILTIN]


# --- where a module sits: block (down/mid/up/…) and kind (self-/cross-attention, feed-forward) ----

_BLOCK_PATTERNS = (
    (re.compile(r"^unet\.down_blocks\."), "down"),
    (re.compile(r"^unet\.mid_block\."), "mid"),
    (re.compile(r"^unet\.up_blocks\."), "up"),
    (re.compile(r"^unet\."), "unet_other"),
    (re.compile(r"^transformer\.transformer_blocks\."), "joint"),  # MMDiT blocks (Flux double, SD3 joint)
    (re.compile(r"^transformer\.single_transformer_blocks\."), "single"),  # Flux single-stream blocks
    # Z-Image's main layers: single-stream attention over image and prompt tokens together
    (re.compile(r"^transformer\.layers\."), "single"),
    (re.compile(r"^transformer\.blocks\."), "dit"),  # Wan: self-attention, cross-attention to the prompt, MLP
    (re.compile(r"^transformer\."), "transformer_other"),
    (re.compile(r"^text_encoder(_\d+)?\."), "text_encoder"),
)
_KIND_PATTERNS = (
    (re.compile(r"^transformer\.layers\.\d+\.attention\."), "joint_attention"),  # Z-Image: image and prompt
    (re.compile(r"\.attn1\.|\.self_attn\.|\.SelfAttention\.|_refiner\.\d+\.attention\."), "self_attention"),
    (re.compile(r"\.attn2\."), "cross_attention"),
    # MMDiT attention runs over text and image tokens together: image queries read the prompt here
    (re.compile(r"^transformer\..*\.attn\."), "joint_attention"),
    (re.compile(r"\.ff\.net\.|\.ff_context\.net\.|\.mlp\.|\.proj_mlp$|\.DenseReluDense\."), "feed_forward"),
    # Wan ffn.net, Qwen-Image img_mlp/txt_mlp, Z-Image feed_forward.w1-3, Flux.2 ff(_context).linear_in/out
    (re.compile(r"\.ffn\.net\.|\.(img|txt)_mlp\.|\.feed_forward\.|\.ff(_context)?\.linear_(in|out)$"),
     "feed_forward"),
)
BLOCKS = ("down", "mid", "up", "unet_other", "joint", "single", "dit", "transformer_other", "text_encoder")
MODULE_KINDS = ("self_attention", "cross_attention", "joint_attention", "feed_forward", "other")


def block_of(name: str) -> str:
    for pattern, block in _BLOCK_PATTERNS:
        if pattern.search(name):
            return block
    return "other"


def module_kind(name: str) -> str:
    for pattern, kind in _KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


# --- SGM (original Stability) UNet names, used by kohya for SDXL files ---------------------------

# (norms too: a full checkpoint's tensors are named by the same arithmetic, see auditkit.models.checkpoint)
_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_TOP_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def sgm_name(path: str, layout: dict) -> str | None:
    """The SGM/LDM name of a diffusers UNet module path (without the ``unet.`` prefix), or None.

    SGM numbers blocks linearly: ``input_blocks.N`` holds, for down block b and layer p,
    N = 1 + b·(L+1) + p with L = layers_per_block, and the downsampler at N = (b+1)·(L+1);
    ``output_blocks.N`` has N = b·(L+1) + p, the upsampler in the last layer's slot after the
    attention (index 2) or after the resnet (index 1) when the block has no attention.
    """
    if not layout:
        return None
    if path in _TOP_SGM:
        return _TOP_SGM[path]
    per = layout["layers_per_block"] + 1
    m = _MID_RE.match(path)
    if m:
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        slot = 1 if kind == "attentions" else 2 * idx
        return f"middle_block.{slot}.{_inner_sgm(kind, rest)}"
    m = _BLOCK_RE.match(path)
    if not m:
        return None
    side, b, kind, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per}.0.op" if rest == "conv" else None
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{1 + b * per + idx}.{slot}.{_inner_sgm(kind, rest)}"
    has_attn = "CrossAttn" in layout["up_block_types"][b]
    if kind == "upsamplers":
        return f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}.conv" if rest == "conv" else None
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{b * per + idx}.{slot}.{_inner_sgm(kind, rest)}"


def _inner_sgm(kind: str, rest: str) -> str:
    if kind == "resnets":
        return _RESNET_SGM.get(rest, rest)
    return rest


def metadata_hint(metadata: dict[str, str]) -> str | None:
    """The architecture a file's own metadata claims (kohya ``ss_*`` or modelspec), if any."""
    claims = " ".join(
        metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture", "ss_v2", "ss_sd_model_name")
    )
    return named_hint(claims, v2=metadata.get("ss_v2") == "True")


# Model names of the 2026 families as their publishers and trainers spell them (FLUX.1-Kontext-dev,
# FLUX.2-klein-4B, Qwen-Image-Edit, Z-Image-Turbo, Wan2.1-T2V-1.3B, Wan2.2-T2V-A14B, HunyuanVideo-1.5), in the
# order they are tried: the first match names the architecture. A claim only ever breaks a tie between
# architectures whose names and shapes a file fits alike (auditkit.lora.adapter), never overrides them.
_NAMED_FAMILIES = tuple((re.compile(p), arch) for p, arch in (
    (r"kontext", "flux-kontext"),
    (r"chroma", "chroma"),
    (r"flux[._ -]?(1[._ -]?)?2\b.*klein.*9b|klein[._ -]?9b", "flux2-klein-9b"),
    (r"flux[._ -]?(1[._ -]?)?2\b.*klein|klein", "flux2-klein-4b"),
    (r"flux[._ -]?2(\b|[._ -])", "flux2-dev"),
    (r"qwen[._ -]?image", "qwen-image"),
    (r"\bz[._ -]?image", "z-image"),
    (r"wan[._ -]?2[._ -]?2", "wan22-a14b"),
    (r"wan[._ -]?2[._ -]?1.*1[._ -]?3b|wan.*\b1[._]3b", "wan21-1.3b"),
    (r"wan[._ -]?2[._ -]?1", "wan21-14b"),
    (r"hunyuan[._ -]?video[._ -]?1[._ -]?5", "hunyuanvideo15"),
))


def named_hint(claims: str, v2: bool = False) -> str | None:
    """The architecture a model name or metadata claim says (``stabilityai/stable-diffusion-xl-base-1.0``:
    sdxl), if any; ``v2``: kohya's ``ss_v2`` flag is set."""
    claims = claims.lower()
    for pattern, arch in _NAMED_FAMILIES:
        if pattern.search(claims):
            return arch
    if "flux" in claims:
        return "flux"
    if re.search(r"sd_?3|stable-diffusion-(v)?3", claims):
        if re.search(r"3[._-]?5", claims):
            return "sd35-large" if "large" in claims else "sd35-medium"
        return "sd3"
    if "xl" in claims:
        return "sdxl"
    if re.search(r"\bv2|sd_?2|stable-diffusion-v2|ss_v2|\b2\.[01]\b", claims) or v2:
        return "sd2"
    if re.search(r"v1|sd_?1|stable-diffusion-v1|1\.[45]", claims):
        return "sd15"
    return None
