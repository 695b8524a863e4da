"""Name files that are not LoRA adapters for what they are.

Users hand auditkit whatever ``.safetensors`` (or ``.safetensors``-named) file they have: a clone
made without git-lfs leaves ~130-byte pointer files, a download behind a login saves the hub's
HTML page, and the file may be a textual-inversion embedding, a full checkpoint or one component
of a diffusers pipeline rather than an adapter. "header length 2336927755350992246 is absurd" or
"no LoRA keys recognised" is true but unhelpful; these functions say what the file is instead.

Both functions are pure (no file access) and return ``None`` when unsure. Recognisers are data:
tuples of records matched in order, first match wins. A file's content is never quoted (a batch may be
pointed at any readable file); only its own metadata (tensor names, ``modelspec`` fields) is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A safetensors header's length limit (the reference implementation's own); its one home, as auditkit.lora.io
# reads files with it and imports this module.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_SNIPPET = 60  # characters of a file's metadata (a key name, a modelspec field) quoted in a message

# --------------------------------------------------------------------------------------------
# identify_bytes: files that cannot be safetensors at all

LFS_SPEC = "version https://git-lfs.github.com/spec/v1"


def _could_be_safetensors(head: bytes) -> bool:
    """8 bytes of little-endian header length within the limit, then the header's opening ``{``."""
    if len(head) < 10:  # the smallest valid file is 8 bytes of length + "{}"
        return False
    return int.from_bytes(head[:8], "little") <= MAX_HEADER_BYTES and head[8:9] == b"{"


