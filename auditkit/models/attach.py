"""Adapters applied to a live model: the one home of "put these updates into this pipeline".

Two ways, for two purposes:

* **Exact composition** (:func:`composed`, :func:`encoders_composed`): canonical LoRA modules or a full model's
  :class:`~auditkit.models.difference.TensorDeltas` added to a component's weights in place, for the duration
  (W += m·ΔW, restored on exit). Training, the data-free checks, the trigger search and repair's correction use it.
* **Diffusers adapters** (:func:`load_adapters`, :func:`apply_configuration`, :class:`Fused`): the dynamic scan
  renders through diffusers' own LoRA loading (``load_lora_weights``, ``set_adapters``), as users run adapters,
  with every load checked for key coverage and scale and, on CUDA, merged into the weights while a configuration
  renders. :mod:`auditkit.runner` renders with them. A pipeline without diffusers' LoRA loader mixin (a family
  whose record says ``loras_through_denoiser``: diffusers 0.42's ``HunyuanVideo15Pipeline``) takes the same calls
  on its denoiser's PEFT mixin (:class:`DenoiserLoras`, :func:`lora_api`: the one place that tells them apart), and
  is coverage-checked the same way.

A configuration here is anything with a ``name`` and ``weights`` ((adapter role, multiplier), …):
:class:`auditkit.runner.Configuration`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from auditkit.errors import Unscannable
from auditkit.lora.adapter import MIN_COVERAGE, LoraModule
from auditkit.lora.write import diffusers_source
from auditkit.models.difference import TensorDeltas


class Weighted(Protocol):
    """A configuration: its name and its adapters' (role, multiplier)."""

    name: str
    weights: tuple[tuple[str, float], ...]


# --- exact composition into the weights ---------------------------------------------------------------

def weight_of(model, canonical: str, component: str, tensor: bool = False):
    """The weight of canonical module ``<component>.<path>``; with ``tensor``, the canonical tensor
    ``<component>.<path>.<name>`` (a full model's changed tensor)."""
    from auditkit.models.architectures import _text_alias

    path, param = canonical.removeprefix(f"{component}."), "weight"
    if tensor:
        path, _, param = path.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:  # a CLIP text module under transformers 5, which dropped the text_model level
        alias = _text_alias(path) if component.startswith("text_encoder") else None
        if alias is None:
            raise
        module = model.get_submodule(alias)
    return getattr(getattr(module, "base_layer", module), param)


def apply_updates(model, updates: dict[str, LoraModule] | TensorDeltas, multiplier: float = 1.0,
                  component: str = "unet") -> None:
    """W += multiplier · ΔW for each canonical module of ``component`` (the denoiser ``model``), in place,
    exact; a full model's :class:`~auditkit.models.difference.TensorDeltas` add to every tensor of
    ``component`` they change."""
    import torch

    tensors = isinstance(updates, TensorDeltas)
    with torch.no_grad():
        for name, m in updates.items():
            if not name.startswith(f"{component}."):
                continue
            weight = weight_of(model, name, component, tensors)
            delta = torch.from_numpy(np.asarray(m) if tensors else m.delta()).to(weight.dtype).reshape(weight.shape)
            weight.add_(delta.to(weight.device), alpha=multiplier)


@contextlib.contextmanager
def composed(model, *adapters: tuple[dict[str, LoraModule] | TensorDeltas, float],
             component: str = "unet") -> Iterator[None]:
    """Temporarily fuse adapters (modules, multiplier) or full models' updates (TensorDeltas, multiplier)
    into the weights of ``component`` (the denoiser ``model``); restore on exit. Modules of other
    components are left out."""
    import torch

    touched = {(name, isinstance(mods, TensorDeltas)) for mods, _ in adapters for name in mods
               if name.startswith(f"{component}.")}
    saved = {key: weight_of(model, key[0], component, key[1]).detach().clone() for key in touched}
    try:
        for mods, mult in adapters:
            apply_updates(model, mods, mult, component)
        yield
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                weight_of(model, key[0], component, key[1]).copy_(w)


def encoder_parts(pipe, *updates: dict[str, LoraModule] | TensorDeltas, denoiser: str) -> list[str]:
    """The components of ``pipe`` other than the ``denoiser`` (its text encoders) that ``updates`` change."""
    names = {n.split(".", 1)[0] for mods in updates for n in mods} - {denoiser}
    return sorted(c for c in names if getattr(pipe, c, None) is not None)


