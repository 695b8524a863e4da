"""How each family's denoiser is called, trained and sampled, for the code that drives it directly:
``align`` (ESD), ``finetune``, repair's retraining and the data-free checks.

The shared machinery of every family: the diffusion processes, the UNet call and its record (:data:`UNET`,
SD 1/2 and SDXL), the MMDiT target tables, guidance and the text-state capture. A family module
(:mod:`auditkit.models.family`) picks and parametrises them into its :class:`Denoising` record
(``Family.denoising``); the training loops and the checks only call a :class:`Denoiser` (the record bound to a
loaded pipeline by :func:`auditkit.models.pipeline.denoiser_for`), never switch on the family. A record combines:

* the **diffusion process** the denoiser was trained with (:class:`EpsilonProcess`,
  :class:`FlowMatchingProcess`): how x_t is drawn from x0 for training, the training target, and the
  sampler that follows the model's own trajectory;

  - SD 1/2 and SDXL, ε-prediction: DDPM noising x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε at an integer timestep
    drawn uniformly, target ε, DDIM sampling;
  - SD3 and Flux.1, rectified flow (flow matching): x_t = (1−σ)·x0 + σ·ε with σ = t / 1000 read off
    the scheduler's (shifted) training schedule, the denoiser predicts the **velocity** v = ε − x0
    (its "noise prediction" is this velocity), Euler sampling x ← x + (σ_next − σ)·v over the
    scheduler's inference sigmas. The training timestep is drawn as diffusers' DreamBooth LoRA scripts
    draw it (``train_dreambooth_lora_sd3.py``: logit-normal, the SD3 paper's choice;
    ``…_flux.py``: uniform), with the plain velocity loss (no σ² preconditioning);

* the **call** (the family module's): what the denoiser takes besides the conditioning
  (:mod:`auditkit.models.conditioning`): a UNet ``(x, t)``; the SD3 transformer ``hidden_states`` and a batch
  of timesteps on the 0–1000 scale; the Flux transformer its latents packed into 2×2 patches
  (``FluxPipeline._pack_latents``), their position ids (``_prepare_latent_image_ids``) and zero text ids, the
  timestep / 1000 and, for guidance-distilled checkpoints (``guidance_embeds``: Flux.1-dev), the guidance as an input;
* **guidance** in sampling: classifier-free (two passes) or the embedded guidance of distilled models;
* the **target presets** (which modules ``esd-x``, ``esd-u``, … train) and the text key/value
  projections the data-free concept check reads (UNet cross-attention ``attn2.to_k/to_v``; MMDiT joint
  attention ``attn.add_k_proj/add_v_proj``, the text tokens' keys and values the image attends to).

Latents are VAE means, shifted and scaled as the pipelines do ((mean − shift_factor) · scaling_factor;
SD's VAE has no shift). Every tensor function here imports torch lazily.

Example:
    >>> den = denoiser_for(pipe)                                         # doctest: +SKIP
    >>> x0 = den.latents(images_u8); noise = torch.randn_like(x0)        # doctest: +SKIP
    >>> t = den.process.sample_timesteps(len(x0), generator)             # doctest: +SKIP
    >>> loss = mse(den.predict(den.process.add_noise(x0, noise, t), t, cond),
    ...            den.process.target(x0, noise))                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Which modules each method trains (regexes over the denoiser's module names), one table per kind of
# denoiser; the preset names are the same in every table.
# UNet: ESD-x = cross-attention only (concept-specific); ESD-u = the non-cross-attention layers of the
# transformer blocks (global concepts such as nudity), following Gandikota et al. 2023.
UNET_TARGETS: dict[str, str] = {
    "esd-x": r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "esd-u": r".*\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$",
    "cross-kv": r".*\.attn2\.(to_k|to_v)$",
    "attention": r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    # kohya's default LoRA: every linear/1x1 layer inside the transformer blocks
    "transformer": r".*\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$",
}
# MMDiT (SD3, Flux): text and image tokens attend jointly; the text stream's projections (add_*_proj,
# to_add_out) see only the prompt's tokens, so ESD-x trains them (the keys and values the image reads are
# add_k_proj/add_v_proj); ESD-u trains the image stream and the MLPs, the single-stream blocks included.
# SD3.5's second attention (attn2) is an image self-attention. "transformer": the layers diffusers'
# DreamBooth LoRA scripts train, plus the single-stream blocks' MLP and output.
_TEXT_ATTENTION = r"attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_IMAGE_ATTENTION = r"attn2?\.(to_q|to_k|to_v|to_out\.0)"
_MLP = r"ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out"


def mmdit_targets(mlp: str) -> dict[str, str]:
    """The MMDiT presets for a transformer whose MLP layers (of either stream) match ``mlp``."""
    return {
        "esd-x": rf".*blocks\.\d+\.{_TEXT_ATTENTION}$",
        "esd-u": rf".*blocks\.\d+\.({_IMAGE_ATTENTION}|{mlp})$",
        "cross-kv": r".*blocks\.\d+\.attn\.(add_k_proj|add_v_proj)$",
        "attention": rf".*blocks\.\d+\.({_TEXT_ATTENTION}|{_IMAGE_ATTENTION})$",
        "transformer": rf".*blocks\.\d+\.({_TEXT_ATTENTION}|{_IMAGE_ATTENTION}|{mlp})$",
    }


MMDIT_TARGETS: dict[str, str] = mmdit_targets(_MLP)


@dataclass(frozen=True)
class Sampler:
    """A sampling schedule: ``timesteps`` (noisiest first, as the denoiser takes them) and
    ``step(prediction, k, x)`` -> x at step k + 1. Stateless: any step can be taken again."""

    timesteps: Any
    step: Callable[[Any, int, Any], Any]
    init_noise_sigma: float = 1.0


class EpsilonProcess:
    """DDPM noising, ε target, DDIM sampling (SD 1/2, SDXL), from the pipeline's scheduler config."""

    prediction = "noise"

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.config = scheduler_config
        self.train_schedule = DDPMScheduler.from_config(scheduler_config)

    def sample_timesteps(self, n: int, generator):
        import torch

        return torch.randint(0, self.train_schedule.config.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        return self.train_schedule.add_noise(x0, noise, t)

    def target(self, x0, noise):
        return noise

    def sampler(self, steps: int, image_tokens: int) -> Sampler:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.config)
        sched.set_timesteps(steps)
        return Sampler(sched.timesteps, lambda eps, k, x: sched.step(eps, sched.timesteps[k], x).prev_sample,
                       sched.init_noise_sigma)


