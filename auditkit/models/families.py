"""Model families: which diffusers pipeline class loads a base folder, and which of its components hold
the modules LoRA adapters change.

A family is one :class:`Family` record in :data:`FAMILIES`; loading (``--base DIR``), architectures of
loaded pipelines, adapter loading and its coverage check, and fused rendering all read it, so adding a
family is one record here plus what its pipeline needs that the others do not.

A folder's family comes from its ``model_index.json`` (``_class_name``, written by ``save_pretrained``);
a loaded pipeline's from its class. No torch or diffusers import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import read_json

MODEL_INDEX_LIMIT = 1 << 20  # a real model_index.json is under 1 KiB


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    pipeline_class: str  # the diffusers class that loads a folder of this family
    class_names: tuple[str, ...]  # model_index.json ``_class_name`` values of this family
    denoiser: str  # the component that predicts noise ("unet"; "transformer" for SD3/Flux)
    text_encoders: tuple[str, ...]  # text-encoder components, in kohya order (lora_te1_, lora_te2_, …)
    load_options: dict = field(default_factory=dict)  # extra from_pretrained keyword arguments
    # "module:attr" of (pipe, prompts) -> Conditioning: what the denoiser reads (auditkit.models.conditioning)
    conditioning: str = "auditkit.models.conditioning:encode_sd"
    # "module:attr" of the Denoising record: how the denoiser is called, trained (its diffusion process)
    # and sampled, for align, finetune, repair's retraining and the data-free checks (auditkit.models.denoising)
    denoising: str = "auditkit.models.denoising:UNET"
    # kohya prefixes of the text encoders (component -> prefix); empty: lora_te_, or lora_te1_/lora_te2_
    kohya_prefixes: dict = field(default_factory=dict)
    # auditkit.lora.formats layouts whose files diffusers' loader for this family reads with the scales and
    # modules auditkit reads: those files are handed to diffusers as they are; any other is handed over as
    # auditkit's exact conversion (a diffusers state dict of the same updates)
    native_layouts: tuple[str, ...] = ("kohya", "diffusers", "peft")
    # "module:attr" of (pipe) -> keyword arguments of every render call (e.g. the image size)
    render_options: str | None = None
    # the layout align, finetune and repair write adapters in: kohya, or for Flux/SD3 the diffusers layout,
    # which their diffusers loaders read as it is and which holds any subset of a fused original module
    # (kohya names Flux's/SD3's q, k, v (and Flux's single-block MLP) as one module, written whole or not at all)
    written_layout: str = "kohya"

    @property
    def lora_components(self) -> tuple[str, ...]:
        """Components whose modules adapters change, denoiser first."""
        return (self.denoiser, *self.text_encoders)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "Stable Diffusion 1.x / 2.x", "StableDiffusionPipeline", ("StableDiffusionPipeline",),
           "unet", ("text_encoder",),
           load_options={"safety_checker": None, "requires_safety_checker": False}),
    Family("sdxl", "Stable Diffusion XL (and fine-tunes: Pony, Illustrious, …)", "StableDiffusionXLPipeline",
           ("StableDiffusionXLPipeline",), "unet", ("text_encoder", "text_encoder_2"),
           conditioning="auditkit.models.conditioning:encode_sdxl"),
    # diffusers' Flux loader bakes kohya alphas into the factors, names kohya's txt_in/final_layer modules
    # without the transformer prefix (and so drops them), splits single blocks at Flux.1's real widths
    # only, and reads peft files as fal Kontext ones: only diffusers-layout files go to it as they are
    # (tests/lora/test_flux_files.py). It loads no T5 (text_encoder_2) LoRA.
    Family("flux", "Flux.1 (dev/schnell)", "FluxPipeline", ("FluxPipeline",), "transformer",
           ("text_encoder", "text_encoder_2"), conditioning="auditkit.models.conditioning:encode_flux",
           denoising="auditkit.models.denoising:FLUX",
           kohya_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
           native_layouts=("diffusers",), render_options="auditkit.models.rendering:flux_options",
           written_layout="diffusers"),
    # diffusers' SD3 loader converts no kohya or original-named file and reads peft files as nothing: only
    # diffusers-layout files go to it as they are. It loads no T5 (text_encoder_3) LoRA. SD3 renders at
    # the transformer's sample_size × the VAE factor by itself.
    Family("sd3", "Stable Diffusion 3 / 3.5", "StableDiffusion3Pipeline", ("StableDiffusion3Pipeline",),
           "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"),
           conditioning="auditkit.models.conditioning:encode_sd3", denoising="auditkit.models.denoising:SD3",
           kohya_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
           native_layouts=("diffusers",), written_layout="diffusers"),
)}


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


def family_of_pipeline(pipe) -> Family:
    """The family of a loaded pipeline, from its class (or a base class: subclasses are the same family)."""
    for cls in type(pipe).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.class_names:
                return family
    return family_of_class(type(pipe).__name__)
