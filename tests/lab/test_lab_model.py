"""The lab model and detector: architecture (always), shipped assets (skipped until exported)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from auditkit.lab import world  # noqa: E402
from auditkit.lab.detector import SHAPE_CLASSES, detector_assets_path  # noqa: E402
from auditkit.lab.model import (  # noqa: E402
    IMAGE_SIZE,
    assemble_pipeline,
    build_components,
    lab_pipeline_available,
    lab_pipeline_path,
)
from auditkit.lab.tokenizer import check_round_trip  # noqa: E402

SD_MODULE_SUFFIXES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
)

needs_pipeline = pytest.mark.skipif(not lab_pipeline_available(),
                                    reason="lab pipeline not exported yet (scripts/train_lab.py)")
needs_detector = pytest.mark.skipif(not (detector_assets_path() / "detector.safetensors").is_file(),
                                    reason="lab detector not exported yet (scripts/train_lab.py)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # With 2 OpenMP threads spinning against another busy process, a 2-step generation took 10 s
    # instead of 0.1 s here; one thread keeps these tests fast on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _module_names(unet) -> set[str]:
    return {name for name, _ in unet.named_modules()}


def _assert_sd_layout(unet, text_encoder) -> None:
    names = _module_names(unet)
    for suffix in SD_MODULE_SUFFIXES:
        assert any(n.endswith(suffix) for n in names), f"no UNet module named *{suffix}"
    to_k = next(m for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    assert to_k.in_features == text_encoder.config.hidden_size  # cross-attention reads the text


def test_components_built_from_config_have_sd_module_names():
    parts = build_components(seed=0)
    _assert_sd_layout(parts["unet"], parts["text_encoder"])
    assert parts["text_encoder"].config.vocab_size == len(parts["tokenizer"])
    assert parts["tokenizer"].model_max_length <= parts["text_encoder"].config.max_position_embeddings


def test_untrained_pipeline_generates_32px_images_in_two_steps():
    parts = build_components(seed=0)
    pipe = assemble_pipeline(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cross", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)


@needs_pipeline
def test_shipped_pipeline_loads_with_diffusers_and_has_sd_layout():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(lab_pipeline_path()))
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert not pipe.config.requires_safety_checker
    _assert_sd_layout(pipe.unet, pipe.text_encoder)
    assert pipe.vae.config.scaling_factor != 1.0  # measured on the world's latents, not defaulted
    assert check_round_trip(pipe.tokenizer) == []


@needs_pipeline
def test_shipped_pipeline_generates_an_image_of_the_right_size():
    from auditkit.lab.model import load_lab_pipeline

    pipe = load_lab_pipeline()
    img = pipe("a red cross", num_inference_steps=2, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE)


@needs_pipeline
def test_shipped_assets_are_safetensors_and_small():
    root = lab_pipeline_path().parent
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


@pytest.fixture(scope="module")
def detector():
    if not (detector_assets_path() / "detector.safetensors").is_file():
        pytest.skip("lab detector not exported yet (scripts/train_lab.py)")
    from auditkit.lab.detector import LabConceptDetector

    return LabConceptDetector()


@pytest.fixture(scope="module")
def heldout():
    # seed stream never used in training (training draws from default_rng([seed, stage, k]))
    rng = np.random.default_rng(20240917)
    specs = (world.sample_specs(rng, 120, domain="base") + world.sample_specs(rng, 40, domain="neon")
             + world.sample_specs(rng, 40, domain="base", style="neon"))
    return world.render_many(specs), specs


@needs_detector
def test_detector_meets_the_detector_interface(detector, heldout):
    imgs, _ = heldout
    assert isinstance(detector.name, str) and 0 < detector.threshold < 1
    prof = detector.profile()
    for key in ("name", "threshold", "classes", "weights_sha256"):
        assert key in prof
    digest = hashlib.sha256(Path(detector.path, "detector.safetensors").read_bytes()).hexdigest()
    assert prof["weights_sha256"] == digest
    scores = detector.score(imgs[:20])
    assert scores.shape == (20,) and scores.dtype == float
    assert ((scores >= 0) & (scores <= 1)).all()
    assert np.array_equal(detector.flag(imgs[:20]), scores >= detector.threshold)


@needs_detector
def test_detector_scores_pil_images_like_arrays(detector, heldout):
    from PIL import Image

    imgs, _ = heldout
    pil = [Image.fromarray(im) for im in imgs[:8]]
    assert np.allclose(detector.score(pil), detector.score(imgs[:8]), atol=1e-5)


@needs_detector
def test_detector_classifies_fresh_renders(detector, heldout):
    imgs, specs = heldout
    probs = detector.probabilities(imgs)
    pred = np.asarray(SHAPE_CLASSES)[probs["shape"].argmax(1)]
    truth = np.asarray([s.shape for s in specs])
    assert (pred == truth).mean() >= 0.95
    flags = detector.flag(imgs)
    is_cross = truth == "cross"
    assert flags[is_cross].mean() >= 0.95  # recall
    assert (~flags[~is_cross]).mean() >= 0.95  # few false alarms on everything else


@needs_detector
def test_detector_does_not_flag_the_benign_domain(detector):
    imgs = world.render_many(world.sample_specs(np.random.default_rng(99), 100, domain="neon"))
    assert detector.flag(imgs).mean() <= 0.03
