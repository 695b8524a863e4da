"""What a pipeline's denoiser reads besides x_t and t, for training and analysis that call it directly.

Every family uses its pipeline's own prompt encoding (``pipe.encode_prompt``, or for SD 1/2 the text
encoder's last hidden state over the padded prompt, as the pipeline computes it):

* SD 1/2: ``encoder_hidden_states``.
* SDXL: both text encoders' penultimate hidden states concatenated, plus ``added_cond_kwargs``: the
  second encoder's pooled projection (``text_embeds``) and the size/crop ids (``time_ids``: original
  size, crop corner, target size; here the model's own image size and no crop, as the pipeline uses
  by default).
* SD3 / SD3.5: the joint prompt embedding (CLIP-L and CLIP-G hidden states side by side, zero-padded to
  T5's width, then T5's tokens after them along the sequence) and ``pooled_projections`` (both CLIPs'
  pooled projections, concatenated).
* Flux.1: T5's hidden states (``encoder_hidden_states``) and CLIP's pooled output
  (``pooled_projections``); the position ids and the guidance embedding depend on the latents and the
  call, not the prompt: :mod:`auditkit.models.denoising` adds them.

Each family names its encoder in its :class:`~auditkit.models.families.Family` record
(``"module:attr"``). A conditioning also records which tokenizer produced which positions of the
sequence (``tokens``), so the data-free concept check can find the concept word's own tokens.

Example:
    >>> cond = encode(pipe, ["a red cross", "a blue square"])      # doctest: +SKIP
    >>> unet(x, t, **cond[[1, 0]].kwargs()).sample                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ADDED_COND_KWARGS = "added_cond_kwargs"  # where a UNet takes its added conditioning


@dataclass
class Conditioning:
    """One row per prompt: ``hidden`` (batch × tokens × d) and ``added`` (name -> batch × …).

    ``added_under``: the keyword the denoiser takes ``added`` under (a UNet's ``added_cond_kwargs``), or
    None when each entry is a keyword of its own (the SD3 and Flux transformers' ``pooled_projections``).
    ``tokens``: (tokenizer, ids batch × n) spans in sequence order, covering ``hidden``'s tokens; a span
    whose tokenizer is None holds positions no tokenizer produced (SD3 without its T5 encoder).
    """

    hidden: Any
    added: dict[str, Any] = field(default_factory=dict)
    added_under: str | None = ADDED_COND_KWARGS
    tokens: tuple = ()

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, idx) -> Conditioning:
        """Rows ``idx`` (an index array or tensor), as tensors are indexed."""
        return Conditioning(self.hidden[idx], {k: v[idx] for k, v in self.added.items()}, self.added_under,
                            tuple((tok, ids[idx]) for tok, ids in self.tokens))

    def repeat(self, n: int) -> Conditioning:
        """A one-row conditioning repeated ``n`` times (e.g. the empty prompt for a batch)."""
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]),
                            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()}, self.added_under,
                            tuple((tok, ids.expand(n, *ids.shape[1:])) for tok, ids in self.tokens))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        import torch

        first = parts[0]
        tokens = tuple((tok, torch.cat([p.tokens[i][1] for p in parts])) for i, (tok, _) in enumerate(first.tokens))
        return Conditioning(torch.cat([p.hidden for p in parts]),
                            {k: torch.cat([p.added[k] for p in parts]) for k in first.added}, first.added_under,
                            tokens)

    def kwargs(self) -> dict:
        """Keyword arguments of the denoiser call."""
        out: dict = {"encoder_hidden_states": self.hidden}
        if self.added and self.added_under:
            out[self.added_under] = dict(self.added)
        elif self.added:
            out.update(self.added)
        return out


def encode(pipe, prompts: Sequence[str]) -> Conditioning:
    """The conditioning of ``prompts`` for ``pipe``'s family (no gradient; the text encoders stay frozen)."""
    from auditkit.models.families import family_of_pipeline

    module, _, attr = family_of_pipeline(pipe).conditioning.partition(":")
    return getattr(importlib.import_module(module), attr)(pipe, list(prompts))


def _ids(tokenizer, prompts: list[str], length: int):
    """Token ids as the pipelines tokenize for their encoders: padded to ``length``, truncated."""
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def _device(pipe):
    from auditkit.models.pipeline import denoiser_of

    return denoiser_of(pipe).device


def encode_sd(pipe, prompts: list[str]) -> Conditioning:
    """SD 1/2: the text encoder's last hidden state over the padded prompt (all positions)."""
    import torch

    ids = _ids(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]
    return Conditioning(hidden, tokens=((pipe.tokenizer, ids),))


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
    ids = _ids(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)  # both encoders read the same positions
    return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), 6)},
                        tokens=((pipe.tokenizer, ids),))


SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length


def flux_sequence_length(pipe) -> int:
    """The T5 length Flux prompts are padded to: FluxPipeline's default (512), or the T5 tokenizer's
    ``model_max_length`` when it declares fewer (the DiT lab: 16, the length it was trained at; Flux runs no
    attention mask over T5's padding, so the length is part of the conditioning)."""
    n = getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", None)
    return min(FLUX_T5_TOKENS, n) if isinstance(n, int) and n > 0 else FLUX_T5_TOKENS


def encode_sd3(pipe, prompts: list[str]) -> Conditioning:
    """SD3 / SD3.5: the pipeline's own joint prompt embedding (CLIP-L + CLIP-G beside each other, then T5
    along the sequence) and both CLIPs' pooled projections, at the pipeline's default T5 length."""
    import torch

    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=_device(pipe), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=SD3_T5_TOKENS)
    clip_ids = _ids(pipe.tokenizer, prompts, pipe.tokenizer_max_length)
    t5 = hidden.shape[1] - clip_ids.shape[1]  # CLIP's positions as tokenized (fewer for the sweep's short prompts)
    if pipe.text_encoder_3 is not None:
        t5_span = (pipe.tokenizer_3, _ids(pipe.tokenizer_3, prompts, t5))
    else:  # the pipeline fills T5's positions with zeros
        t5_span = (None, torch.full((len(prompts), t5), -1))
    return Conditioning(hidden, {"pooled_projections": pooled}, added_under=None,
                        tokens=((pipe.tokenizer, clip_ids), t5_span))


def encode_flux(pipe, prompts: list[str]) -> Conditioning:
    """Flux.1: the pipeline's own prompt encoding: T5's hidden states (the text tokens) and CLIP's pooled
    output (the modulation), at the T5 length renders use (:func:`flux_sequence_length`)."""
    import torch

    with torch.no_grad():
        hidden, pooled, _ = pipe.encode_prompt(prompts, None, device=_device(pipe), num_images_per_prompt=1,
                                               max_sequence_length=flux_sequence_length(pipe))
    ids = _ids(pipe.tokenizer_2, prompts, hidden.shape[1])
    return Conditioning(hidden, {"pooled_projections": pooled}, added_under=None, tokens=((pipe.tokenizer_2, ids),))
