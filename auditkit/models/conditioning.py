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

Each family's encoder is a function of its module (:mod:`auditkit.models.family`), named by its
:class:`~auditkit.models.family.record.Family` record; :func:`auditkit.models.pipeline.encode` calls the
pipeline's. This module holds what they share. A conditioning also records which tokenizer produced which
positions of the sequence (``tokens``), so the data-free concept check can find the concept word's own tokens.

Example:
    >>> cond = encode(pipe, ["a red cross", "a blue square"])      # doctest: +SKIP
    >>> unet(x, t, **cond[[1, 0]].kwargs()).sample                 # doctest: +SKIP
"""

from __future__ import annotations

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


def padded_length(tokenizer, limit: int, dropped: int = 0) -> int:
    """The length a pipeline pads its prompts to: its own ``limit`` (its default ``max_sequence_length``), or fewer
    where the tokenizer's ``model_max_length`` (less ``dropped`` template tokens the pipeline cuts off) says so."""
    n = getattr(tokenizer, "model_max_length", None)
    return min(limit, n - dropped) if isinstance(n, int) and n > dropped else limit


def token_ids(tokenizer, prompts: list[str], length: int):
    """Token ids as the pipelines tokenize for their encoders: padded to ``length``, truncated."""
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids
