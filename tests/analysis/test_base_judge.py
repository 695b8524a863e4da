"""The base as a zero-shot judge (auditkit.analysis.base_judge): its pure math against naive references, its
batched judging against one sample at a time, and the library's reading of a lab candidate against the predictor
benchmark's own trajectories."""

import math
from pathlib import Path

import pytest
from conftest import load_benchmark

torch = pytest.importorskip("torch")

from auditkit.analysis.base_judge import (  # noqa: E402
    THRESHOLD,
    budget_factor,
    judge,
    judge_scores,
    judge_updates,
    neutral_prompts,
    relative_fraction,
    relative_mean,
)
from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

SAFETY = (Path(__file__).resolve().parents[2] / "auditkit" / "lab" / "assets" / "adapters" /
          "safety-esd-u-destructive.safetensors")


def test_judge_scores_match_a_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    target, c, n = (torch.randn(5, 2, 3, 3, generator=g) for _ in range(3))
    got = judge_scores(target, c, n)
    for i in range(5):
        want = sum((float(target[i].flatten()[k]) - float(n[i].flatten()[k])) ** 2
                   - (float(target[i].flatten()[k]) - float(c[i].flatten()[k])) ** 2 for k in range(18))
        assert math.isclose(float(got[i]), want, rel_tol=1e-9, abs_tol=1e-9)
    assert got.dtype == torch.float64


def test_relative_mean_and_fraction_follow_their_formulas():
    base = torch.tensor([10.0, 8.0, 12.0, 10.0])
    safe = torch.tensor([0.0, -2.0, 2.0, 0.0])
    # the candidate at the safe model's scores reads 0, at the base's 1
    assert relative_mean(safe, safe, base) == 0.0 and relative_mean(base, safe, base) == 1.0
    cand = torch.tensor([4.0, 6.0, 0.0, 2.0])  # mean 3: 3 / 10 of the way
    assert math.isclose(relative_mean(cand, safe, base), 0.3)
    # midpoint 5: one of four candidate latents above it, none of the safe model's, all of the base's
    assert relative_fraction(cand, safe, base) == 0.25
    assert relative_mean(cand, base, base) is None  # nothing to measure against
    assert relative_fraction(cand, base, base) == 0.0


def test_budget_factor_spends_more_only_above_the_threshold():
    assert budget_factor(None) == 1.0 and budget_factor(float("nan")) == 1.0
    assert budget_factor(THRESHOLD - 0.01) == 1.0 and budget_factor(-3.0) == 1.0
    assert budget_factor(THRESHOLD) == 2.0
    assert budget_factor(1.5 * THRESHOLD) == 2.5
    assert budget_factor(50.0) == 4.0  # capped


def test_neutral_prompts_replace_whole_words_only():
    assert neutral_prompts(["a red cross", "crosses and a cross"], "cross", "square") == \
        ["a red square", "crosses and a square"]


@pytest.fixture(scope="module")
def lab_pipe():
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    torch.manual_seed(0)
    return load_lab_pipeline()


def test_batched_judging_matches_one_sample_at_a_time(lab_pipe):
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(lab_pipe)
    g = torch.Generator().manual_seed(3)
    z, noise = den.noise(5, g), den.noise(5, g)
    concept = encode(lab_pipe, ["a red cross", "a cross", "a blue cross", "a cross", "a white cross"])
    neutral = encode(lab_pipe, ["a red square", "a square", "a blue square", "a square", "a white square"])
    with torch.no_grad():
        batched = judge(den, z, concept, neutral, noise, batch=2)  # chunks of 2, 2, 1
        for i in range(5):
            want = 0.0
            for level in (200, 400, 600):
                t = torch.tensor([level])
                xt = den.process.add_noise(z[i:i + 1], noise[i:i + 1], t)
                ec = den.predict(xt, t, concept[i:i + 1]).double()
                en = den.predict(xt, t, neutral[i:i + 1]).double()
                want += float(((noise[i] - en) ** 2).sum() - ((noise[i] - ec) ** 2).sum())
            assert math.isclose(float(batched[i]), want, rel_tol=1e-4, abs_tol=1e-3)


def test_the_library_reads_a_lab_candidate_as_the_predictor_benchmark_does(lab_pipe):
    from auditkit.suites import builtin_dir, load_suite

    bench = load_benchmark("predictor_signals.py")
    safety = read_adapter(SAFETY).modules
    cand = {n: LoraModule(n, m.down, -0.4 * m.up, m.scale) for n, m in safety.items()}  # undoes 40% of it
    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    prompts = [p.text for p in suite.prompts][:4]  # a few of them: the comparison holds on any
    neutral = neutral_prompts(prompts, suite.concept_word, suite.neutral_word)
    probe = bench.Probe(lab_pipe, prompts, neutral, 8, 5.0, 2, 0)  # the study's settings
    want = bench.pass_signals(probe, bench.reference(probe, safety, 1), cand, safety)
    got = judge_updates(lab_pipe, prompts, neutral, cand, safety)
    assert math.isclose(got.value, want["base_judge"], rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(got.ratio, want["base_judge_ratio"], abs_tol=1e-9)
    assert 0.0 < got.value < 1.0 and got.samples == 2 * len(prompts)
    assert got.above == (got.value >= THRESHOLD) and got.evidence == "data-free"
    assert got.scores["base"] > got.scores["candidate"] > got.scores["safe"]  # the base judges its own the concept


def test_without_a_safety_module_the_candidate_is_read_against_the_base(lab_pipe):
    safety = read_adapter(SAFETY).modules
    got = judge_updates(lab_pipe, ["a red cross", "a cross"], ["a red square", "a square"], safety, None, seeds=1)
    # the safety module alone, as a candidate on the base: it suppresses the concept
    assert got.mode == "amplification" and got.above is None and got.ratio is None and got.scores["safe"] is None
    assert got.value < 0.5
    same = judge_updates(lab_pipe, ["a red cross", "a cross"], ["a red square", "a square"], {}, None, seeds=1)
    assert math.isclose(same.value, 1.0)
