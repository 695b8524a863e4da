"""What only Qwen-Image does: prompts padded to one length with the padding masked (the pipeline pads a batch to
its longest and drops the mask when nothing is padded), and the video VAE's per-channel latent normalisation."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402

from auditkit.models.pipeline import denoiser_for, encode, load_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(e2e.tiny_qwen_image_pipeline(tmp_path_factory.mktemp("qwen") / "q")))


def test_the_padded_conditioning_predicts_what_the_pipelines_own_call_predicts(pipe):
    from diffusers import FluxPipeline, QwenImagePipeline

    den = denoiser_for(pipe)
    cond = encode(pipe, ["a red cross"])
    hidden, mask = pipe.encode_prompt(["a red cross"], device="cpu")  # unpadded: the pipeline drops the mask
    assert mask is None and cond.hidden.shape[1] > hidden.shape[1]
    assert torch.equal(cond.hidden[:, :hidden.shape[1]], hidden) and not cond.hidden[:, hidden.shape[1]:].any()
    x = den.noise(1, torch.Generator().manual_seed(0))
    t = den.sampler(4).timesteps[1]
    with torch.no_grad():
        ours = den.predict(x, t, cond)
        _, c, h, w = x.shape
        theirs = pipe.transformer(hidden_states=QwenImagePipeline._pack_latents(x, 1, c, h, w),
                                  timestep=t.expand(1) / 1000, encoder_hidden_states=hidden,
                                  encoder_hidden_states_mask=None, img_shapes=[[(1, h // 2, w // 2)]]).sample
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(theirs, h, w, 1), rtol=1e-5, atol=1e-5)
    # the concept word's own token is found where the encoding put it
    from auditkit.analysis.concept import concept_mask

    assert concept_mask(cond, "cross").sum() == 1


def test_latents_are_what_the_pipeline_decodes(pipe):
    """Denoiser.latents normalises the VAE's means; the pipeline's decode undoes exactly that normalisation."""
    import numpy as np

    vae = pipe.vae
    vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 0.5, 1.0, 4.0])
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z = denoiser_for(pipe).latents(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = vae.encode(x.unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(z / std + mean, raw, rtol=1e-5, atol=1e-5)  # QwenImagePipeline's decode step
