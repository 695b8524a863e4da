"""What a pipeline's denoiser reads besides x_t and t, for training and analysis that call it directly.

SD 1/2: the text encoder's last hidden state (``encoder_hidden_states``). SDXL: both text encoders'
penultimate hidden states concatenated, plus ``added_cond_kwargs``: the second encoder's pooled
projection (``text_embeds``) and the size/crop ids (``time_ids``: original size, crop corner, target
size; here the model's own image size and no crop, as the pipeline uses by default). Each family names
its encoder in its :class:`~auditkit.models.families.Family` record (``"module:attr"``).

Example:
    >>> cond = encode(pipe, ["a red cross", "a blue square"])      # doctest: +SKIP
    >>> unet(x, t, **cond[[1, 0]].kwargs()).sample                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conditioning:
    """One row per prompt: ``hidden`` (batch × tokens × d) and ``added`` (name -> batch × …)."""

    hidden: Any
    added: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, idx) -> Conditioning:
        """Rows ``idx`` (an index array or tensor), as tensors are indexed."""
        return Conditioning(self.hidden[idx], {k: v[idx] for k, v in self.added.items()})

    def repeat(self, n: int) -> Conditioning:
        """A one-row conditioning repeated ``n`` times (e.g. the empty prompt for a batch)."""
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        import torch

        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added})

    def kwargs(self) -> dict:
        """Keyword arguments of the denoiser call."""
        out: dict = {"encoder_hidden_states": self.hidden}
        if self.added:
            out["added_cond_kwargs"] = dict(self.added)
        return out


def encode(pipe, prompts: Sequence[str]) -> Conditioning:
    """The conditioning of ``prompts`` for ``pipe``'s family (no gradient; the text encoders stay frozen)."""
    from auditkit.errors import BadInput
    from auditkit.models.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    if family.conditioning is None:
        raise BadInput(None, f"auditkit does not train on {family.name} pipelines yet (align, finetune and "
                             "repair's retraining); scanning works")
    module, _, attr = family.conditioning.partition(":")
    return getattr(importlib.import_module(module), attr)(pipe, list(prompts))


def encode_sd(pipe, prompts: list[str]) -> Conditioning:
    """SD 1/2: the text encoder's last hidden state over the padded prompt (all positions)."""
    import torch

    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    with torch.no_grad():
        return Conditioning(pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0])


def encode_sdxl(pipe, prompts: list[str]) -> Conditioning:
    """SDXL: the pipeline's own prompt encoding (both encoders, penultimate layers, pooled projection)
    and the default size ids for the model's native resolution."""
    import torch

    unet = pipe.unet
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device=unet.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    size = unet.config.sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=hidden.device)
    return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), 6)})
