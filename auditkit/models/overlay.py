"""Full models rendered exactly: their per-tensor updates written into a loaded pipeline, per configuration.

The dynamic scan renders base, base+safety, base+safety+candidate@m and base+candidate@m. An adapter
file is loaded by diffusers as a LoRA and switched with ``set_adapters``. A full model (an erased
checkpoint, a full fine-tune) is no adapter: for each configuration every tensor a full model changes
is set to T₀ + Σᵣ mᵣ·ΔTᵣ (T₀ the pipeline's own tensor, mᵣ the configuration's multiplier of full
model r, ΔTᵣ its exact difference, :class:`~auditkit.models.difference.TensorDeltas`), computed in
float32. So base+safety renders the erased model itself (to float32 rounding), not a truncation of it,
and LoRA adapters of the same configuration act on top of it as on any base weights.
"""

from __future__ import annotations

from auditkit.errors import Unscannable
from auditkit.models.architectures import canonical_name


def pipeline_tensors(pipe) -> dict:
    """Canonical tensor name -> parameter or buffer of every torch component of ``pipe`` (peft's
    ``base_layer`` level dropped, so the names are the component's own state-dict names)."""
    import torch

    out = {}
    for component, model in pipe.components.items():
        if not isinstance(model, torch.nn.Module):
            continue
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            out.setdefault(canonical_name(component, name.replace(".base_layer.", ".")), tensor)
    return out


class Overlay:
    """The full models of a scan, by role, applied to ``pipe`` per configuration (see the module docstring).

    Args:
        pipe: the loaded base pipeline.
        models: role -> the full model (an :class:`~auditkit.lora.adapter.Adapter` with an ``update``).

    Raises:
        Unscannable: a tensor of the model could not be placed (an unmapped key of its file, a tensor the
            base lacks, a changed tensor the loaded pipeline lacks): it would not be rendered, and a scan
            that renders part of a model must not pass it.
    """

    def __init__(self, pipe, models: dict):
        import torch

        tensors = pipeline_tensors(pipe)
        self.deltas: dict[str, dict] = {}
        self.tensors: dict = {}
        for role, model in models.items():
            path, deltas = model.path, model.update.rendered_deltas()
            unplaced = model.coverage.unmapped
            if unplaced:
                raise Unscannable(path, f"{len(unplaced)} of its tensors could not be placed in the base (e.g. "
                                        f"{unplaced[0]}); the dynamic scan would not render this model (convert it "
                                        "to diffusers format: from_single_file, then save_pretrained)")
            missing = sorted(n for n in deltas if n not in tensors)
            if missing:
                raise Unscannable(path, f"{len(missing)} of the tensors it changes are not in the loaded pipeline "
                                        f"(e.g. {missing[0]}); the dynamic scan would not render this model")
            self.deltas[role] = {n: torch.from_numpy(d) for n, d in deltas.items()}
            self.tensors.update({n: tensors[n] for n in deltas})
        self.base = {n: t.detach().to("cpu", copy=True) for n, t in self.tensors.items()}
        self.current: tuple = ()

    def apply(self, weights: dict[str, float]) -> None:
        """Set every overlaid tensor to T₀ + Σ m·ΔT for the full-model roles in ``weights`` (role -> multiplier)."""
        import torch

        key = tuple(sorted((r, float(m)) for r, m in weights.items() if r in self.deltas and m))
        if key == self.current:
            return
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                value = self.base[name].float()
                for role, m in key:
                    delta = self.deltas[role].get(name)
                    if delta is not None:
                        value = value + m * delta.reshape(value.shape)
                tensor.copy_(value.to(tensor.dtype))
        self.current = key

    def restore(self) -> None:
        """Put the pipeline's own tensors back."""
        self.apply({})

    def coverage(self) -> dict[str, dict]:
        """Per role, how much of the full model was applied: all of it (anything else raised)."""
        return {role: {"expected": len(d), "loaded": len(d), "fraction": 1.0, "scales_corrected": 0, "missing": [],
                       "kind": "full model", "source": "the model itself: every changed tensor, exactly"}
                for role, d in self.deltas.items()}
