"""The per-family denoising records: the diffusion processes against hand computations and diffusers' own
schedulers, the target presets of each kind of denoiser, and conditionings that index and batch."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from auditkit.models import denoising  # noqa: E402
from auditkit.models.conditioning import Conditioning  # noqa: E402
from auditkit.models.families import FAMILIES  # noqa: E402

SHIFTED = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3's scheduler config
DYNAMIC = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
           "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's


def test_flow_matching_noises_linearly_and_targets_the_velocity():
    process = denoising.FlowMatchingProcess(diffusers.FlowMatchEulerDiscreteScheduler().config)
    x0 = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 0.0]]]])  # 2 × 1 × 1 × 2
    noise = torch.tensor([[[[3.0, 1.0]]], [[[-1.0, 4.0]]]])
    t = torch.tensor([250.0, 1000.0])  # σ = 0.25, 1.0
    expected = torch.tensor([[[[0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 1]]], [[[-1.0, 4.0]]]])
    torch.testing.assert_close(process.add_noise(x0, noise, t), expected)
    torch.testing.assert_close(process.target(x0, noise), torch.tensor([[[[2.0, 3.0]]], [[[-1.5, 4.0]]]]))
    assert process.prediction == "velocity"


def test_training_timesteps_are_the_shifted_schedules_and_the_densities_differ():
    process = denoising.FlowMatchingProcess(diffusers.FlowMatchEulerDiscreteScheduler(**SHIFTED).config,
                                            denoising.logit_normal_density)
    t = process.sample_timesteps(4000, torch.Generator().manual_seed(0))
    schedule = diffusers.FlowMatchEulerDiscreteScheduler(**SHIFTED)
    assert set(t.tolist()) <= set(schedule.timesteps.tolist())  # the scheduler's (shifted) training timesteps
    sigma = process.sigma(t, torch.zeros(len(t), 1))
    lookup = dict(zip(schedule.timesteps.tolist(), schedule.sigmas.tolist(), strict=False))
    torch.testing.assert_close(sigma.flatten(), torch.tensor([lookup[v] for v in t.tolist()]), rtol=1e-5, atol=1e-6)
    u_logit = denoising.logit_normal_density(4000, torch.Generator().manual_seed(1))
    u_flat = denoising.uniform_density(4000, torch.Generator().manual_seed(1))
    tails = [float(((u < 0.1) | (u > 0.9)).float().mean()) for u in (u_logit, u_flat)]
    assert tails[0] < 0.06 < 0.15 < tails[1]  # logit-normal: about 3% in the tails; uniform: 20%


def test_the_epsilon_process_is_ddpm_noising_and_ddim_sampling():
    config = diffusers.DDIMScheduler(beta_schedule="scaled_linear").config
    process = denoising.EpsilonProcess(config)
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = process.sample_timesteps(2, torch.Generator().manual_seed(0))
    assert ((0 <= t) & (t < 1000)).all() and process.prediction == "noise"
    torch.testing.assert_close(process.add_noise(x0, noise, t),
                               diffusers.DDPMScheduler.from_config(config).add_noise(x0, noise, t))
    assert process.target(x0, noise) is noise
    sampler = process.sampler(4, 0)
    reference = diffusers.DDIMScheduler.from_config(config)
    reference.set_timesteps(4)
    assert torch.equal(sampler.timesteps, reference.timesteps)
    stepped = reference.step(noise, reference.timesteps[1], x0).prev_sample
    torch.testing.assert_close(sampler.step(noise, 1, x0), stepped)


@pytest.mark.parametrize("schedule, config", [(denoising.scheduler_schedule, SHIFTED),
                                              (denoising.linear_sigma_schedule, DYNAMIC)], ids=["sd3", "flux-dev"])
def test_the_euler_sampler_is_the_schedulers_own_steps_and_schedule(schedule, config):
    """Its timesteps are those the pipeline sets (FluxPipeline: σ = linspace(1, 1/n, n) and the shift for
    the image's token count; SD3: the scheduler's default), and each stateless step is the scheduler's."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    process = denoising.FlowMatchingProcess(diffusers.FlowMatchEulerDiscreteScheduler(**config).config,
                                            schedule=schedule)
    sampler = process.sampler(5, image_tokens=1024)
    reference = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    if config.get("use_dynamic_shifting"):
        reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    else:
        reference.set_timesteps(5)
    torch.testing.assert_close(sampler.timesteps, reference.timesteps)
    x = x_ref = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(reference.timesteps):
        v = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(k + 1))
        x, x_ref = sampler.step(v, k, x), reference.step(v, t, x_ref).prev_sample
        torch.testing.assert_close(x, x_ref)
    assert sampler.init_noise_sigma == 1.0


def test_every_denoiser_table_names_the_same_presets():
    assert set(denoising.MMDIT_TARGETS) == set(denoising.UNET_TARGETS)
    for family in (f for f in FAMILIES.values() if f.pipeline_class):
        record = family.denoising
        assert isinstance(record, denoising.Denoising) and set(record.targets) == set(denoising.UNET_TARGETS)


@pytest.mark.parametrize("build", ["tiny_flux_components", "tiny_sd3_components"])
def test_mmdit_presets_split_the_blocks_into_text_projections_and_the_rest(build):
    import tiny_pipelines

    from auditkit.train.lora import target_modules

    model = getattr(tiny_pipelines, build)()["transformer"]
    pick = {p: set(target_modules(model, p, denoising.MMDIT_TARGETS, "transformer")) for p in denoising.MMDIT_TARGETS}
    assert pick["esd-x"] | pick["esd-u"] == pick["transformer"] and not pick["esd-x"] & pick["esd-u"]
    assert all(n.rsplit(".", 1)[1] in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out") for n in pick["esd-x"])
    assert pick["cross-kv"] < pick["esd-x"] and pick["attention"] < pick["transformer"]
    assert not any(n.startswith(("time_text_embed", "context_embedder", "norm_out", "proj_out"))
                   or ".norm" in n for n in pick["transformer"])  # embedders, modulation and the final layer
    if build == "tiny_flux_components":  # the single-stream blocks: attention and the fused MLP in esd-u
        assert {"single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                "single_transformer_blocks.0.proj_out"} <= pick["esd-u"]
    else:  # SD3.5's second attention is an image self-attention
        assert "transformer_blocks.0.attn2.to_k" in pick["esd-u"]


def test_a_conditioning_without_a_nesting_key_passes_its_added_entries_as_keywords():
    ids = torch.arange(6).reshape(2, 3)
    cond = Conditioning(torch.randn(2, 3, 4), {"pooled_projections": torch.randn(2, 5)}, added_under=None,
                        tokens=(("tok", ids),))
    picked = Conditioning.cat([cond[np.array([1])], cond[np.array([0])]])
    assert set(picked.kwargs()) == {"encoder_hidden_states", "pooled_projections"}
    assert torch.equal(picked.hidden, cond.hidden[[1, 0]]) and torch.equal(picked.tokens[0][1], ids[[1, 0]])
    unet = Conditioning(torch.randn(1, 3, 4), {"text_embeds": torch.randn(1, 5)}, tokens=(("tok", ids[:1]),))
    three = unet.repeat(3)
    assert set(three.kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert three.kwargs()["added_cond_kwargs"]["text_embeds"].shape == (3, 5) and three.tokens[0][1].shape == (3, 3)
