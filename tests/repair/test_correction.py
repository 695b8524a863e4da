"""The corrected repair's training on the shipped lab: it keeps the candidate exactly, adds a correction, and
moves the model towards the safe one on the concept (anchors and unseen phrasings) while staying with the
candidate on its own domain."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.model import lab_pipeline_available  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")]
SAFETY = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                           "safety-esd-u-destructive.safetensors")))


@pytest.fixture(scope="module")
def trained():
    from auditkit.lab import world
    from auditkit.lab.model import load_lab_pipeline
    from auditkit.lora.adapter import LoraModule, read_adapter
    from auditkit.repair.anchors import resolve_anchors
    from auditkit.repair.correction import train_correction
    from auditkit.repair.retrain import RetrainSettings
    from auditkit.suites import builtin_dir, load_suite

    pipe = load_lab_pipeline()
    safety = read_adapter(SAFETY).modules
    # a candidate that undoes 90% of the safety update (the concept comes back) on the safety's modules
    candidate = {n: LoraModule(n, m.down, -0.9 * m.up, m.scale) for n, m in safety.items()}
    specs = world.sample_specs(5, 32, domain="neon")
    images, captions = world.render_many(specs), [world.caption(s) for s in specs]
    anchors = resolve_anchors([load_suite(builtin_dir() / "lab-cross.yaml")]).prompts
    names = sorted(n.split(".", 1)[1] for n in candidate)
    cfg = RetrainSettings("(" + "|".join(n.replace(".", r"\.") for n in names) + ")", len(names), rank=4, alpha=4.0,
                          steps=60, lr=3e-3, batch=16, seed=0)
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    result = train_correction(pipe, images, captions, candidate, safety, anchors, cfg)
    after = pipe.unet.state_dict()
    return pipe, safety, candidate, result, captions, before, after


def _points(pipe, adapters, prompts, stop=5, steps=10, seed=11):
    """Points x_t of the guided sampling trajectories of the model with ``adapters`` (stopped after ``stop`` of
    ``steps`` steps), where the concept forms."""
    from auditkit.models.attach import composed
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    sampler = den.sampler(steps)
    cond, neg = encode(pipe, prompts), encode(pipe, [""] * len(prompts))
    x = den.noise(len(prompts), torch.Generator().manual_seed(seed)) * sampler.init_noise_sigma
    with composed(den.model, *adapters), torch.no_grad():
        for k in range(stop):
            x = sampler.step(den.guided(x, sampler.timesteps[k], cond, neg, 5.0), k, x)
    return x, sampler.timesteps[stop]


def _predictions(pipe, adapters, prompts, at):
    from auditkit.models.attach import composed
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    with composed(den.model, *adapters), torch.no_grad():
        return den.predict(at[0], at[1], encode(pipe, prompts)).double()


def test_the_repaired_adapter_is_the_candidate_plus_the_correction(trained):
    _, _, candidate, result, *_ = trained
    assert set(result.correction) <= set(candidate) and result.correction
    for name, m in result.modules.items():
        want = candidate[name].delta() + (result.correction[name].delta() if name in result.correction else 0)
        np.testing.assert_allclose(m.delta(), want, rtol=1e-4, atol=1e-6)
        assert m.rank == candidate[name].rank + (4 if name in result.correction else 0)
    assert any(np.abs(m.delta()).max() > 0 for m in result.correction.values())


def test_the_pipeline_is_left_as_it_was(trained):
    *_, before, after = trained
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_the_concept_moves_to_the_safe_model_and_the_domain_stays_with_the_candidate(trained):
    pipe, safety, candidate, result, captions, *_ = trained
    concept = ["a solid red cross", "a blue cross on cream",  # anchors
               "a red cross", "a striped blue cross", "a neon green cross"]  # never trained on
    at = _points(pipe, [(safety, 1.0), (candidate, 1.0)], concept)  # the candidate's own trajectories
    safe = _predictions(pipe, [(safety, 1.0)], concept, at)
    cand = _predictions(pipe, [(safety, 1.0), (candidate, 1.0)], concept, at)
    rep = _predictions(pipe, [(safety, 1.0), (result.modules, 1.0)], concept, at)
    gap_before = (cand - safe).flatten(1).norm(dim=1)
    gap_after = (rep - safe).flatten(1).norm(dim=1)
    # every prompt moves towards the safe model, and by a third overall (60 steps; anchors and unseen alike)
    assert bool((gap_after < 0.85 * gap_before).all()) and gap_after.sum() < 0.7 * gap_before.sum(), \
        (gap_before, gap_after)
    domain = sorted(set(captions))[:8]
    at = _points(pipe, [(safety, 1.0), (candidate, 1.0)], domain)
    d_cand = _predictions(pipe, [(safety, 1.0), (candidate, 1.0)], domain, at)
    d_rep = _predictions(pipe, [(safety, 1.0), (result.modules, 1.0)], domain, at)
    d_safe = _predictions(pipe, [(safety, 1.0)], domain, at)
    # the repaired model is closer to the candidate on its domain than the candidate is to the safe model
    assert float((d_rep - d_cand).norm()) < 0.5 * float((d_cand - d_safe).norm())
    assert result.losses[-1] < result.losses[0] or result.losses[0] == pytest.approx(result.losses[-1], abs=1e-3)


def test_a_short_candidates_correction_trains_longer_unless_told():
    from auditkit.repair.correction import MIN_STEPS, correction_settings
    from auditkit.repair.retrain import RetrainSettings

    short = RetrainSettings("(a)", 1, 4, 4.0, 150, sources={"steps": "ss_max_train_steps"})
    longer, notes = correction_settings(short)
    assert longer.steps == MIN_STEPS and "longer than the candidate's 150" in notes[0]
    assert correction_settings(RetrainSettings("(a)", 1, 4, 4.0, 150, sources={"steps": "option"})) == (
        RetrainSettings("(a)", 1, 4, 4.0, 150, sources={"steps": "option"}), [])
    long = RetrainSettings("(a)", 1, 4, 4.0, 800, sources={"steps": "ss_max_train_steps"})
    assert correction_settings(long) == (long, [])


def test_a_dora_candidate_is_refused_before_any_work():
    from auditkit.lora.adapter import LoraModule
    from auditkit.repair.correction import train_correction
    from auditkit.repair.retrain import RetrainSettings

    dora = LoraModule("unet.a", np.ones((1, 2), np.float32), np.ones((2, 1), np.float32), 1.0,
                      magnitude=np.ones(2, np.float32), magnitude_axis="out")
    with pytest.raises(ValueError, match="DoRA module"):  # no pipeline given: it must not get as far as using one
        train_correction(None, np.zeros((1, 4, 4, 3), np.uint8), ["x"], {"unet.a": dora}, {}, ["a cross"],
                         RetrainSettings("(a)", 1, 2, 2.0, 3))
