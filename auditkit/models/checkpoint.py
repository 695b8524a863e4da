"""Full models (erased or fine-tuned checkpoints) read tensor by tensor, by canonical name, without torch.

ESD, UCE, MACE and AdvUnlearn ship the erased model itself, and fine-tuners publish full checkpoints:
a safety module or a candidate can be a whole model instead of an adapter. Its update is its
difference to the model it was made from (:mod:`auditkit.models.difference`); this module finds its
tensors. Forms, one :class:`Form` record each in :data:`FORMS` (the first that matches reads it):

* **pipeline folder**: a ``save_pretrained`` folder with ``model_index.json``, of the base's family;
  every component the base has weights for must be there with ``.safetensors`` weights;
* **component folder**: one component's folder (``config.json`` and its weights: ``unet/``,
  ``text_encoder/``, ``transformer/``); which component it is comes from its tensor names and shapes;
* **single file**: one ``.safetensors`` file in diffusers names (``unet.…``, ``text_encoder.…``, or one
  component's names with no prefix) or in the original layout of full checkpoints: LDM/SGM UNets
  (``model.diffusion_model.input_blocks.…``, named by :func:`auditkit.models.architectures.sgm_name`), CLIP
  text encoders under ``cond_stage_model.transformer.`` (SD 1.x) and ``conditioner.embedders.0.transformer.``
  (SDXL), OpenCLIP text encoders under ``cond_stage_model.model.`` (SD 2.x) and ``conditioner.embedders.1.model.``
  (SDXL's second; the refiner's ``conditioner.embedders.0.model.``), the text encoders a ComfyUI Flux.1/SD3
  file bundles (``text_encoders.clip_l.transformer.…``, ``clip_g``, ``t5xxl``: each the base's component of
  that name's model, diffusers' names after the prefix), and transformers under their original names, bare or
  under ``model.diffusion_model.``: Flux.1's (BFL: ``double_blocks.0.img_attn.qkv.weight``, ``img_in.…``) and
  SD3/SD3.5's (SAI: ``joint_blocks.0.x_block.…``, ``pos_embed``). The originals fuse tensors diffusers keeps
  apart: a canonical tensor can be row ranges of a stored one (:class:`TensorSource`), ``img_attn.qkv``
  holding ``to_q``, ``to_k`` and ``to_v``, ``single_blocks.N.linear1`` those and ``proj_mlp``,
  ``final_layer.adaLN_modulation.1`` ``norm_out.linear`` with its halves swapped, OpenCLIP's
  ``attn.in_proj_weight`` ``q_proj``, ``k_proj`` and ``v_proj``; or a stored one transposed (OpenCLIP's
  ``text_projection``, diffusers' ``text_projection.weight``). The modules' original names and row pieces are
  the architecture's (``configs/original_names.json``, sized by the base's own tensors), the other tensors
  (q/k norms, SD3's position table) are ``configs/original_tensors.json``, the text encoders'
  ``configs/original_text_encoders.json``: what diffusers' ``from_single_file`` converters read. Left out
  (:attr:`Checkpoint.ignored`), as diffusers' converters leave them out: VAE weights (``first_stage_model.``;
  the base's VAE renders), training bookkeeping, OpenCLIP's ``logit_scale``, SD 2.x's last resblock and
  ``text_projection`` (its text encoder is the file's penultimate layer: 23 of 24) and a bundled clip_l's
  ``text_projection.weight`` (diffusers puts the identity in its place, which is not compared).

Canonical tensor names are ``<component>.<tensor name in the component's weight file>``, CLIP text
tensors spelled with the ``text_model.`` level as canonical module names are
(:func:`auditkit.models.architectures.canonical_name`). Pickle weights are refused, never read.

Example:
    >>> base = open_checkpoint(lab_pipeline_path())                       # doctest: +SKIP
    >>> erased = open_checkpoint("esd-unet/", base=base)                  # doctest: +SKIP
    >>> erased.form, erased.components                                    # doctest: +SKIP
    ('component folder', ('unet',))
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.io import FLOAT_DTYPES, SafetensorsFile, open_safetensors
from auditkit.models.architectures import Architecture, canonical_name, sgm_name
from auditkit.models.base_weights import component_index
from auditkit.models.build import block_roots, config_table, original_names
from auditkit.models.families import Family, family_of_class, read_model_index

# Original (LDM/SGM) prefixes of full single-file checkpoints: prefix -> the component it holds in
# diffusers names (the denoiser's names are mapped by the architecture, see _original_map).
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


@dataclass(frozen=True)
class TensorSource:
    """Where one canonical tensor lies: a key of a file, or row ranges of it stacked in order (``rows``;
    None: all of it), transposed when ``transpose`` (after its rows are taken). A fused original tensor
    is several canonical ones: Flux's ``img_attn.qkv`` is ``to_q`` rows (0, n), ``to_k`` (n, 2n), ``to_v``
    (2n, 3n); ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its halves swapped, rows
    ((n, 2n), (0, n)). OpenCLIP's ``text_projection`` (width, embed dim) is diffusers'
    ``text_projection.weight`` transposed."""

    file: SafetensorsFile
    key: str
    rows: Rows | None = None
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        stored = self.file.tensors[self.key].shape
        if self.rows is not None:
            stored = (sum(stop - start for start, stop in self.rows), *stored[1:])
        return tuple(reversed(stored)) if self.transpose else tuple(stored)

    @property
    def is_float(self) -> bool:
        return self.file.tensors[self.key].dtype in FLOAT_DTYPES

    def array(self) -> np.ndarray:
        """The tensor as stored (float, checked finite), its rows taken when it is a share of a fused one
        (only they are read: a bfloat16 file's fused tensor is not decoded whole for each share), transposed
        when it is stored transposed."""
        if self.rows is None:
            value = self.file.float_array(self.key)
        else:
            value = np.concatenate([self.file.float_array(self.key, rows) for rows in self.rows])
        return np.ascontiguousarray(value.T) if self.transpose else value


@dataclass
class Checkpoint:
    """A full model's tensors by canonical name.

    Attributes:
        path: the folder or file as given.
        form: a :data:`FORMS` name.
        naming: how a single file names its tensors: ``diffusers`` (component prefixes), ``component``
            (one component's names, no prefix: ``component`` says which) or ``original`` (LDM/SGM, BFL, SAI).
        tensors: canonical tensor name -> where it lies.
        unmapped: keys of the files that name no tensor auditkit can place (count against coverage).
        ignored: keys deliberately left out (VAE of an original checkpoint, bookkeeping, integer buffers).
        notes: what a user should know about how it was read.
        metadata: a single file's ``__metadata__`` (untrusted text).
        family, index: a pipeline folder's family and ``model_index.json``, read once when it is opened (a base's
            are what models opened against it are checked with).
    """

    path: Path
    form: str
    tensors: dict[str, TensorSource]
    naming: str = "diffusers"
    unmapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    family: Family | None = None
    index: dict = field(default_factory=dict, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as stored (float, checked finite)."""
        return self.tensors[name].array()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({n.split(".", 1)[0] for n in self.tensors}))

    @property
    def files(self) -> list[SafetensorsFile]:
        return list({id(s.file): s.file for s in self.tensors.values()}.values())

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def sha256(self) -> str:
        """The file's sha256; for a folder, sha256 over its weight files' relative paths and hashes."""
        if self._sha256 is None:
            files = sorted(self.files, key=lambda f: str(f.path))
            if self.path.is_file():
                self._sha256 = files[0].sha256
            else:
                h = hashlib.sha256()
                for f in files:
                    h.update(f"{f.path.relative_to(self.path).as_posix()}\0{f.sha256}\n".encode())
                self._sha256 = h.hexdigest()
        return self._sha256


