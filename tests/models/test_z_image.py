"""What only Z-Image does: a transformer that takes per-image latents and per-prompt captions as lists, the
timestep reversed ((1000 − t) / 1000) and predicts the negated velocity, and guidance pos + s·(pos − neg)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402

from auditkit.models.pipeline import load_pipeline, render_options  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(e2e.tiny_z_image_pipeline(tmp_path_factory.mktemp("z") / "z")))


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sampling_by_hand_is_the_pipelines_own(pipe, guidance):
    """The denoiser bound by auditkit (its call, guide, sampler and noise), stepped by hand from the same seed,
    ends where ZImagePipeline's own loop does: the velocity's sign, the reversed timestep and the guidance."""
    prompts = ["a red cross", "a blue square on gray"]
    # a copy: ZImagePipeline writes the templated prompts into the list it is given
    latents = pipe(prompt=list(prompts), num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **render_options(pipe)).images
    x = e2e.sampled_by_hand(pipe, prompts, 3, guidance, guided=guidance > 0)
    torch.testing.assert_close(x, latents, rtol=1e-4, atol=1e-4)