@contextlib.contextmanager
def encoders_composed(pipe, *adapters: tuple[dict[str, LoraModule] | TensorDeltas, float], denoiser: str):
    """Merge the parts of ``adapters`` ((modules or TensorDeltas, multiplier)) that change a text encoder of
    ``pipe`` into it, for the duration (the ``denoiser`` component's parts are merged elsewhere, by
    :func:`composed`); components the pipeline lacks are left out."""
    with contextlib.ExitStack() as stack:
        for comp in encoder_parts(pipe, *(mods for mods, _ in adapters), denoiser=denoiser):
            stack.enter_context(composed(getattr(pipe, comp), *adapters, component=comp))
        yield


def encoded_by_each(pipe, prompts: list[str], safety, candidate, denoiser: str) -> tuple:
    """The conditioning of ``prompts`` as the base, the safe model and the safe model with the candidate each
    read them: through their own text encoders (the updates' text-encoder parts merged). Without such parts,
    the one base encoding three times."""
    from auditkit.models.pipeline import encode

    base = encode(pipe, prompts)
    if not encoder_parts(pipe, safety, candidate, denoiser=denoiser):
        return base, base, base
    with encoders_composed(pipe, (safety, 1.0), denoiser=denoiser):
        safe = encode(pipe, prompts)
    with encoders_composed(pipe, (safety, 1.0), (candidate, 1.0), denoiser=denoiser):
        cand = encode(pipe, prompts)
    return base, safe, cand


# --- diffusers adapters: loading, switching, merging ---------------------------------------------------

class DenoiserLoras:
    """diffusers' pipeline LoRA calls that auditkit makes (``load_lora_weights``, ``set_adapters``,
    ``enable_lora``/``disable_lora``, ``delete_adapters``, ``fuse_lora``/``unfuse_lora``, ``get_list_adapters``,
    ``unload_lora_weights``, ``_lora_loadable_modules``) for a pipeline without a LoRA loader mixin, made on its
    denoiser's PEFT mixin (diffusers' ``PeftAdapterMixin``) as the loader mixins make them on theirs:
    ``load_lora_weights`` is the denoiser's ``load_lora_adapter`` of the ``<component>.``-prefixed keys of a
    safetensors file (read offline; never a pickle) or of auditkit's conversion (a state dict); the others are the
    denoiser's methods of the same names. No format conversion happens on this path: a file not in diffusers'
    layout loads nothing, and :func:`load_adapters` then hands over its exact conversion (the family's
    ``native_layouts`` say which files are handed over as they are)."""

    def __init__(self, pipe, component: str):
        self.component, self.model = component, getattr(pipe, component)
        self._lora_loadable_modules = [component]

    def load_lora_weights(self, source, adapter_name: str) -> None:
        self.model.load_lora_adapter(source, prefix=self.component, adapter_name=adapter_name, use_safetensors=True,
                                     local_files_only=True)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {self.component: list(getattr(self.model, "peft_config", {}))}

    def set_adapters(self, adapter_names: list[str], adapter_weights: list[float] | None = None) -> None:
        self.model.set_adapters(adapter_names, weights=adapter_weights)

    def enable_lora(self) -> None:
        self.model.enable_lora()

    def disable_lora(self) -> None:
        self.model.disable_lora()

    def delete_adapters(self, adapter_names: list[str] | str) -> None:
        self.model.delete_adapters(adapter_names)

    def fuse_lora(self, components=(), adapter_names: list[str] | None = None, lora_scale: float = 1.0) -> None:
        self.model.fuse_lora(lora_scale=lora_scale, adapter_names=adapter_names)

    def unfuse_lora(self, components=()) -> None:
        self.model.unfuse_lora()

    def unload_lora_weights(self) -> None:
        self.model.unload_lora()


def lora_api(pipe):
    """What takes diffusers' pipeline LoRA calls for ``pipe``: the pipeline itself, or for a family whose pipeline has
    no LoRA loader (``Family.loras_through_denoiser``) its denoiser's PEFT mixin (:class:`DenoiserLoras`)."""
    from auditkit.models.families import known_family

    family = known_family(pipe)
    return DenoiserLoras(pipe, family.denoiser) if family is not None and family.loras_through_denoiser else pipe


def unload_adapters(pipe) -> None:
    """Remove every adapter diffusers loaded into ``pipe`` (its LoRA layers too): the pipeline as it came."""
    lora_api(pipe).unload_lora_weights()


