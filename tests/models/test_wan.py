"""What only Wan does: clips (the transformer reads batch × c × frames × h × w), the timestep on the 0–1000
scale, the scheduler's shift; auditkit trains and checks on one-frame clips."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402

from auditkit.models.pipeline import load_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(e2e.tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "w")))


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_one_frame_clips_by_hand_is_the_pipelines_own(pipe, guidance):
    """auditkit's denoiser (call, guide, the shifted schedule, noise), stepped by hand on one-frame clips, ends where
    WanPipeline's own loop does for num_frames=1."""
    prompts = ["a red cross", "a blue square on gray"]
    latents = pipe(prompt=list(prompts), num_inference_steps=3, guidance_scale=guidance, output_type="latent",
                   num_frames=1, height=32, width=32, max_sequence_length=16,
                   generator=torch.Generator().manual_seed(0)).frames
    x = e2e.sampled_by_hand(pipe, prompts, 3, guidance, guided=guidance > 1)
    torch.testing.assert_close(x, latents[:, :, 0], rtol=1e-4, atol=1e-4)


def test_a_unipc_config_shifts_the_schedule_by_its_flow_shift():
    from auditkit.models.family import wan

    shifted = wan.process({"num_train_timesteps": 1000, "flow_shift": 3.0}).sampler(4, 64).timesteps
    plain = wan.process({"num_train_timesteps": 1000}).sampler(4, 64).timesteps
    assert float(shifted[1]) > float(plain[1])  # a shift > 1 keeps more of the schedule at high noise
