"""The model-family registry: every family module (:mod:`auditkit.models.family`) and the lookups of a
folder's, a ``model_index.json``'s and a loaded pipeline's family.

A family is one module declaring one :class:`~auditkit.models.family.record.Family` record; :data:`MODULES`
lists them and :data:`FAMILIES` holds their records by name. Loading (``--base DIR``), architectures of
loaded pipelines (and :data:`auditkit.models.architectures.BUILTIN`, from the records' tables), adapter
loading and its coverage check, fused rendering, prompt encoding and the denoiser's calls all read it, so
adding a family is one module plus its entry in :data:`MODULES`.

A folder's family comes from its ``model_index.json`` (``_class_name``, written by ``save_pretrained``);
a loaded pipeline's from its class. No torch or diffusers import here.
"""

from __future__ import annotations

from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import read_json
from auditkit.models.family import (
    chroma,
    flux,
    flux2,
    hunyuanvideo,
    kontext,
    qwen_image,
    sd,
    sd3,
    sdxl,
    wan,
    z_image,
)
from auditkit.models.family.record import Family

__all__ = ["FAMILIES", "MODULES", "Family", "family_of_class", "family_of_folder", "family_of_index",
           "family_of_pipeline", "family_tables", "known_family", "read_model_index", "supported_classes"]

MODEL_INDEX_LIMIT = 1 << 20  # a real model_index.json is under 1 KiB


# The family modules, in the order their built-in architecture tables are tried (architectures.BUILTIN)
MODULES = (sd, sdxl, flux, sd3, kontext, chroma, flux2, qwen_image, z_image, wan, hunyuanvideo)
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in MODULES}


def family_tables() -> tuple[str, ...]:
    """Every family's built-in architecture tables, in :data:`MODULES` order."""
    return tuple(t for f in FAMILIES.values() for t in f.tables)


def supported_classes() -> list[str]:
    return sorted(c for f in FAMILIES.values() for c in f.class_names)


def family_of_class(class_name: object, path: str | Path | None = None) -> Family:
    """The family whose pipelines are ``class_name``; BadInput naming the supported classes otherwise."""
    for family in FAMILIES.values():
        if class_name in family.class_names:
            return family
    what = f"pipeline class {class_name!r}" if class_name else "no pipeline class (_class_name)"
    raise BadInput(path, f"{what} is not supported; supported: {', '.join(supported_classes())}")


def read_model_index(folder: str | Path) -> dict:
    """``model_index.json`` of a pipeline folder as a dict (BadInput when missing or not a JSON object)."""
    path = Path(folder) / "model_index.json"
    if not (path.exists() or path.is_symlink()):
        raise BadInput(folder, "not a diffusers pipeline folder (no model_index.json)")
    index = read_json(path, "model_index.json", limit=MODEL_INDEX_LIMIT)
    if not isinstance(index, dict):
        raise BadInput(path, "not a JSON object")
    return index


def family_of_folder(folder: str | Path) -> Family:
    """The family of a ``save_pretrained`` pipeline folder, from its ``model_index.json``."""
    return family_of_index(read_model_index(folder), folder)


def family_of_index(index: dict, folder: str | Path) -> Family:
    """The family a pipeline folder's ``model_index.json`` (``index``, already read) names."""
    return family_of_class(index.get("_class_name"), Path(folder) / "model_index.json")


def known_family(pipe) -> Family | None:
    """The family of a loaded pipeline, or None for a pipeline of no known family (a stand-in, such as the tests'
    fake pipelines, which renders with its own defaults and answers diffusers' LoRA calls itself)."""
    try:
        return family_of_pipeline(pipe)
    except BadInput:
        return None


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its class (or a base class: subclasses are the same family)."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.class_names:
                return family
    return family_of_class(type(pipe).__name__)
