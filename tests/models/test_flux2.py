"""What only Flux.2 (Klein) does: latents 2×2-patchified and batch-norm normalised, tokens with 4-D position ids,
the empirical-μ schedule shift and Qwen3's hidden states of three layers side by side."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402

from auditkit.models.pipeline import denoiser_for, load_pipeline, render_options  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(e2e.tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("f2") / "f2")))


def _vae_space(pipe, x):
    """auditkit's latents (patchified, normalised) as the pipeline returns them with output_type='latent'."""
    from diffusers import Flux2KleinPipeline

    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return Flux2KleinPipeline._unpatchify_latents(x * std + bn.running_mean.view(1, -1, 1, 1))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_by_hand_is_the_pipelines_own(pipe, guidance):
    """auditkit's denoiser (call, guide, sampler with the empirical-μ shift, noise), stepped by hand from the same
    seed, ends where Flux2KleinPipeline's own loop does."""
    prompts = ["a red cross", "a blue square on gray"]
    latents = pipe(prompt=list(prompts), num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **render_options(pipe)).images
    x = e2e.sampled_by_hand(pipe, prompts, 3, guidance, guided=guidance > 1)
    torch.testing.assert_close(_vae_space(pipe, x), latents, rtol=1e-4, atol=1e-4)


def test_training_latents_are_what_the_pipeline_decodes(pipe):
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    den = denoiser_for(pipe)
    z = den.latents(images)
    assert z.shape[1:] == den.latent_shape() and den.image_size() == 32
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(_vae_space(pipe, z), raw, rtol=1e-5, atol=1e-5)
