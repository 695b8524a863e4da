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
  ``configs/original_text_encoders.json``: what diffusers' ``from_single_file`` converters read (the maps:
  :mod:`auditkit.models.original_layout`). Left out
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
from auditkit.models.architectures import Architecture, canonical_name
from auditkit.models.base_weights import component_index
from auditkit.models.families import Family, family_of_class, read_model_index
from auditkit.models.original_layout import (
    IGNORED_ORIGINAL,
    ORIGINAL_HINT,
    Rows,
    Share,
    bundled,
    check_layout,
    openclip_ignored,
    original_map,
    text_encoder_tables,
)


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
        shapes = {n: t.shape for n, t in base.tensors.items()}
        denoiser = denoiser_of(base)
        check_layout(path, keys, denoiser[1])
        naming, names = "original", original_map(shapes, arch, denoiser)
        left_out = openclip_ignored(shapes) | bundled(denoiser[1])[1]
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
        under = sorted({p for p in text_encoder_tables()["openclip"]["prefixes"] if any(k.startswith(p)
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


def denoiser_of(base: Checkpoint) -> tuple[str, str | None]:
    """The base's denoiser component and its class (from its model_index.json; None when unknown)."""
    if base.family is None:
        return "", None
    component = base.family.denoiser
    entry = base.index.get(component)
    return component, (entry[1] if isinstance(entry, list) and len(entry) == 2 else None)


def _placed(st: SafetensorsFile, key: str, held: tuple[Share, ...]) -> dict[str, TensorSource]:
    """The canonical tensors stored under ``key``; a fused tensor must have the rows its pieces add up to."""
    need = max((stop for _, rows, _ in held for _, stop in rows or ()), default=None)
    have = st.tensors[key].shape
    if need is not None and (not have or have[0] != need):
        raise BadInput(st.path, f"tensor {key} is {list(have)} here but the base's "
                                f"{', '.join(c for c, _, _ in held)} it holds have {need} rows: a model of another "
                                "architecture than the base")
    return {canonical: TensorSource(st, key, rows, transpose) for canonical, rows, transpose in held}


FORMS: tuple[Form, ...] = (
    Form("pipeline folder", lambda p: p.is_dir() and (p / "model_index.json").is_file(), _read_pipeline),
    Form("component folder", lambda p: p.is_dir() and (p / "config.json").is_file(), _read_component),
    Form("single file", lambda p: p.is_file(), _read_file),
)
