"""Full models made by code from the shipped lab, in every form auditkit reads.

An erased model is the base with its safety update applied: here the lab's own Safety LoRA merged into
the lab's weights (exactly, in float64, stored in the lab's float32), written as a pipeline folder, a
component folder, or a single ``.safetensors`` file in diffusers names (with component prefixes, or one
component's names alone) or in the original LDM layout of full checkpoints.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from auditkit.lab.model import lab_pipeline_path
from auditkit.lora.adapter import LoraModule
from auditkit.lora.io import open_safetensors, serialize
from auditkit.models.base import resolve_base

ADAPTERS = resources.files("auditkit.lab").joinpath("assets", "adapters")
SAFETY_U = Path(str(ADAPTERS.joinpath("safety-esd-u-destructive.safetensors")))
SAFETY_X = Path(str(ADAPTERS.joinpath("safety-esd-x-destructive.safetensors")))
FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
         "vae": "diffusion_pytorch_model.safetensors"}


def lab_tensors(component: str) -> dict[str, np.ndarray]:
    """Copies of the lab pipeline's tensors of one component, named as its file names them."""
    st = open_safetensors(lab_pipeline_path() / component / FILES[component])
    return {k: np.array(st.array(k)) for k in st.tensors}


def _key(tensors: dict, path: str, param: str = "weight") -> str:
    """The file's key of a module path (transformers 5 saves CLIP text modules without ``text_model.``)."""
    for candidate in (f"{path}.{param}", f"{path.removeprefix('text_model.')}.{param}"):
        if candidate in tensors:
            return candidate
    raise KeyError(path)


def merged(component: str, *adapters: tuple[dict[str, LoraModule], float]) -> dict[str, np.ndarray]:
    """The lab component's tensors with each adapter's modules (of that component) merged at its multiplier."""
    tensors = lab_tensors(component)
    for modules, multiplier in adapters:
        for name, m in modules.items():
            comp, _, path = name.partition(".")
            if comp != component:
                continue
            key = _key(tensors, path)
            w = tensors[key]
            tensors[key] = (w.astype(np.float64) + multiplier * m.delta().reshape(w.shape)).astype(w.dtype)
    return tensors


def components_of(*adapters) -> list[str]:
    return sorted({n.split(".", 1)[0] for mods, _ in adapters for n in mods})


def pipeline_folder(folder: Path, *adapters: tuple[dict[str, LoraModule], float]) -> Path:
    """A copy of the lab pipeline with the adapters merged into its weights."""
    shutil.copytree(lab_pipeline_path(), folder)
    for component in components_of(*adapters):
        (folder / component / FILES[component]).write_bytes(serialize(merged(component, *adapters)))
    return folder


def component_folder(folder: Path, *adapters, component: str = "unet") -> Path:
    """One component's folder (config.json and weights), adapters merged."""
    folder.mkdir(parents=True)
    shutil.copy(lab_pipeline_path() / component / "config.json", folder / "config.json")
    (folder / FILES[component]).write_bytes(serialize(merged(component, *adapters)))
    return folder


def original_names() -> dict[str, str]:
    """Canonical tensor name -> its key in an original (LDM) single-file checkpoint of the lab."""
    from auditkit.models import architectures
    from auditkit.models.checkpoint import denoiser_of
    from auditkit.models.difference import open_base
    from auditkit.models.original_layout import original_map

    base = open_base(resolve_base("lab"))
    names = original_map({n: t.shape for n, t in base.tensors.items()}, architectures.get("lab"), denoiser_of(base))
    out: dict[str, str] = {}
    for original, held in names.items():
        if original.startswith(("cond_stage_model.model.", "conditioner.embedders.0.model.",
                                "conditioner.embedders.1.model.")):
            continue  # OpenCLIP's names of the text encoder (SD 2.x, SDXL's second): the lab's is OpenAI CLIP's
        [(canonical, _, _)] = held  # the lab's original tensors are each one canonical tensor, whole
        if original.startswith("cond_stage_model.") and "text_model." not in original:
            continue  # the map accepts both transformers spellings; write the published one
        out[canonical] = original
    return out


def single_file(path: Path, *adapters, naming: str = "diffusers") -> Path:
    """A single .safetensors file: ``diffusers`` (unet./text_encoder./vae. prefixes), ``component`` (the UNet's
    names alone) or ``original`` (LDM names, with training bookkeeping and a VAE the reader leaves out)."""
    from auditkit.models.architectures import canonical_name

    parts = {c: merged(c, *adapters) for c in ("unet", "text_encoder", "vae")}
    if naming == "component":
        tensors = parts["unet"]
    elif naming == "diffusers":
        tensors = {f"{c}.{k}": v for c, t in parts.items() for k, v in t.items()}
    else:
        names = original_names()
        tensors = {names[canonical_name(c, k)]: v for c in ("unet", "text_encoder") for k, v in parts[c].items()
                   if canonical_name(c, k) in names}
        tensors["first_stage_model.decoder.conv_out.weight"] = np.zeros((3, 4, 3, 3), np.float32)
        tensors["alphas_cumprod"] = np.linspace(1, 0, 10, dtype=np.float32)
    path.write_bytes(serialize(tensors, {"note": json.dumps({"made": "by the tests"})}))
    return path


def assert_original_layout_places_like_diffusers(model_class, config: dict, original_of, converter,
                                                 prefixes=("", "model.diffusion_model.")) -> None:
    """At a real model's size on the meta device: diffusers' ``converter`` turns the original-layout shapes
    ``original_of(model config)`` into exactly the model's state dict, and auditkit's original map names every
    original tensor (under each of ``prefixes``) and places each canonical tensor once, at its shape."""
    import torch

    from auditkit.models.original_layout import original_tensor_map

    with torch.device("meta"):
        model = model_class(**config)
    original = original_of(dict(model.config))
    shapes = {f"transformer.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    converted = converter({k: torch.empty(s, device="meta") for k, s in original.items()})
    assert {f"transformer.{k}": tuple(v.shape) for k, v in converted.items()} == shapes
    names = original_tensor_map(model_class.__name__, "transformer", shapes)
    assert set(names) == {prefix + k for k in original for prefix in prefixes}
    placed = {}
    for key, stored in original.items():
        for canonical, rows in names[key]:
            assert canonical not in placed
            placed[canonical] = (sum(b - a for a, b in rows), *stored[1:]) if rows else stored
    assert placed == shapes