def _text(head: bytes) -> str | None:
    """``head`` decoded as UTF-8 text (a character cut at the end of the buffer forgiven), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data" or exc.start < len(head) - 3:
            return None
        text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    if not text.strip() or any(not (c.isprintable() or c in "\t\n\r\f") for c in text):
        return None  # NUL and other control characters: binary, not text
    return text


def _quote(text: str) -> str:
    """A short, single-line quotation of untrusted text for a message."""
    flat = " ".join(text.split())
    return '"' + (flat if len(flat) <= _SNIPPET else flat[: _SNIPPET - 1] + "…") + '"'


def _lfs_pointer(text: str) -> str | None:
    if not text.startswith(LFS_SPEC):
        return None
    fields = dict(line.partition(" ")[::2] for line in text.splitlines() if line.strip())
    size = fields.get("size", "").strip()
    of_size = f" (the real file has {int(size):,} bytes)" if size.isdigit() else ""
    return f"a Git LFS pointer, not the weights{of_size}: fetch them with `git lfs pull`"


_HTML_START = re.compile(r"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body|meta|title)\b", re.I | re.S)


def _html_page(text: str) -> str | None:
    if not _HTML_START.match(text):
        return None
    # its title is the file's content, not its metadata: never quoted (the file may be anything a link points to)
    return ("an HTML page, not a safetensors file: the download saved a web page (a login, consent or error "
            "page?) instead of the weights; download the file itself again")


# What a JSON document is, from a key it has: (key, description). First match wins.
_JSON_KINDS: tuple[tuple[str, str], ...] = (
    ('"weight_map"', "a sharded checkpoint's index (*.safetensors.index.json), not the weights: "
                     "the tensors are in the shard files it lists"),
    ('"peft_type"', "a PEFT adapter_config.json, not the weights: they are in adapter_model.safetensors "
                    "beside it"),
    ('"_class_name"', "a diffusers config (model_index.json or config.json), not weights"),
    ('"architectures"', "a transformers config.json, not weights"),
    ('"trainedWords"', "a civitai model-info sidecar (JSON), not the weights"),
)


def _json_document(text: str) -> str | None:
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return None
    if re.match(r'\{\s*"error"\s*:', stripped):  # model hubs answer refused downloads this way
        return "a JSON error response, not a safetensors file: the download failed; fetch the file again"
    for key, description in _JSON_KINDS:
        if key in stripped:
            return description
    return "a JSON document, not a safetensors file"


def _plain_text(text: str) -> str | None:
    # named, never quoted: a link or a manifest can point at any readable file (a key, a password file)
    return "a text file, not a safetensors file"


# Text recognisers in order; the last one accepts any text.
_TEXT_KINDS = (_lfs_pointer, _html_page, _json_document, _plain_text)

# Binary formats by their magic bytes: (magic, description).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantised weights), not a safetensors file"),
)


def identify_bytes(head: bytes) -> str | None:
    """What a file is, from its first bytes, when it cannot be a safetensors file.

    A safetensors file opens with a little-endian u64 header length and then the JSON header's
    ``{``. Only when that reading is impossible (the length is absurd or no ``{`` follows) is the
    file identified: a Git LFS pointer, an HTML page, a JSON document, other UTF-8 text, a GGUF file.

    Args:
        head: the file's first bytes (about 1 KiB is plenty; the whole file if it is shorter).

    Returns:
        A one-line description such as ``"a Git LFS pointer, not the weights (...): fetch them with
        `git lfs pull`"``, or ``None`` for a plausible safetensors file or anything not recognised.

    Example:
        >>> identify_bytes(b"version https://git-lfs.github.com/spec/v1\\noid sha256:ab\\nsize 42\\n")
        'a Git LFS pointer, not the weights (the real file has 42 bytes): fetch them with `git lfs pull`'
        >>> identify_bytes(b"\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}") is None
        True
    """
    if _could_be_safetensors(head):
        return None
    for magic, description in _MAGIC:
        if head.startswith(magic):
            return description
    text = _text(head)
    if text is None:
        return None
    for recognise in _TEXT_KINDS:
        found = recognise(text)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------------------
# identify_keys: valid safetensors files that hold no adapter

_NOT_ADAPTER = "not an adapter"
_EXTRACT_HINT = ("; a full model (an erased checkpoint or a fine-tune) is scanned with --base, its update being "
                 "its difference to the base, or extracted as an adapter with `auditkit extract`")

# Keys that suggest some adapter after all (a layout the reader does not know): then say nothing.
_ADAPTER_HINT = re.compile(r"lora|lokr|hada_|(^|[._])oft_|dora_scale|\.alpha$|\.(up|down)\.weight$", re.I)


@dataclass(frozen=True)
class KeyKind:
    """One kind of non-adapter file, recognised by its key names.

    Attributes:
        name: short identifier, used by the family tables below.
        pattern: a key of this kind matches it from its start (``re.match``).
        description: what the file is. ``{family}`` becomes ``family_format`` filled with the model
            family when one is known (else nothing), ``{key}`` the first matching key, ``{n}`` the
            number of keys.
        family_format: how the family reads inside the description.
        extract_hint: a full model's weights that can be fine-tuned (scanned as a full model, or
            extracted): add the hint that says so.
        all_keys: every key must match, not just one.
    """

    name: str
    pattern: re.Pattern[str]
    description: str
    family_format: str = " {}"
    extract_hint: bool = False
    all_keys: bool = False


def _kind(name: str, pattern: str, description: str, **options) -> KeyKind:
    return KeyKind(name, re.compile(pattern), description, **options)


_TI = ("a textual-inversion embedding{family} ({layout}), " + _NOT_ADAPTER
       + ": it adds a token to the prompt vocabulary and changes no weights")
_FOR = " for {}"

KEY_KINDS: tuple[KeyKind, ...] = (
    _kind("ti", r"emb_params$", _TI.replace("{layout}", "kohya/A1111 format, key 'emb_params'"), family_format=_FOR),
    _kind("ti", r"string_to_param\.", _TI.replace("{layout}", "A1111 format, 'string_to_param'"),
          family_format=_FOR),
    _kind("ti-sdxl", r"clip_[lg]$", _TI.replace("{layout}", "SDXL format, keys 'clip_l'/'clip_g'"),
          family_format=_FOR),
    _kind("ti", r"<[^<>]+>$", _TI.replace("{layout}", "diffusers format, token {key}"), family_format=_FOR),
    _kind("checkpoint", r"(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner\.embedders)\.",
          "a full{family} checkpoint in the original (LDM/SGM) layout, " + _NOT_ADAPTER, extract_hint=True),
    _kind("flux", r"double_blocks\.\d+\.img_attn\.qkv\.weight$",
          "a Flux.1 transformer in the original BFL layout (full weights), " + _NOT_ADAPTER, extract_hint=True),
    _kind("sd3", r"joint_blocks\.\d+\.",
          "an SD3 MMDiT in the original layout (full weights), " + _NOT_ADAPTER, extract_hint=True),
    _kind("unet", r"(unet\.)?down_blocks\.\d+\.resnets\.\d+\.conv1\.weight$",
          "a diffusers{family} UNet (full weights), " + _NOT_ADAPTER, extract_hint=True),
    _kind("transformer", r"(transformer\.)?((single_)?transformer_blocks\.\d+\.attn|blocks\.\d+\.attn1|"
                         r"layers\.\d+\.attention)\.to_q\.weight$",
          "a diffusers{family} transformer (full weights), " + _NOT_ADAPTER, extract_hint=True),
    _kind("wan", r"(model\.diffusion_model\.|diffusion_model\.)?blocks\.\d+\.self_attn\.q\.weight$",
          "a Wan transformer in the original layout (full weights), " + _NOT_ADAPTER, extract_hint=True),
    _kind("vae", r"(vae\.)?encoder\.(down_blocks\.\d+\.resnets|down\.\d+\.block)\.",
          "a VAE (autoencoder weights), " + _NOT_ADAPTER),
    _kind("clip", r"(text_encoder(_\d)?\.)?(text_model\.)?encoder\.layers\.\d+\.self_attn\.q_proj\.weight$",
          "a CLIP text encoder (full weights{family}), " + _NOT_ADAPTER, family_format="; {}", extract_hint=True),
    _kind("t5", r"(encoder\.)?block\.\d+\.layer\.0\.SelfAttention\.q\.weight$",
          "a T5 text encoder (full weights), " + _NOT_ADAPTER),
    # A few dot-free keys (token names) holding vectors: diffusers' save of learned embeddings.
    _kind("ti-tokens", r"(?!weight$|bias$)[^.]{1,80}$", _TI.replace("{layout}", "diffusers format, token {key}"),
          family_format=_FOR, all_keys=True),
    # Weights and biases of a diffusion model's blocks, but not a whole component (the kinds above match those):
    # a partial checkpoint, e.g. an erasure method's changed tensors only.
    _kind("partial", r"(unet\.|transformer\.|text_encoder(_\d)?\.)?(down_blocks\.\d+|mid_block|up_blocks\.\d+|"
                     r"(single_)?transformer_blocks\.\d+|(text_model\.)?encoder\.layers\.\d+)\..*\.(weight|bias)$",
          "full weights of part of a model{family}: {n} tensors such as {key}, a partial checkpoint (e.g. only the "
          "changed tensors) with no LoRA or PEFT adapter layers, " + _NOT_ADAPTER + "; a full model is read whole "
          "(a pipeline or component folder, or a whole-model file) with --base", family_format=" ({})",
          all_keys=True),
    # Anything else made only of weights and biases: an ordinary model's parameters.
    _kind("model", r".+\.(weight|bias)$",
          "the weights of an ordinary model ({n} tensors such as {key}) with no LoRA or PEFT adapter layers, "
          + _NOT_ADAPTER, all_keys=True),
)

# Model family from the presence of a key: (kind, pattern, family). First match wins.
FAMILY_BY_KEY: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (kind, re.compile(pattern), family) for kind, pattern, family in (
        ("checkpoint", r"model\.diffusion_model\.double_blocks\.", "Flux.1"),
        ("checkpoint", r"model\.diffusion_model\.joint_blocks\.", "SD3"),
        ("checkpoint", r"conditioner\.embedders\.", "SDXL"),
        ("checkpoint", r"model\.diffusion_model\.label_emb\.", "SDXL"),
        ("checkpoint", r"cond_stage_model\.model\.transformer\.resblocks\.", "SD2.x"),
        ("checkpoint", r"cond_stage_model\.transformer\.", "SD1.x"),
        ("unet", r"(unet\.)?add_embedding\.linear_1\.", "SDXL"),
        # (the 2026 families' diffusers transformers, by a module only they have, before Flux.1's)
        ("transformer", r"(transformer\.)?single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj\.", "Flux.2"),
        ("transformer", r"(transformer\.)?distilled_guidance_layer\.", "Chroma"),
        ("transformer", r"(transformer\.)?transformer_blocks\.\d+\.img_mlp\.", "Qwen-Image"),
        ("transformer", r"(transformer\.)?context_embedder_2\.", "HunyuanVideo 1.5"),
        ("transformer", r"(transformer\.)?blocks\.\d+\.attn1\.", "Wan"),
        ("transformer", r"(transformer\.)?layers\.\d+\.attention\.to_q\.", "Z-Image"),
        ("transformer", r"(transformer\.)?single_transformer_blocks\.", "Flux"),
        ("transformer", r"(transformer\.)?pos_embed\.proj\.", "SD3"),
        ("ti-sdxl", r"clip_g$", "SDXL"),
    )
)

# Model family from a tensor's width: (kinds, key pattern, axis, {width: family}). First match wins.
# Cross-attention keys read the text embedding: 768-d (SD1.x), 1024-d (SD2.x), 2048-d (SDXL).
_CROSS_ATTN = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}
FAMILY_BY_WIDTH: tuple[tuple[frozenset[str], re.Pattern[str], int, dict[int, str]], ...] = (
    (frozenset({"checkpoint", "unet", "partial"}), re.compile(r".*attn2\.to_k\.weight$"), 1, _CROSS_ATTN),
    (frozenset({"clip"}), re.compile(r".*self_attn\.q_proj\.weight$"), 0,
     {768: "ViT-L/14, as in SD1.x and SDXL's first text encoder", 1024: "OpenCLIP ViT-H/14, as in SD2.x",
      1280: "OpenCLIP ViT-bigG/14, as in SDXL's second text encoder"}),
    (frozenset({"ti", "ti-tokens"}), re.compile(r".*"), -1, {768: "SD1.x", 1024: "SD2.x"}),
)


def _matching_key(kind: KeyKind, keys: Sequence[str]) -> str | None:
    if kind.all_keys:
        return keys[0] if all(kind.pattern.match(k) for k in keys) else None
    return next((k for k in keys if kind.pattern.match(k)), None)


def _family(kind: str, keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    for name, pattern, family in FAMILY_BY_KEY:
        if name == kind and any(pattern.match(k) for k in keys):
            return family
    for kinds, pattern, axis, widths in FAMILY_BY_WIDTH:
        if kind in kinds:
            for key in keys:
                shape = shapes.get(key) or ()
                if pattern.match(key) and -len(shape) <= axis < len(shape) and shape[axis] in widths:
                    return widths[shape[axis]]
    return None


def _plausible_embedding(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> bool:
    """Dot-free keys alone are an embedding only when few, with known shapes, each 1- or 2-D."""
    return len(keys) <= 16 and all(k in shapes and len(shapes[k]) in (1, 2) for k in keys)


def identify_keys(
    keys: list[str],
    metadata: dict[str, str],
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> str | None:
    """What a valid safetensors file with no LoRA keys holds, from its tensor names (and shapes).

    Recognised, in this order (:data:`KEY_KINDS`): textual-inversion embeddings (kohya/A1111
    ``emb_params``, ``string_to_param.*``, SDXL ``clip_l``/``clip_g``, diffusers token keys such as
    ``<s1>``), full checkpoints in the original LDM/SGM layout (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*``, ``conditioner.embedders.*``), Flux.1
    ``double_blocks.*`` and SD3 ``joint_blocks.*`` originals, diffusers components (UNet, Flux/SD3
    transformer, VAE, CLIP or T5 text encoder), and any other plain ``.weight``/``.bias`` model.
    The family (SD1.x/SD2.x/SDXL/SD3/Flux) is named when the keys or, if given, the shapes tell it
    (e.g. the cross-attention ``attn2.to_k`` input width 768/1024/2048).

    Args:
        keys: the file's tensor names.
        metadata: the file's ``__metadata__``; a declared ``modelspec.architecture`` is quoted
            when the keys do not tell the family (metadata can be wrong, so it never decides).
        shapes: tensor name -> shape, optional; lets widths tell the family.

    Returns:
        A one-line description, or ``None`` when unsure (including keys that look like an
        adapter in a layout auditkit does not know).

    Example:
        >>> identify_keys(["model.diffusion_model.input_blocks.0.0.weight",
        ...                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"], {})[:46]
        'a full SDXL checkpoint in the original (LDM/SG'
    """
    shapes = shapes or {}
    bundled = _bundled_with_adapter(keys, shapes)
    if bundled:
        return bundled
    found = key_kind(keys, shapes)
    if found is not None:
        kind, key = found
        family = _family(kind.name, keys, shapes)
        text = kind.description.replace("{family}", kind.family_format.format(family) if family else "")
        declared = " ".join(metadata.get("modelspec.architecture", "").split())
        if not family and declared and "{family}" in kind.description:
            text += f" (its metadata declares modelspec.architecture {_quote(declared)})"
        text = text.replace("{n}", f"{len(keys):,}").replace("{key}", _quote(key))
        return text + (_EXTRACT_HINT if kind.extract_hint else "")
    return None


_BUNDLED_MIN_WEIGHTS = 16


def looks_like_adapter(keys: list[str]) -> bool:
    """True when some key is named like an adapter's (LoRA, LyCORIS, DoRA factors or alphas)."""
    return any(_ADAPTER_HINT.search(k) for k in keys)


def _bundled_with_adapter(keys: list[str], shapes: Mapping[str, Sequence[int]]) -> str | None:
    """A model's full weights saved together with adapter keys (a merged-and-saved UNet with its LoRA beside it):
    neither an adapter nor a full model auditkit can read as one. A few full weights beside adapter keys say
    nothing (an adapter layout auditkit does not know may hold some): a component has hundreds."""
    adapter = [k for k in keys if _ADAPTER_HINT.search(k)]
    rest = [k for k in keys if not _ADAPTER_HINT.search(k)]
    found = key_kind(rest, shapes) if adapter and len(rest) >= _BUNDLED_MIN_WEIGHTS else None
    if found is None or not found[0].extract_hint:
        return None
    what = found[0].description.split(" (")[0].replace("{family}", "")
    return (f"{what} (full weights: {len(rest):,} tensors) bundled with {len(adapter):,} LoRA keys (such as "
            f"{_quote(adapter[0])}), not an adapter on its own: save the adapter's keys alone to scan them")


def key_kind(keys: list[str], shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[KeyKind, str] | None:
    """The first :data:`KEY_KINDS` record a non-adapter file's keys match, with the matching key; None for
    adapter-like keys or keys of no known kind."""
    shapes = shapes or {}
    if not keys or looks_like_adapter(keys):
        return None
    for kind in KEY_KINDS:
        key = _matching_key(kind, keys)
        if key is not None and (kind.name != "ti-tokens" or _plausible_embedding(keys, shapes)):
            return kind, key
    return None


def is_full_model(keys: list[str], shapes: Mapping[str, Sequence[int]] | None = None) -> bool:
    """True for the keys of a full model's weights that can be fine-tuned (a checkpoint, a denoiser, a CLIP
    text encoder): what ``auditkit scan`` and ``auditkit extract`` read as a full model."""
    found = key_kind(keys, shapes)
    return found is not None and found[0].extract_hint