def load_adapters(pipe, adapters: dict[str, object],
                  min_coverage: float = MIN_COVERAGE) -> dict[str, dict]:
    """Load each adapter (role -> canonical :class:`~auditkit.lora.adapter.Adapter`) with diffusers and
    check how many of its modules really received LoRA layers. Fails closed below ``min_coverage`` (the
    configured ``min_coverage``: :func:`auditkit.dynamic.run_dynamic` passes it on).

    Every module of the adapter counts, in whichever component it is (both SDXL text encoders
    included): a module in a component the pipeline's family does not have was not loaded.

    A file diffusers reads natively is handed over as it is; when diffusers then applies fewer than
    all of its modules or refuses it (diffusers 0.42: kohya's ``lora_unet_add_embedding_linear_N``
    dropped, files mixing SGM and diffusers names, diffusers/peft text-encoder files under
    transformers 5), it is loaded again as auditkit's exact conversion (a diffusers state dict of the
    same updates), so the scan renders every module the file holds. The coverage record says which
    source was used and names any module still missing.

    Each loaded module's scale is also checked against the file's own (alpha / rank, read by
    auditkit): diffusers ignores per-module alphas when a kohya file's alphas differ between modules
    (measured with diffusers 0.36: 9 of 14 modules got another module's scale). Wrong scales are
    corrected in place and counted, so the scan renders the adapter the file describes.
    """
    from auditkit.models.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    coverage = {}
    for role, adapter in adapters.items():
        expected = set(adapter.modules)
        source = diffusers_source(adapter, family.native_layouts)
        layers, failure = _load(pipe, role, source)
        note = ""
        if isinstance(source, str) and (failure or not expected <= layers.keys()):
            note = (f"diffusers refused the file ({failure})" if failure else
                    f"diffusers applied {len(expected & layers.keys())} of the file's {len(expected)} modules")
            if not failure:
                lora_api(pipe).delete_adapters(role)
            source = diffusers_source(adapter, ())
            layers, failure = _load(pipe, role, source)
        if failure:
            raise Unscannable(adapter.path, f"diffusers cannot load it into the {family.name} pipeline "
                                            f"({failure}); the dynamic scan would not test this adapter")
        got = len(expected & layers.keys())
        fraction = got / len(expected) if expected else 0.0
        missing = sorted(expected - layers.keys())
        if fraction < min_coverage:
            foreign = sorted({n.split(".", 1)[0] for n in expected} - set(family.lora_components))
            untouched = sorted({n.split(".", 1)[0] for n in expected} - {n.split(".", 1)[0] for n in layers}
                               - set(foreign))
            why = f" ({', '.join(foreign)}: not in a {family.name} pipeline)" if foreign else \
                f" (diffusers loads none of {', '.join(untouched)}'s modules)" if untouched else \
                f" (missing: {', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"
            raise Unscannable(adapter.path, f"diffusers applied only {got} of {len(expected)} modules "
                                            f"({fraction:.0%}){why}; the dynamic scan would not test this adapter")
        corrected = _correct_scales(adapter, role, {n: layers[n] for n in expected & layers.keys()})
        coverage[role] = {"expected": len(expected), "loaded": got, "fraction": fraction,
                          "scales_corrected": corrected, "missing": missing[:50],
                          "source": "file" if isinstance(source, str) else "auditkit conversion",
                          **({"note": note + "; loaded as auditkit's exact conversion"} if note else {})}
    return coverage


def _load(pipe, role: str, source) -> tuple[dict, str]:
    """Load ``source`` as adapter ``role``: (its LoRA layers by canonical name, "" or why diffusers refused).
    A refused load leaves nothing of ``role`` behind, in any component."""
    loras = lora_api(pipe)
    try:
        loras.load_lora_weights(source, adapter_name=role)
    except (ValueError, KeyError, RuntimeError) as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        if any(role in names for names in getattr(loras, "get_list_adapters", dict)().values()):
            loras.delete_adapters(role)
        return {}, f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
    return lora_layers(pipe, [role]), ""


def _correct_scales(adapter, role: str, layers: dict) -> int:
    """Set peft's alpha and scaling of every loaded layer to the file's scale; returns how many differed."""
    corrected = 0
    for name, layer in layers.items():
        m = adapter.modules[name]
        rank = layer.lora_A[role].weight.shape[0]
        if rank != m.rank:
            raise Unscannable(adapter.path, f"diffusers loaded {name} with rank {rank}, the file has rank {m.rank}")
        if abs(layer.scaling[role] - m.scale) > 1e-6 * max(1.0, abs(m.scale)):
            layer.lora_alpha[role] = m.scale * rank
            layer.scaling[role] = m.scale
            corrected += 1
    return corrected


def apply_configuration(pipe, config: Weighted, roles: Sequence[str]) -> None:
    """Activate exactly the configuration's adapters at their multipliers; the others are not active at all.

    An adapter left active at weight 0 is not always absent: a DoRA layer still rescales the base weight by
    its trained magnitude over the weight's norm (measured: the lab UNet's output moved by 0.8 on a scale of
    4.4), so base+safety would not be the safe model beside a DoRA candidate."""
    if not roles:
        return
    weights = {r: float(w) for r, w in config.weights if w and r in roles}
    loras = lora_api(pipe)
    if not weights:
        loras.disable_lora()
        return
    loras.enable_lora()
    loras.set_adapters(list(weights), adapter_weights=list(weights.values()))


class Fused:
    """Configurations rendered with their adapters merged into the weights (no LoRA branch per layer).

    Merging is diffusers' ``fuse_lora`` of the configuration's adapters at their ``set_adapters``
    weights; leaving a configuration is ``unfuse_lora`` followed by copying back the weights saved
    before the first merge: in bf16, subtracting a merged update does not give the original weights
    back (measured on the lab: 0.002 drift after six merge/unmerge cycles), and the base
    configuration must render with the base model's own weights.
    """

    def __init__(self, pipe):
        self.pipe, self.loras = pipe, lora_api(pipe)
        self.saved: dict = {}  # LoRA layer -> its base weight before the current merge
        self.merged = False
        self.unmerged: set[str] = set()  # configurations rendered unmerged (their adapters update biases)

    def apply(self, config: Weighted, roles: Sequence[str]) -> None:
        self.restore()
        names = [r for r, w in config.weights if w and r in roles]
        if not names:
            apply_configuration(self.pipe, config, roles)
            return
        layers = lora_layers(self.pipe, names).values()
        if any(getattr(layer.lora_B[r], "bias", None) is not None for layer in layers for r in names
               if r in layer.lora_B):
            # peft cannot merge a LoRA bias into a layer without one, and merging into one that has a bias
            # would need that bias saved too: bias updates (full-diff diff_b) render unmerged
            self.unmerged.add(config.name)
            apply_configuration(self.pipe, config, roles)
            return
        weights = dict(config.weights)
        self.loras.enable_lora()
        self.loras.set_adapters(names, adapter_weights=[float(weights[r]) for r in names])
        for layer in layers:
            if layer not in self.saved:
                self.saved[layer] = layer.get_base_layer().weight.detach().clone()
        self.loras.fuse_lora(components=self.components(), adapter_names=names, lora_scale=1.0)
        self.merged = True

    def components(self) -> list[str]:
        """Every component diffusers loads LoRAs into: fuse_lora's default is the denoiser alone for Flux
        (text-encoder LoRAs would render unmerged), the denoiser and text encoders for SD and SDXL."""
        return [c for c in self.loras._lora_loadable_modules if getattr(self.pipe, c, None) is not None]

    def restore(self) -> None:
        """Unmerge and put the saved base weights back (exactly)."""
        if not self.merged:
            return
        import torch

        with warnings.catch_warnings():  # peft warns for every layer the configuration did not touch
            warnings.filterwarnings("ignore", message="Already unmerged")
            self.loras.unfuse_lora(components=self.components())
        with torch.no_grad():
            for layer, weight in self.saved.items():
                layer.get_base_layer().weight.copy_(weight)
        self.saved.clear()  # saved again at the next merge: full models (an Overlay) may change them in between
        self.merged = False


def lora_layers(pipe, roles: Sequence[str]) -> dict:
    """Canonical name ("unet.<path>", "text_encoder_2.<path>", …) -> layer, for every layer of the
    pipeline's LoRA components (see :mod:`auditkit.models.families`) holding a LoRA of one of ``roles``."""
    from auditkit.models.architectures import canonical_name
    from auditkit.models.pipeline import lora_components

    layers = {}
    for component, model in lora_components(pipe).items():
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and any(r in lora_a for r in roles):
                layers[canonical_name(component, name)] = module
    return layers
