"""The :class:`Family` record every family module (:mod:`auditkit.models.family`) declares. No torch here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auditkit.models.denoising import Denoising


@dataclass(frozen=True)
class Family:
    """One model family. ``tables``: its built-in architectures (``configs/<table>.json``), in the order
    they are tried; a family without ``pipeline_class`` is known to the static scan only (its adapters are
    read and scanned statically; no pipeline of it loads)."""

    name: str
    label: str
    tables: tuple[str, ...]
    pipeline_class: str | None = None  # the diffusers class that loads a folder of this family
    class_names: tuple[str, ...] = ()  # model_index.json ``_class_name`` values of this family
    denoiser: str = "unet"  # the component that predicts noise ("unet"; "transformer" for SD3/Flux)
    text_encoders: tuple[str, ...] = ()  # text-encoder components, in kohya order (lora_te1_, lora_te2_, …)
    load_options: dict = field(default_factory=dict)  # extra from_pretrained keyword arguments
    # (pipe, prompts) -> Conditioning: what the denoiser reads (auditkit.models.conditioning)
    conditioning: Callable | None = None
    # how the denoiser is called, trained (its diffusion process and training target) and sampled, for align,
    # finetune, repair's retraining and the data-free checks (auditkit.models.denoising)
    denoising: Denoising | None = None
    # kohya prefixes of the text encoders (component -> prefix); empty: lora_te_, or lora_te1_/lora_te2_
    kohya_prefixes: dict = field(default_factory=dict)
    # auditkit.lora.formats layouts whose files diffusers' loader for this family reads with the scales and
    # modules auditkit reads: those files are handed to diffusers as they are; any other is handed over as
    # auditkit's exact conversion (a diffusers state dict of the same updates)
    native_layouts: tuple[str, ...] = ("kohya", "diffusers", "peft")
    # (pipe) -> keyword arguments of every render call (e.g. the image size); None: nothing to add
    render_options: Callable | None = None
    # the layout align, finetune and repair write adapters in: kohya, or for Flux/SD3 the diffusers layout,
    # which their diffusers loaders read as it is and which holds any subset of a fused original module
    # (kohya names Flux's/SD3's q, k, v (and Flux's single-block MLP) as one module, written whole or not at all)
    written_layout: str = "kohya"
    # (pipe, pixels uint8 H × W × 3) -> keyword arguments giving an edit pipeline its input image (a suite's
    # input_image); None: the family renders from text only, and a suite naming an input image is refused
    input_image: Callable | None = None
    # (guidance, number of prompts) -> keyword arguments of a render call that set the suite's guidance; None:
    # guidance_scale (every family but those whose pipelines guide by another argument, as Qwen-Image's true_cfg_scale)
    guidance_options: Callable | None = None
    # (model_index.json) -> why auditkit cannot adapt the pipeline such a folder holds ("" when it can); None: it
    # can adapt every folder of the family. Checked before the pipeline loads (the static scan reads no pipeline)
    refuses: Callable | None = None
    # the pipeline component that guides (a diffusers guider, HunyuanVideo 1.5's ``guider``): the suite's guidance is
    # set on a copy of it for each render (auditkit.models.pipeline.guided), no guidance argument is passed
    guider: str | None = None
    # the pipeline has no LoRA loader mixin (diffusers 0.42's HunyuanVideo15Pipeline): adapters load, switch and merge
    # through the denoiser's PEFT mixin (auditkit.models.attach.DenoiserLoras), coverage-checked as any family's
    loras_through_denoiser: bool = False
    # (pipe) -> None: what a pipeline of this family needs once loaded (auditkit.models.pipeline.load_pipeline), such as
    # HunyuanVideo 1.5's VAE slicing; None: nothing
    on_load: Callable | None = None

    @property
    def lora_components(self) -> tuple[str, ...]:
        """Components whose modules adapters change, denoiser first."""
        return (self.denoiser, *self.text_encoders)
