"""LoRA wiring for training: target presets, peft injection, extraction to canonical modules.
(Composing updates into a live model's weights is :mod:`auditkit.models.attach`.)

Training uses peft through diffusers (``unet.add_adapter``), the path users' trainers take.
Trained adapters are extracted as canonical :class:`~auditkit.lora.adapter.LoraModule` objects
(A = lora_A.weight, B = lora_B.weight, scale = peft's scaling) and written in kohya layout, which
``pipe.load_lora_weights`` and the static scan both read.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.adapter import LoraModule
from auditkit.models.denoising import UNET_TARGETS

# Which modules each method trains: one table of regexes per kind of denoiser, with the same preset names
# (auditkit.models.denoising); TARGETS is the UNet's.
TARGETS: dict[str, str] = UNET_TARGETS


MAX_TRAIN_SEED = 2**63 - 1  # torch.Generator.manual_seed overflows above


def check_targets(setting: str, preset_or_regex: str) -> None:
    """Raise BadInput unless ``preset_or_regex`` is a preset of TARGETS or a valid regex."""
    if not isinstance(preset_or_regex, str) or not preset_or_regex:
        raise BadInput(None, f"{setting} must be a preset ({', '.join(TARGETS)}) or a regex (got {preset_or_regex!r})")
    if preset_or_regex in TARGETS:
        return
    try:
        re.compile(preset_or_regex)
    except re.error as exc:
        raise BadInput(None, f"{setting} {preset_or_regex!r} is neither a preset ({', '.join(TARGETS)}) "
                             f"nor a valid regex ({exc})") from None


def check_int(setting: str, value, minimum: int, maximum: int | None = None) -> None:
    """Raise BadInput unless ``value`` is an integer in [minimum, maximum]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f"≥ {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise BadInput(None, f"{setting} must be an integer {bound} (got {value!r})")


def check_number(setting: str, value, positive: bool = False) -> None:
    """Raise BadInput unless ``value`` is a finite number (and > 0 with ``positive``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a finite number > 0" if positive else "a finite number"
        raise BadInput(None, f"{setting} must be {kind} (got {value!r})")


def check_lora_settings(rank, alpha, steps, lr, batch, seed) -> None:
    """The settings every trainer shares; alpha None means "= rank"."""
    check_int("rank", rank, 1)
    if alpha is not None:
        check_number("alpha", alpha, positive=True)  # alpha 0 scales the update to nothing
    check_int("steps", steps, 1)
    check_number("lr", lr, positive=True)
    check_int("batch", batch, 1)
    check_int("seed", seed, 0, MAX_TRAIN_SEED)


def target_modules(model, preset_or_regex: str, presets: dict[str, str] = TARGETS, label: str = "UNet") -> list[str]:
    """Module names of the denoiser ``model`` (no component prefix) selected by a preset name of
    ``presets`` (the denoiser's table: :class:`auditkit.models.denoising.Denoiser` passes its own) or a regex.

    Raises BadInput for an invalid regex or one that selects nothing: called before training starts.
    """
    import torch

    check_targets("target", preset_or_regex)
    pattern = re.compile(presets.get(preset_or_regex, preset_or_regex))
    names = [n for n, m in model.named_modules()
             if pattern.fullmatch(n) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if not names:
        raise BadInput(None, f"target {preset_or_regex!r} selects no Linear/Conv2d module of the {label}")
    return names


def denoiser_targets(den, preset_or_regex: str) -> list[str]:
    """:func:`target_modules` of a bound denoiser (:func:`auditkit.models.pipeline.denoiser_for`), with its
    own preset table."""
    return target_modules(den.model, preset_or_regex, den.record.targets, den.label)


def check_loss(loss: float, step: int) -> None:
    """Stop at the first non-finite loss: the next optimiser step would turn the adapter into NaN."""
    if not math.isfinite(loss):
        raise BadInput(None, f"training diverged at step {step} (loss {loss}); nothing written (try a lower lr)")


def check_finite_parameters(params) -> None:
    """Refuse trained parameters holding NaN/Inf (before an SVD or extraction turns them into a file)."""
    import torch

    for p in params:
        if not bool(torch.isfinite(p.detach()).all()):
            raise BadInput(None, "training diverged: non-finite weights; nothing written (try a lower lr)")


def add_lora(unet, names: list[str], rank: int, alpha: float | None = None, adapter_name: str = "auditkit",
             seed: int = 0) -> None:
    """Inject a fresh LoRA (B = 0, so the model is unchanged at step 0) into ``names``. Its weights are float32
    whatever the model's dtype (mixed precision on a bf16 GPU model: peft casts each layer's input to them)."""
    import torch
    from peft import LoraConfig

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=names,
                        init_lora_weights=True)
    unet.add_adapter(config, adapter_name=adapter_name)
    for p in lora_parameters(unet, adapter_name):
        p.data = p.data.float()


def remove_lora(unet, adapter_name: str) -> None:
    """Delete an adapter; when none is left, remove peft's wrapper layers too (state dict as before)."""
    unet.delete_adapters(adapter_name)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()


def optimizer_for(model, params: list, lr: float):
    """Freeze ``model`` except ``params`` and return an AdamW over them (no weight decay)."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def lora_parameters(unet, adapter_name: str = "auditkit"):
    return [p for n, p in unet.named_parameters() if f".{adapter_name}." in n and "lora_" in n]


def extract_lora(model, adapter_name: str = "auditkit", prefix: str = "unet") -> dict[str, LoraModule]:
    """The trained adapter as canonical modules named ``prefix.<module path>`` (a CLIP text encoder's in the
    published ``text_model.`` spelling, :func:`auditkit.models.architectures.canonical_name`)."""
    from auditkit.models.architectures import canonical_name

    modules: dict[str, LoraModule] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        a = lora_a[adapter_name].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy()
        canonical = canonical_name(prefix, name)
        modules[canonical] = LoraModule(canonical, a.reshape(a.shape[0], -1).copy(),
                                        b.reshape(b.shape[0], -1).copy(), float(module.scaling[adapter_name]))
    if not modules:
        raise ValueError(f"adapter {adapter_name!r} not found in the model")
    return modules


def lora_from_delta(name: str, delta: np.ndarray, rank: int) -> LoraModule:
    """Best rank-``rank`` LoRA of a dense update (truncated SVD, as kohya's extract_lora_from_models)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    k = min(rank, int(np.sum(s > s[0] * 1e-7)) if s.size and s[0] > 0 else 0) or 1
    root = np.sqrt(s[:k])
    return LoraModule(name, (root[:, None] * vt[:k]).astype(np.float32), (u[:, :k] * root).astype(np.float32), 1.0)
