"""Z-Image (Turbo): ``ZImagePipeline``, a single-stream DiT whose original module names are its diffusers paths.
The prompt is read by Qwen3 (its second-to-last hidden states of a chat-templated prompt, padding dropped), embedded
by ``cap_embedder`` and refined by text-only ``context_refiner`` layers; the latents by ``noise_refiner`` layers;
then both streams' tokens run through the same ``layers`` (one set of weights for image and text tokens). Trained
by rectified flow; the transformer takes a list of per-image latents (C × 1 × H × W), the timestep reversed and
scaled ((1000 − t) / 1000) and a list of per-prompt captions of their own lengths, and predicts the negated
velocity (the pipeline negates it before the Euler step; :func:`call` returns the velocity). Sampled on
FluxPipeline's linear σ schedule with the resolution shift.

Guidance: ``pos + scale·(pos − neg)`` (the pipeline's; Turbo renders at 0, without a negative pass), i.e.
classifier-free guidance at scale + 1.

Conditioning: every prompt padded to one length (:func:`sequence_length`) with a mask of its own tokens; the call
hands the transformer each caption unpadded, as the pipeline does (so padding changes nothing).

The modules that read only the prompt are the context refiner's: ESD-x trains its attention; the data-free
concept check reads the keys and values it computes from the prompt's tokens (:func:`refiner_states`): the main
layers' keys and values of the text tokens come from the same projections as the image's, so no module makes
them alone. No closed-form (UCE) edit: ``cap_embedder``'s linear layer reads the RMS-normalised prompt.
"""

from __future__ import annotations

from auditkit.models.conditioning import Conditioning, padded_length
from auditkit.models.denoising import Denoising, batch_timesteps, captured_states, classifier_free
from auditkit.models.family import flux
from auditkit.models.family.record import Family

MAX_TOKENS = 512  # ZImagePipeline's default max_sequence_length
MASK = "caption_mask"
REFINER_LAYERS = 2  # n_refiner_layers of the published Z-Image config (configs/z-image.json)

_ATTENTION = r"attention\.(to_q|to_k|to_v|to_out\.0)"
_MLP = r"feed_forward\.(w1|w2|w3)"
TARGETS = {
    "esd-x": rf"context_refiner\.\d+\.{_ATTENTION}$",
    "esd-u": rf"(layers|noise_refiner)\.\d+\.({_ATTENTION}|{_MLP})$",
    "cross-kv": r"context_refiner\.\d+\.attention\.(to_k|to_v)$",
    "attention": rf"(layers|noise_refiner|context_refiner)\.\d+\.{_ATTENTION}$",
    "transformer": rf"(layers|noise_refiner|context_refiner)\.\d+\.({_ATTENTION}|{_MLP})$",
}
# the context refiner's keys and values (suffixes, as every family's text_kv)
TEXT_KV = tuple(f"context_refiner.{i}.attention.to_{kv}" for i in range(REFINER_LAYERS) for kv in "kv")


def sequence_length(pipe) -> int:
    """The length prompts are padded to: the pipeline's 512, or the tokenizer's ``model_max_length`` when
    shorter."""
    return padded_length(pipe.tokenizer, MAX_TOKENS)


def templated(pipe, prompts: list[str]) -> list[str]:
    """The prompts as ZImagePipeline hands them to its tokenizer (the chat template, generation prompt on)."""
    return [pipe.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for p in prompts]


def encode(pipe, prompts: list[str]) -> Conditioning:
    """The pipeline's own prompt encoding (Qwen3's second-to-last hidden states of each templated prompt's own
    tokens), padded to :func:`sequence_length` with a mask of the prompt's tokens."""
    import torch

    length = sequence_length(pipe)
    with torch.no_grad():  # encode_prompt writes the templated prompts into the list it is given: a copy
        embeds, _ = pipe.encode_prompt(list(prompts), device=pipe.transformer.device,
                                       do_classifier_free_guidance=False, max_sequence_length=length)
    hidden = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, dtype=torch.long, device=hidden.device)
    for i, e in enumerate(embeds):
        hidden[i, :len(e)], mask[i, :len(e)] = e, 1
    ids = pipe.tokenizer(templated(pipe, prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    return Conditioning(hidden, {MASK: mask}, added_under=None, tokens=((pipe.tokenizer, ids),))


def call(model, x, t, cond, guidance=None):
    """Z-Image on latents x (batch × c × h × w): per-image one-frame latents, the reversed timestep, each caption
    unpadded; returns the velocity (the transformer predicts its negation)."""
    import torch

    captions = [h[m.bool()] for h, m in zip(cond.hidden, cond.added[MASK], strict=True)]
    t = (1000 - batch_timesteps(t, x).to(x.dtype)) / 1000
    out = model(list(x.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2).to(x.dtype)


def guide(den, x, t, cond, neg, scale: float):
    """ZImagePipeline's guidance, pos + scale·(pos − neg): classifier-free guidance at scale + 1."""
    return classifier_free(den, x, t, cond, neg, scale + 1)


CAPTION_MULTIPLE = 32  # the transformer pads each caption to a multiple of this with a learned token (SEQ_MULTI_OF)


def refiner_states(den, cond, names: list[str], visit, steps: int, generator) -> None:
    """The context refiner's inputs along the base's trajectory (:func:`~auditkit.models.denoising.captured_states`)
    at the conditioning's positions: each prompt's tokens and the learned padding the transformer adds up to a
    multiple of 32 (the image reads both); zero rows where the batch is padded to its longest caption (masked:
    the image reads nothing there) and past the model's rows."""
    lengths = cond.added[MASK].sum(dim=1).tolist()
    width = cond.hidden.shape[1]

    def aligned(name, rows):
        out = rows.new_zeros(rows.shape[0], width, rows.shape[2])
        for i, n in enumerate(lengths):
            read = min(-(-n // CAPTION_MULTIPLE) * CAPTION_MULTIPLE, width, rows.shape[1])
            out[i, :read] = rows[i, :read]
        visit(name, out)

    captured_states(den, cond, names, aligned, steps, generator)


def latent_size(pipe, model) -> tuple[int, int]:
    """The transformer's channels; the image is the VAE's ``sample_size`` when it declares one, else the
    pipeline's default 1024 px."""
    pixels = flux.vae_sized(pipe).get("height") or 1024
    return model.config.in_channels, pixels // pipe.vae_scale_factor


def render_options(pipe) -> dict:
    """The VAE's size (when its config declares one) and the prompt length."""
    return {**flux.vae_sized(pipe), "max_sequence_length": sequence_length(pipe)}


DENOISING = Denoising(flux.process, call, guide, latent_size, TARGETS, TEXT_KV, refiner_states, patch=2,
                      label="transformer")

FAMILY = Family("z-image", "Z-Image (Turbo)", ("z-image",), "ZImagePipeline", ("ZImagePipeline",), "transformer", (),
                conditioning=encode, denoising=DENOISING, native_layouts=("diffusers",),
                render_options=render_options, written_layout="diffusers")
