"""What only HunyuanVideo 1.5 does: the system prompt cropped from the Qwen2.5-VL encoding, the transformer called on
latents beside zero condition latents and mask, guidance through the pipeline's guider component, adapters loaded
through the transformer's PEFT mixin (the pipeline has no LoRA loader), and a VAE that decodes one clip at a time."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import tiny_pipelines as e2e  # noqa: E402

from auditkit.models.pipeline import encode, load_pipeline  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(e2e.tiny_hunyuanvideo15_pipeline(tmp_path_factory.mktemp("hunyuan") / "h")))


def test_the_crop_leaves_exactly_the_prompt_and_the_template_after_it(pipe):
    """The pipeline crops its first 108 tokens (prompt_template_encode_start_idx): the tiny tokenizer makes the
    system prompt exactly those, so the conditioning's first positions are the prompt's own words."""
    from auditkit.analysis.concept import concept_mask

    cond = encode(pipe, ["a red cross", "a blue square on gray"])
    tokenizer = pipe.tokenizer
    for row, prompt in zip(cond.tokens[0][1], ["a red cross", "a blue square on gray"], strict=True):
        words = tokenizer(prompt, add_special_tokens=False).input_ids
        assert row[:len(words)].tolist() == words
        assert tokenizer.convert_ids_to_tokens(row[len(words):len(words) + 2].tolist()) == ["<|im_end|>", "\n"]
    assert cond.added["encoder_attention_mask"].sum(dim=1).tolist() == [3 + 5, 5 + 5]  # the prompt, the template's 5
    assert concept_mask(cond, "cross").sum() == 1


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_one_frame_clips_by_hand_is_the_pipelines_own(pipe, guidance):
    """auditkit's denoiser (the call with zero condition latents, mask and image embeddings; the guider's combination;
    __call__'s shifted sigmas; noise), stepped by hand on one-frame clips, ends where HunyuanVideo15Pipeline's own loop
    does for num_frames=1, its guider set to the guidance as a render sets it."""
    from auditkit.models.pipeline import guided

    prompts = ["a red cross", "a blue square on gray"]
    with guided(pipe, guidance, len(prompts)) as options:
        assert options == {}
        latents = pipe(prompt=prompts, num_inference_steps=3, num_frames=1, height=32, width=32, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).frames
    x = e2e.sampled_by_hand(pipe, prompts, 3, guidance, guided=guidance > 1)
    torch.testing.assert_close(x, latents[:, :, 0], rtol=1e-4, atol=1e-4)


def test_a_render_sets_the_suites_guidance_on_a_copy_of_the_guider(pipe):
    from auditkit.models.pipeline import render

    own = pipe.guider
    clips = {g: render(pipe, ["a red cross"], 2, g, [torch.Generator().manual_seed(0)]) for g in (1.0, 6.0, 9.0)}
    assert pipe.guider is own and own.guidance_scale == 6.0  # the pipeline's own guider, unchanged
    assert not (clips[1.0] == clips[9.0]).all()
    # at the guider's own scale, the render is the pipeline's plain call
    out = pipe(prompt=["a red cross"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", height=32, width=32, num_frames=17).frames
    import numpy as np

    from auditkit.models.pipeline import sample_frames

    assert np.array_equal(clips[6.0], np.clip(np.rint(sample_frames(out) * 255), 0, 255).astype(np.uint8))


def test_adapters_load_through_the_transformers_peft_mixin(pipe, tmp_path):
    """HunyuanVideo15Pipeline has no load_lora_weights: a diffusers-layout file goes to the transformer's
    load_lora_adapter as it is, a kohya one as auditkit's conversion; both are coverage-checked, and unloading
    leaves no LoRA layer."""
    from conftest import random_modules

    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models.attach import DenoiserLoras, load_adapters, lora_api, lora_layers, unload_adapters
    from auditkit.models.pipeline import architecture_of

    assert not hasattr(pipe, "load_lora_weights") and isinstance(lora_api(pipe), DenoiserLoras)
    arch = architecture_of(pipe)
    names = [n for n in arch.modules if n.endswith((".attn.add_k_proj", ".attn.add_v_proj"))]
    mods = random_modules(arch, names, rank=2, scale=0.5, std=0.2, seed=0)
    adapters = {layout: read_adapter(save_adapter(mods, tmp_path / f"{layout}.safetensors", arch, layout),
                                     extra_architectures=(arch,)) for layout in ("diffusers", "kohya")}
    try:
        coverage = load_adapters(pipe, adapters)
        assert {r: (c["source"], c["fraction"]) for r, c in coverage.items()} == {
            "diffusers": ("file", 1.0), "kohya": ("auditkit conversion", 1.0)}
        assert set(pipe.transformer.peft_config) == {"diffusers", "kohya"}
        assert set(lora_layers(pipe, ["diffusers"])) == set(names)
    finally:
        unload_adapters(pipe)
    assert not lora_layers(pipe, ["diffusers", "kohya"]) and not hasattr(pipe.transformer, "peft_config")


def test_latents_are_the_vae_means_times_its_scaling_factor(pipe):
    import numpy as np

    from auditkit.models.pipeline import denoiser_for

    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z = denoiser_for(pipe).latents(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        raw = torch.cat([pipe.vae.encode(c.unsqueeze(2)).latent_dist.mean[:, :, 0] for c in x.split(1)])
    torch.testing.assert_close(z / pipe.vae.config.scaling_factor, raw, rtol=1e-5, atol=1e-5)  # the decode step


def test_the_vae_decodes_one_clip_at_a_time_as_diffusers_0_42_decodes_no_batch(pipe):
    """load_pipeline turns on the VAE's slicing: without it, diffusers 0.42's AutoencoderKLHunyuanVideo15 fails on
    a batch of two clips (its attention broadcasts a batch × n × n mask against batch × 1 × n × n queries). When this
    test fails, diffusers decodes batches itself and the family's on_load can go."""
    assert pipe.vae.use_slicing
    z = torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.vae.disable_slicing()
    try:
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"), torch.no_grad():
            pipe.vae.decode(z)
    finally:
        pipe.vae.enable_slicing()
    with torch.no_grad():
        assert pipe.vae.decode(z).sample.shape == (2, 3, 1, 32, 32)


