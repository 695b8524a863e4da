"""What only Wan does: clips (the transformer reads batch × c × frames × h × w), the timestep on the 0–1000
scale, the scheduler's shift; auditkit trains and checks on one-frame clips."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402
from conftest import random_modules, run_cli  # noqa: E402

from auditkit.errors import BadInput  # noqa: E402
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


def test_a_two_expert_wan22_folder_is_refused_for_adapting_and_its_adapters_still_read_statically(tmp_path):
    """A Wan 2.2 A14B folder holds two experts and its adapters come one file per expert, the file not saying which:
    loading it for the dynamic scan (or align, finetune, repair) is one line naming the folder, exit 2, nothing
    written; the adapter itself still scans statically without --base. A folder whose second expert is absent
    (transformer_2 null in model_index.json, as every Wan 2.1 folder) loads."""
    from auditkit.lora.write import save_adapter
    from auditkit.models.pipeline import architecture_of_folder

    folder = e2e.tiny_wan22_a14b_pipeline(tmp_path / "a14b")
    with pytest.raises(BadInput, match=r"a14b.*two experts: transformer for the high-noise steps, transformer_2 below "
                                       r"boundary_ratio 0\.875.*without --base"):
        load_pipeline(str(folder))
    assert load_pipeline(str(tmp_path / "a14b-first")).transformer_2 is None  # a one-expert folder loads

    arch = architecture_of_folder(folder, "tiny-a14b")
    names = [n for n in arch.modules if n.endswith(".attn2.to_k")]
    cand = save_adapter(random_modules(arch, names, seed=1), tmp_path / "cand.safetensors", arch)
    safe = save_adapter(random_modules(arch, names, seed=2), tmp_path / "safe.safetensors", arch)
    out = tmp_path / "report"
    r = run_cli("scan", cand, "--no-config", "--safety", safe, "--base", folder, "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "two experts" in lines[0] and str(folder.name) in lines[0], r.stderr
    assert not out.exists()