def uniform_density(n: int, generator):
    """u ~ U(0, 1): every training timestep equally often (diffusers' Flux script, ``none``)."""
    import torch

    return torch.rand((n,), generator=generator)


def logit_normal_density(n: int, generator):
    """u = sigmoid(N(0, 1)): the SD3 paper's rf/lognorm(0, 1), diffusers' SD3 script default."""
    import torch

    return torch.sigmoid(torch.randn((n,), generator=generator))


def scheduler_schedule(sched, steps: int, image_tokens: int) -> None:
    """The scheduler's own schedule (StableDiffusion3Pipeline): ``set_timesteps(steps)``, with the
    resolution-dependent shift when the scheduler asks for one."""
    sched.set_timesteps(steps, mu=_mu(sched, image_tokens) if sched.config.use_dynamic_shifting else None)


def linear_sigma_schedule(sched, steps: int, image_tokens: int) -> None:
    """FluxPipeline's schedule: σ = linspace(1, 1/steps, steps), shifted by the scheduler (for Flux.1-dev
    by the image's token count)."""
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_mu(sched, image_tokens))


def _mu(sched, image_tokens: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = sched.config
    return calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


class FlowMatchingProcess:
    """Rectified flow (SD3, Flux): x_t = (1−σ)·x0 + σ·ε, velocity target ε − x0, Euler sampling."""

    prediction = "velocity"

    def __init__(self, scheduler_config, density: Callable = uniform_density, schedule: Callable = scheduler_schedule):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.config = scheduler_config
        self.train_schedule = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.density, self.schedule = density, schedule
        self.num_train_timesteps = self.train_schedule.config.num_train_timesteps

    def sample_timesteps(self, n: int, generator):
        """Training timesteps of the scheduler's (shifted) training schedule, drawn by the density."""
        idx = (self.density(n, generator) * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self.train_schedule.timesteps[idx]

    def sigma(self, t, like):
        """σ = t / num_train_timesteps, shaped to broadcast over ``like``."""
        s = t.to(like.device, like.dtype) / self.num_train_timesteps
        return s.reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise):
        return noise - x0

    def sampler(self, steps: int, image_tokens: int) -> Sampler:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        self.schedule(sched, steps, image_tokens)
        sigmas = sched.sigmas  # steps + 1 values, the last 0

        def step(v, k, x):
            return (x + (sigmas[k + 1] - sigmas[k]).to(x.dtype) * v).to(x.dtype)

        return Sampler(sched.timesteps, step, 1.0)


# --- denoiser calls: (model, x, t, cond, guidance) -> prediction shaped like x ---------------------

def batch_timesteps(t, x):
    """A batch of timesteps for ``x`` from a scalar or a batch."""
    import torch

    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)