def test_the_text_streams_rows_go_back_to_the_qwen_positions_also_past_glyph_tokens(pipe):
    """A quoted word puts ByT5 glyph tokens ahead of the Qwen tokens in the transformer's text stream: the concept
    check's rows (the family's text_states) are still the Qwen positions, as the dense reference rebuilds them from the
    transformer's own concatenation order."""
    from auditkit.models.denoising import captured_states
    from auditkit.models.pipeline import denoiser_for

    den = denoiser_for(pipe)
    cond = encode(pipe, ['a red "cross"', "a blue square"])
    assert cond.added["encoder_attention_mask_2"].sum(dim=1).tolist()[1] == 0
    assert cond.added["encoder_attention_mask_2"].sum(dim=1).tolist()[0] > 0
    name = "transformer_blocks.0.attn.add_k_proj"
    ours, raw = [], []
    den.text_states(cond, [name], lambda _n, x: ours.append(x), 2, torch.Generator().manual_seed(0))
    captured_states(den, cond, [name], lambda _n, x: raw.append(x), 2, torch.Generator().manual_seed(0))
    assert len(ours) == len(raw) == 2
    for a, b in zip(ours, raw, strict=True):
        assert a.shape == (*cond.hidden.shape[:2], b.shape[2])
        torch.testing.assert_close(a, e2e.hunyuan_qwen_rows(b, cond), rtol=0, atol=0)
        assert a[0, :8].abs().sum() > 0 and not a[1, 10:].any()  # read where the prompt is, zero past it