@dataclass(frozen=True)
class Form:
    """One way a full model is stored: how it is recognised and read."""

    name: str
    matches: Callable[[Path], bool]
    read: Callable[[Path, Checkpoint | None, Architecture | None], Checkpoint]


def open_checkpoint(path: str | Path, base: Checkpoint | None = None, arch: Architecture | None = None) -> Checkpoint:
    """Read a full model's tensor index (headers only; tensors are memory-mapped and read on demand).

    Args:
        path: a pipeline folder, a component folder or a single ``.safetensors`` file.
        base: the base model it is compared with (needed for component folders and single files, to
            place their tensors; a pipeline folder must be of the base's family).
        arch: the base's architecture (names an original-layout file's UNet tensors; a transformer's
            original names are sized by the base's own tensors).

    Raises:
        BadInput: pickle weights, a folder that is no model, missing components, another family than
            the base, tensors that fit no component of the base.
    """
    path = Path(path)
    if not path.exists():
        raise BadInput(path, "no such file or folder")
    form = next((f for f in FORMS if f.matches(path)), None)
    if form is None:
        raise BadInput(path, "is a folder but neither a diffusers pipeline folder (model_index.json) nor a "
                             "component folder (config.json)")
    return form.read(path, base, arch)


def _model_components(path: Path, index: dict) -> list[str]:
    """Components of a pipeline folder that hold a model (listed in its model_index.json ``index``, with a
    config.json or listed as a model class), in the index's order."""
    names = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        if (path / name / "config.json").is_file() or not (path / name).is_dir():
            names.append(name)
    return names