def call_unet(model, x, t, cond, guidance=None):
    return model(x, t, **cond.kwargs()).sample


def classifier_free(den: Denoiser, x, t, cond, neg, scale: float):
    """ε_neg + scale·(ε_cond − ε_neg), both in one batch."""
    import torch

    from auditkit.models.conditioning import Conditioning

    both = den.predict(torch.cat([x, x]), t, Conditioning.cat([neg, cond]))
    e_neg, e_cond = both.chunk(2)
    return e_neg + scale * (e_cond - e_neg)


def embedded_guidance(den: Denoiser, x, t, cond, neg, scale: float):
    """Guidance-distilled models (Flux.1-dev) take the guidance as an input: one conditional pass, as
    FluxPipeline samples (models without the input, Flux.1-schnell, take none)."""
    return den.predict(x, t, cond, guidance=scale)


# --- images to latents: (vae, x in [-1, 1], N × 3 × H × W) -> latents as the denoiser reads them ----------

def kl_latents(vae, x):
    """An image VAE's distribution means, shifted and scaled as the SD, SDXL, SD3 and Flux pipelines do."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (vae.encode(x).latent_dist.mean.float() - shift) * vae.config.scaling_factor


def video_vae_latents(vae, x):
    """A video VAE's (Qwen-Image's, Wan's) distribution means of one-frame clips, normalised per channel by its
    ``latents_mean`` / ``latents_std`` (the inverse of what the pipelines do before decoding): N × C × h × w."""
    import torch

    z = vae.encode(x.unsqueeze(2)).latent_dist.mean.float()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1)
    return (z - mean) / std


# --- latent geometry -----------------------------------------------------------------------------

def vae_factor(pipe) -> int:
    """Image pixels per latent pixel of the pipeline's VAE (a video pipeline's spatial factor)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    return factor if factor is not None else pipe.vae_scale_factor_spatial


def configured_size(pipe, model) -> tuple[int, int]:
    """(channels, size) of the latents from the denoiser's own config (UNet, SD3 transformer)."""
    return model.config.in_channels, model.config.sample_size


# --- inputs of the text key/value projections, for the data-free concept check --------------------

def prompt_states(den: Denoiser, cond, names: list[str], visit: Callable, steps: int, generator) -> None:
    """UNet cross-attention reads the prompt's hidden states themselves: ``visit(name, cond.hidden)`` for
    every module (no denoiser call)."""
    for name in names:
        visit(name, cond.hidden)


def captured_states(den: Denoiser, cond, names: list[str], visit: Callable, steps: int, generator) -> None:
    """MMDiT: the text stream each block's projections read (normalised and modulated by the timestep
    and the pooled prompt; after the first block also attended to the image), handed to
    ``visit(name, batch × tokens × d)`` by forward hooks along the base model's own conditional
    trajectory (``steps`` points from noise drawn with ``generator``), as the model computes it."""
    import torch

    if not names:
        return
    hooks = [den.model.get_submodule(n).register_forward_hook(
        lambda _m, args, _out, n=n: visit(n, args[0].detach())) for n in names]
    try:
        with torch.no_grad():
            sampler = den.sampler(steps)
            x = den.noise(len(cond), generator) * sampler.init_noise_sigma
            for k, t in enumerate(sampler.timesteps):
                x = sampler.step(den.predict(x, t, cond), k, x)
    finally:
        for h in hooks:
            h.remove()


@dataclass(frozen=True)
class Denoising:
    """How one kind of denoiser is called, trained and sampled (see the module docstring)."""

    process: Callable  # (scheduler config) -> EpsilonProcess | FlowMatchingProcess
    call: Callable  # (model, x, t, cond, guidance) -> prediction
    guide: Callable  # (denoiser, x, t, cond, neg, scale) -> guided prediction for sampling
    size: Callable  # (pipe, model) -> (latent channels, latent size)
    targets: dict[str, str]  # preset name -> regex over the denoiser's module names
    text_kv: tuple[str, ...]  # suffixes of the projections making the text's keys and values
    text_states: Callable  # (denoiser, cond, names, visit, steps, generator): visit(name, its inputs) for each
    patch: int = 1  # latent pixels per image token side (for the resolution-dependent schedule shift)
    guidance: float | None = None  # the guidance input of distilled models outside sampling (training, checks)
    label: str = "UNet"
    # the linear layers that read the prompt's encoding itself (regex over module names -> what they read:
    # "hidden", or a key of Conditioning.added), where a closed-form edit (auditkit.train.uce) applies
    text_readers: dict[str, str] = field(default_factory=dict)
    to_latents: Callable = kl_latents  # (vae, images in [-1, 1]) -> latents (the training data's)
    latent_factor: int = 1  # image pixels per latent pixel beyond the VAE's factor (Flux.2 patchifies its latents)