def _read_pipeline(path: Path, base: Checkpoint | None, arch: Architecture | None) -> Checkpoint:
    index = read_model_index(path)
    family = family_of_class(index.get("_class_name"), path / "model_index.json")
    components = _model_components(path, index)
    notes = []
    if base is not None:
        if base.family is not None:
            base_family = base.family
            if base_family.name != family.name:
                raise BadInput(path, f"is a {family.label} pipeline ({family.pipeline_class}) but the base is a "
                                     f"{base_family.label} pipeline: a model of another family than the base")
        needed = (*family.lora_components, "vae")  # what renders; a safety checker or image encoder may be absent
        missing = [c for c in base.components if c in needed and (c not in components or not (path / c).is_dir())]
        if missing:
            raise BadInput(path, f"component '{missing[0]}' is missing (the base has it; model_index.json must list it "
                                 "and its folder must hold its weights)")
        extra = [c for c in components if c not in base.components]
        if extra:  # e.g. a safety checker the base was saved without: the scan neither compares nor renders it
            notes.append(f"component(s) {', '.join(extra)} are not in the base: not compared")
            components = [c for c in components if c in base.components]
    tensors = {}
    for component in components:
        folder = path / component
        if not folder.is_dir():
            raise BadInput(path, f"component '{component}' is listed in model_index.json but its folder is missing")
        tensors.update(_component_tensors(folder, component))
    return Checkpoint(path, "pipeline folder", tensors, notes=notes, family=family, index=index)


def _component_tensors(folder: Path, component: str) -> dict[str, TensorSource]:
    files: dict[Path, SafetensorsFile] = {}
    out = {}
    for key, file in component_index(folder).items():
        if file not in files:
            files[file] = open_safetensors(file)
        if key not in files[file].tensors:
            raise BadInput(file, f"has no tensor '{key}', though the shard index lists it there")
        out[canonical_name(component, key)] = TensorSource(files[file], key)
    return out


def _read_component(path: Path, base: Checkpoint | None, arch: Architecture | None) -> Checkpoint:
    base = _need_base(path, base)
    if path.name in base.components:
        component = path.name
    else:
        index = component_index(path)
        component = _component_of(path, {k: open_safetensors(f).tensors[k].shape for k, f in index.items()}, base)
    return Checkpoint(path, "component folder", _component_tensors(path, component))


def _need_base(path: Path, base: Checkpoint | None) -> Checkpoint:
    if base is None:
        raise BadInput(path, "a full model's update is its difference to the base: give the base (--base)")
    return base


def _component_of(path: Path, shapes: dict[str, tuple], base: Checkpoint) -> str:
    """The base component whose tensor names and shapes the keys match best."""
    scores = {}
    for component in base.components:
        scores[component] = sum(1 for key, shape in shapes.items()
                                if (t := base.tensors.get(canonical_name(component, key))) is not None
                                and t.shape == tuple(shape))
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    if not ranked or ranked[0][1] == 0:
        from auditkit.lora.identify import looks_like_adapter

        if looks_like_adapter(list(shapes)):
            raise BadInput(path, "its keys are a LoRA adapter's, not a full model's: an adapter is scanned as it is "
                                 "(--base and extract compare fine-tuned or erased models with the base)")
        raise BadInput(path, f"its tensors match no component of the base ({base.path}) by name and shape: "
                             "a model of another architecture than the base" + _what_it_is(shapes))
    if len(ranked) > 1 and ranked[1][1] == ranked[0][1]:
        raise BadInput(path, f"its tensors match the base's {ranked[0][0]} and {ranked[1][0]} equally: name the "
                             "component by the folder (e.g. unet/) or prefix the keys (unet.…)")
    return ranked[0][0]


def _what_it_is(shapes: dict[str, tuple]) -> str:
    from auditkit.lora.identify import identify_keys

    found = identify_keys(list(shapes), {}, shapes)
    return f" (it is {found.split(', not an adapter')[0]})" if found else ""


def _read_file(path: Path, base: Checkpoint | None, arch: Architecture | None) -> Checkpoint:
    st = open_safetensors(path)
    base = _need_base(path, base)
    keys = list(st.tensors)
    if not keys:
        raise BadInput(path, "file holds no tensors")
    ignored = [k for k in keys if st.tensors[k].dtype not in FLOAT_DTYPES]
    keys = [k for k in keys if k not in set(ignored)]
    tensors: dict[str, TensorSource] = {}
    unmapped, notes = [], []
    if any(k.split(".", 1)[0] in base.components for k in keys):  # diffusers names with component prefixes
        naming = "diffusers"
        for key in keys:
            component, _, rest = key.partition(".")
            if component in base.components and rest:
                tensors[canonical_name(component, rest)] = TensorSource(st, key)
            else:
                unmapped.append(key)
    elif any(ORIGINAL_HINT.match(k) for k in keys):
        _check_layout(path, keys, base)
        naming, names = "original", _original_map(base, arch)
        left_out = openclip_ignored({n: t.shape for n, t in base.tensors.items()}) | _bundled(base)[1]
        left_out_under = tuple(p for p in left_out if p.endswith("."))
        for key in keys:
            if IGNORED_ORIGINAL.match(key) or key in left_out or key.startswith(left_out_under):
                ignored.append(key)
            elif key in names:
                tensors.update(_placed(st, key, names[key]))
            else:
                unmapped.append(key)
        if any(k.startswith("first_stage_model.") for k in ignored):
            notes.append("its VAE (first_stage_model) is not compared: images are decoded with the base's VAE")
        under = sorted({p for p in _text_encoder_tables()["openclip"]["prefixes"] if any(k.startswith(p)
                                                                                         for k in unmapped)})
        if under:
            notes.append(f"its OpenCLIP text encoder tensors under {', '.join(under)} fit no text encoder of the base "
                         "(they are unmapped): a model of another architecture than the base, or a text encoder "
                         "the base lacks")
        if any(k.startswith("text_encoders.") for k in unmapped):
            notes.append("text encoders bundled under text_encoders.… (ComfyUI's all-in-one files) are read against a "
                         "Flux.1 or SD3/SD3.5 base only, each into the base's component of that model")
        if any(re.match(r"(model\.)?(diffusion_model\.)?(double_blocks|single_blocks|joint_blocks)\.", k)
               for k in unmapped):
            notes.append("a transformer in its original layout (Flux.1's double_blocks…, SD3's joint_blocks…) is read "
                         "against a base of that model only, its tensors named bare or under model.diffusion_model.")
    else:  # one component's diffusers names, no prefix
        naming = "component"
        component = _component_of(path, {k: st.tensors[k].shape for k in keys}, base)
        for key in keys:
            canonical = canonical_name(component, key)
            if canonical in base.tensors:
                tensors[canonical] = TensorSource(st, key)
            else:
                unmapped.append(key)
    if not tensors:
        raise BadInput(path, f"none of its tensors names a tensor of the base ({base.path}): a model of another "
                             "architecture than the base" + _what_it_is({k: st.tensors[k].shape for k in keys})
                       + (f"; {notes[-1]}" if notes else ""))
    return Checkpoint(path, "single file", tensors, naming, sorted(unmapped), sorted(ignored), notes,
                      dict(st.metadata))


def _original_map(base: Checkpoint, arch: Architecture | None) -> dict[str, tuple[Share, ...]]:
    """Original key -> the canonical tensors it holds (:data:`Share`: each with its rows of it, None: all of
    it, and whether it is stored transposed): the base's UNet (LDM/SGM names), first CLIP text encoder,
    OpenCLIP text encoder (:func:`openclip_tensor_map`) and the text encoders a ComfyUI file of its denoiser
    bundles (:func:`_bundled`), and its transformer (:func:`_transformer_map`)."""
    names: dict[str, tuple[Share, ...]] = {}
    layout = arch.unet_layout if arch is not None else {}
    text_prefixes = {**ORIGINAL_TEXT_PREFIXES, **_bundled(base)[0]}
    for canonical in base.tensors:
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
    names.update(openclip_tensor_map({n: t.shape for n, t in base.tensors.items()}))
    names.update({k: tuple((c, rows, False) for c, rows in held) for k, held in _transformer_map(base).items()})
    return names


def _bundled(base: Checkpoint) -> tuple[dict[str, str], frozenset[str]]:
    """The text encoders an all-in-one file of the base's denoiser class bundles (ComfyUI's Flux.1 and SD3
    files: ``text_encoders.clip_l.transformer.…``): prefix -> component, and the names diffusers discards."""
    tables = _text_encoder_tables()["bundled"]
    prefixes = tables["prefixes"].get(_denoiser(base)[1], {})
    return prefixes, frozenset(n for n in tables["ignored"] if n.startswith(tuple(prefixes)))