UNET = Denoising(EpsilonProcess, call_unet, classifier_free, configured_size, UNET_TARGETS,
                 (".attn2.to_k", ".attn2.to_v"), prompt_states, text_readers={r".*\.attn2\.(to_k|to_v)$": "hidden"})
# an MMDiT's text tokens enter through context_embedder, its pooled prompt through the text embedder's first layer
MMDIT_TEXT_READERS = {r"context_embedder$": "hidden",
                      r"time_text_embed\.text_embedder\.linear_1$": "pooled_projections"}
MMDIT_TEXT_KV = (".attn.add_k_proj", ".attn.add_v_proj")  # the text tokens' keys and values the image attends to


@dataclass
class Denoiser:
    """A :class:`Denoising` record bound to a loaded pipeline: its denoiser ``model`` (component
    ``component``), its diffusion ``process`` and its latent geometry."""

    pipe: Any
    model: Any
    component: str
    record: Denoising
    process: Any

    @property
    def label(self) -> str:
        return self.record.label

    @property
    def prediction(self) -> str:
        """What the denoiser predicts: ``noise`` (ε) or ``velocity`` (flow matching)."""
        return self.process.prediction

    def predict(self, x, t, cond, guidance: float | None = None):
        """The denoiser's prediction at (x_t, t) under ``cond``, shaped like ``x``."""
        return self.record.call(self.model, x, t, cond, self.record.guidance if guidance is None else guidance)

    def guided(self, x, t, cond, neg, scale: float):
        """The guided prediction sampling follows (classifier-free, or embedded for distilled models)."""
        return self.record.guide(self, x, t, cond, neg, scale)

    def latent_shape(self) -> tuple[int, int, int]:
        channels, size = self.record.size(self.pipe, self.model)
        return channels, size, size

    def image_size(self) -> int:
        """The side in pixels of the images the denoiser is trained on (the latent size × the VAE factor)."""
        return self.latent_shape()[1] * vae_factor(self.pipe) * self.record.latent_factor

    def noise(self, n: int, generator):
        """Standard normal latents of ``n`` images, on the denoiser's device and dtype."""
        import torch

        return torch.randn((n, *self.latent_shape()), generator=generator).to(self.model.device, self.model.dtype)

    @property
    def reads_prompt_directly(self) -> bool:
        """Whether the text key/value projections read the encoder's output itself (a UNet's cross-attention),
        not a text stream the denoiser computes (an MMDiT's joint attention)."""
        return self.record.text_states is prompt_states

    def image_tokens(self) -> int:
        """Positions of one image in the denoiser's sequence (an MMDiT's image tokens; a UNet's latent pixels)."""
        _, h, w = self.latent_shape()
        return (h // self.record.patch) * (w // self.record.patch)

    def sampler(self, steps: int) -> Sampler:
        return self.process.sampler(steps, self.image_tokens())

    def latents(self, images_u8):
        """VAE latents (distribution means, normalised as the pipeline does: ``Denoising.to_latents``) of uint8
        images N×H×W×3, in the denoiser's device and dtype (a pipeline loaded in bf16 on a GPU encodes in the VAE's
        own dtype)."""
        import torch

        vae = self.pipe.vae
        x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(vae.device, vae.dtype)
        out = []
        with torch.no_grad():
            for chunk in x.split(256):
                out.append(self.record.to_latents(vae, chunk))
        return torch.cat(out).to(self.model.device, self.model.dtype)

    def text_states(self, cond, paths: list[str], visit: Callable, steps: int, generator) -> None:
        """``visit(path, inputs)`` with what each text key/value projection ``path`` (no component prefix)
        reads for ``cond`` (batch × tokens × d; an MMDiT's once per trajectory step)."""
        self.record.text_states(self, cond, paths, visit, steps, generator)

    def text_kv_modules(self, names) -> list[str]:
        """The names (canonical, ``component.path``) among ``names`` of the text key/value projections."""
        prefix = f"{self.component}."
        return sorted(n for n in names if n.startswith(prefix) and n.endswith(self.record.text_kv))