def _text_encoder_tables() -> dict:
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
    spec = _text_encoder_tables()["openclip"]
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
    spec = _text_encoder_tables()["openclip"]
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


def _denoiser(base: Checkpoint) -> tuple[str, str | None]:
    """The base's denoiser component and its class (from its model_index.json; None when unknown)."""
    if base.family is None:
        return "", None
    component = base.family.denoiser
    entry = base.index.get(component)
    return component, (entry[1] if isinstance(entry, list) and len(entry) == 2 else None)


def _check_layout(path: Path, keys: list[str], base: Checkpoint) -> None:
    """BadInput when the file holds a transformer in the original layout of another class than the base's
    denoiser (a Flux.1 file against an SD3 or SD 1.x base: some names, final_layer's, are common to both)."""
    roots = {k.removeprefix("model.diffusion_model.").split(".", 1)[0] for k in keys}
    found = next((c for c in _original_tensors() if roots & block_roots(c)), None)
    theirs = _denoiser(base)[1]
    if found is not None and found != theirs:
        raise BadInput(path, f"its tensors are a {found} in its original layout "
                             f"({', '.join(sorted(roots & block_roots(found)))}) but the base's denoiser is "
                             f"{theirs or 'unknown'}: a model of another architecture than the base")


def _transformer_map(base: Checkpoint) -> dict[str, tuple[tuple[str, Rows | None], ...]]:
    """:func:`original_tensor_map` of the base's transformer (its class from the base's model_index.json)."""
    component, class_name = _denoiser(base)
    return original_tensor_map(class_name, component,
                               {n: base.tensors[n].shape for n in base.tensors if n.startswith(component + ".")})


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


def _placed(st: SafetensorsFile, key: str, held: tuple[Share, ...]) -> dict[str, TensorSource]:
    """The canonical tensors stored under ``key``; a fused tensor must have the rows its pieces add up to."""
    need = max((stop for _, rows, _ in held for _, stop in rows or ()), default=None)
    have = st.tensors[key].shape
    if need is not None and (not have or have[0] != need):
        raise BadInput(st.path, f"tensor {key} is {list(have)} here but the base's "
                                f"{', '.join(c for c, _, _ in held)} it holds have {need} rows: a model of another "
                                "architecture than the base")
    return {canonical: TensorSource(st, key, rows, transpose) for canonical, rows, transpose in held}


def snippet(checkpoint: Checkpoint, base: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """diffusers code that puts ``checkpoint`` into ``pipe`` (a pipeline of ``base``): for a repair pack's manifest."""
    path = str(checkpoint.path)
    if checkpoint.form == "pipeline folder":
        return f"pipe = diffusers.{pipeline_class}.from_pretrained({path!r}, use_safetensors=True)\n"
    load = f"pipe = diffusers.{pipeline_class}.from_pretrained({base!r}, use_safetensors=True)\n"
    if checkpoint.form == "component folder":
        (component,) = checkpoint.components
        return load + f"pipe.{component} = type(pipe.{component}).from_pretrained({path!r}, use_safetensors=True)\n"
    if checkpoint.naming == "original" and checkpoint.components == ("transformer",):  # a BFL/SAI transformer file
        return load + (f"pipe.transformer = type(pipe.transformer).from_single_file({path!r}, config={base!r}, "
                       'subfolder="transformer")\n')
    if checkpoint.naming == "original":
        return f"pipe = diffusers.{pipeline_class}.from_single_file({path!r}, config={base!r})\n"
    lines = [load, "from safetensors.torch import load_file\n", f"state = load_file({path!r})\n"]
    for component in checkpoint.components:
        keys = "state" if checkpoint.naming == "component" else \
            f"{{k[{len(component) + 1}:]: v for k, v in state.items() if k.startswith({component + '.'!r})}}"
        lines.append(f"pipe.{component}.load_state_dict({keys}, strict=False)  # it holds {component}'s tensors\n")
    return "".join(lines)


FORMS: tuple[Form, ...] = (
    Form("pipeline folder", lambda p: p.is_dir() and (p / "model_index.json").is_file(), _read_pipeline),
    Form("component folder", lambda p: p.is_dir() and (p / "config.json").is_file(), _read_component),
    Form("single file", lambda p: p.is_file(), _read_file),
)
