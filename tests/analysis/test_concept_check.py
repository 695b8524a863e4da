"""Data-free concept check: reverted share of the safety update's change to concept keys/values."""

from pathlib import Path

import numpy as np
import pytest
from conftest import random_modules, select

from auditkit.analysis.concept import kv_reversion
from auditkit.lora.adapter import LoraModule
from auditkit.models import architectures

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab():
    return architectures.get("lab")


def negated(mods, factor=1.0):
    return {n: LoraModule(n, m.down, -factor * m.up, m.scale) for n, m in mods.items()}


def test_matches_a_dense_reference(lab):
    rng = np.random.default_rng(0)
    kv = select(lab, ".attn2.to_k", ".attn2.to_v")
    safety = random_modules(lab, kv, rank=3, seed=1)
    cand = random_modules(lab, kv[:3], rank=5, seed=2)
    e = rng.normal(size=(20, 64))
    mask = np.zeros(20, bool)
    mask[[3, 9]] = True
    res = kv_reversion(e, mask, cand, safety)
    inner = sum(np.sum((e @ cand[n].delta().T) * (e @ safety[n].delta().T)) for n in cand)
    energy = sum(np.sum((e @ safety[n].delta().T) ** 2) for n in safety)
    assert res.applicable and res.reverted == pytest.approx(-inner / energy, rel=1e-9)
    inner_c = sum(np.sum((e[mask] @ cand[n].delta().T) * (e[mask] @ safety[n].delta().T)) for n in cand)
    energy_c = sum(np.sum((e[mask] @ safety[n].delta().T) ** 2) for n in safety)
    assert res.reverted_concept_tokens == pytest.approx(-inner_c / energy_c, rel=1e-9)


def test_exact_inverse_reverts_fully_and_unrelated_modules_not_at_all(lab):
    kv = select(lab, ".attn2.to_k", ".attn2.to_v")
    safety = random_modules(lab, kv, rank=2, seed=3)
    e = np.random.default_rng(1).normal(size=(10, 64))
    mask = np.ones(10, bool)
    assert kv_reversion(e, mask, negated(safety), safety).reverted == pytest.approx(1.0)
    assert kv_reversion(e, mask, negated(safety, 0.5), safety).reverted == pytest.approx(0.5)
    elsewhere = random_modules(lab, select(lab, ".attn1.to_q"), seed=4)
    assert kv_reversion(e, mask, elsewhere, safety).reverted == 0.0


def test_not_applicable_without_cross_attention_kv(lab):
    safety = random_modules(lab, select(lab, ".ff.net.2"), seed=5)
    res = kv_reversion(np.ones((4, 64)), np.ones(4, bool), safety, safety)
    assert not res.applicable and res.reverted is None and "no cross-attention" in res.note


def test_on_the_lab_text_encoder():
    from importlib import resources

    from auditkit.analysis.concept import concept_reversion
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.lora.adapter import read_adapter

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    pipe = load_lab_pipeline()
    path = resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-x-destructive.safetensors")
    safety = read_adapter(str(path)).modules
    res = concept_reversion(pipe, ["a red cross", "a blue cross"], "cross", negated(safety), safety)
    # every position of both prompts is read (cross-attention reads the padding too); "cross" is one token each
    assert res.applicable and res.concept_tokens == 2 and res.tokens == 2 * pipe.tokenizer.model_max_length
    assert res.reverted_concept_tokens == pytest.approx(1.0)
    half = concept_reversion(pipe, ["a red cross", "a blue cross"], "cross", negated(safety, 0.5), safety)
    assert half.reverted_concept_tokens == pytest.approx(0.5)


def test_scan_reports_the_concept_check(tmp_path):
    import json
    import subprocess
    import sys
    from importlib import resources

    from auditkit.lab.model import lab_pipeline_available
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    safety_path = str(resources.files("auditkit.lab").joinpath("assets", "adapters",
                                                              "safety-esd-x-destructive.safetensors"))
    safety = read_adapter(safety_path)
    cand = save_adapter(negated(safety.modules, 0.5), tmp_path / "half.safetensors", safety.architecture)

    def scan(*extra):
        return subprocess.run([sys.executable, "-m", "auditkit", "scan", str(cand), "--safety", safety_path,
                               "--static", "--out", str(tmp_path / "r"), *extra], capture_output=True, text=True,
                              timeout=120)

    from auditkit.suites import builtin_dir

    res = scan("--base", "lab", "--suite", str(builtin_dir() / "lab-cross.yaml"))
    assert res.returncode == 1, res.stderr  # cancels half: risk
    cc = json.loads((tmp_path / "r" / "report.json").read_text())["concept_check"]
    assert cc["applicable"] and cc["reverted"] == pytest.approx(0.5, abs=1e-4) and cc["suite"] == "lab-cross"
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Data-free concept check" in html
    bj = cc["base_judge"]  # data-free evidence beside it, in the JSON, the page and the terminal
    assert bj["evidence"] == "data-free" and bj["threshold"] == 0.24 and bj["above"] == (bj["value"] >= 0.24)
    assert bj["samples"] == 2 * cc["prompts"] and bj["scores"]["base"] > bj["scores"]["safe"]
    assert 'id="base-judge"' in html and f"{bj['value']:.2f}" in html
    assert "base judge" in res.stdout and "never decides the verdict" in " ".join(res.stdout.split())
    assert scan("--suite", str(builtin_dir() / "lab-cross.yaml")).returncode == 2  # a suite needs --base
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: nope\n")
    res = scan("--base", "lab", "--suite", str(bad))
    assert res.returncode == 2 and "bad.yaml" in res.stderr


def test_noise_reversion_is_one_for_the_exact_inverse_and_zero_for_nothing():
    pytest.importorskip("torch")
    from auditkit.analysis.reversion import noise_reversion
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.lora.adapter import read_adapter

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    pipe = load_lab_pipeline()
    from importlib import resources

    path = resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-u-destructive.safetensors")
    safety = read_adapter(str(path)).modules
    prompts = ["a red cross", "a blue cross", "a cross"]
    full = noise_reversion(pipe, prompts, negated(safety), safety, steps=3)
    assert full.reverted == pytest.approx(1.0, abs=1e-4) and len(full.per_step) == 3
    assert full.relative_safety_change > 0.01
    half = noise_reversion(pipe, prompts, negated(safety, 0.5), safety, steps=3)
    assert 0.2 < half.reverted < 0.8
    assert noise_reversion(pipe, prompts, {}, safety, steps=3).reverted == 0.0
    assert noise_reversion(pipe, prompts, safety, safety, steps=3).reverted < 0  # reinforces the safety module


def test_noise_reversion_reads_the_prompts_through_each_models_text_encoder():
    """A safety module that acts through the text encoder, and a candidate whose text-encoder part exactly undoes
    it: fully reverted (before, text-encoder parts were left out and this read 0)."""
    pytest.importorskip("torch")
    from auditkit.analysis.reversion import noise_reversion
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.lora.adapter import LoraModule
    from auditkit.models import architectures

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    pipe = load_lab_pipeline()
    arch = architectures.get("lab")
    rng = np.random.default_rng(0)
    safety = {}
    for n, s in arch.modules.items():
        if n.startswith("text_encoder.") and n.endswith(("v_proj", "fc2")):
            safety[n] = LoraModule(n, rng.normal(0, 0.3, (4, s.flat_in)).astype(np.float32),
                                   rng.normal(0, 0.3, (s.out_features, 4)).astype(np.float32), 1.0)
    prompts = ["a red cross", "a cross"]
    full = noise_reversion(pipe, prompts, negated(safety), safety, steps=3)
    assert full.relative_safety_change > 0.01 and full.note == ""
    assert full.reverted == pytest.approx(1.0, abs=0.05)  # the negation is exact in the weights, not in ε
    assert noise_reversion(pipe, prompts, {}, safety, steps=3).reverted == 0.0


def test_the_concept_check_reads_the_prompts_through_each_models_text_encoders():
    """A candidate acting through the text encoder (and one cross-attention module): the check against a dense
    reference built from the pipeline's own modules — each model's keys/values of the concept prompts as its own
    text encoder and weights compute them. Without ``encoders`` it sees the weight part only, as before."""
    torch = pytest.importorskip("torch")
    from importlib import resources

    from auditkit.analysis.concept import KV, concept_reversion
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.lora.adapter import read_adapter
    from auditkit.models.attach import composed, encoders_composed
    from auditkit.models.pipeline import encode

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    pipe = load_lab_pipeline()
    safety = read_adapter(str(resources.files("auditkit.lab").joinpath(
        "assets", "adapters", "safety-esd-x-destructive.safetensors"))).modules
    arch = architectures.get("lab")
    rng = np.random.default_rng(1)
    kv_name = next(n for n in sorted(safety) if n.endswith(KV))
    picked = [n for n in arch.modules if n.startswith("text_encoder.") and n.endswith(("v_proj", "fc2"))] + [kv_name]
    candidate = {n: LoraModule(n, rng.normal(0, 0.2, (4, arch.modules[n].flat_in)).astype(np.float32),
                               rng.normal(0, 0.2, (arch.modules[n].out_features, 4)).astype(np.float32), 1.0)
                 for n in picked}
    prompts = ["a red cross", "a cross on gray"]
    kv_cand = {n: m for n, m in candidate.items() if n.endswith(KV)}
    kv_safe = {n: m for n, m in safety.items() if n.endswith(KV)}
    got = concept_reversion(pipe, prompts, "cross", kv_cand, kv_safe, encoders=(candidate, safety))
    with torch.no_grad():
        x_b = encode(pipe, prompts).hidden
        with encoders_composed(pipe, (safety, 1.0), (candidate, 1.0), denoiser="unet"):
            x_c = encode(pipe, prompts).hidden
        outs = {}
        both = ((safety, 1.0), (candidate, 1.0))
        for label, adapters, x in (("b", (), x_b), ("s", ((safety, 1.0),), x_b), ("c", both, x_c)):
            with composed(pipe.unet, *adapters):
                outs[label] = {n: pipe.unet.get_submodule(n.split(".", 1)[1])(x).double() for n in kv_safe}
    inner = sum(float(((outs["c"][n] - outs["s"][n]) * (outs["s"][n] - outs["b"][n])).sum()) for n in kv_safe)
    energy = sum(float(((outs["s"][n] - outs["b"][n]) ** 2).sum()) for n in kv_safe)
    assert got.reverted == pytest.approx(-inner / energy, rel=1e-3, abs=1e-4)
    weights_only = concept_reversion(pipe, prompts, "cross", kv_cand, kv_safe)
    assert abs(got.reverted - weights_only.reverted) > 0.01  # the text encoder's part counts


def test_the_base_judge_never_changes_the_verdict(tmp_path, monkeypatch):
    """Data-free evidence: whatever the judge reads, the verdict and its reasons are the same."""
    pytest.importorskip("torch")
    from importlib import resources

    import auditkit.analysis.base_judge as judge_module
    from auditkit import ScanConfig, scan
    from auditkit.analysis.base_judge import BaseJudge
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.suites import builtin_dir

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    safety_path = resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-u-destructive.safetensors")
    safety = read_adapter(safety_path)
    cand = save_adapter(negated(safety.modules, 0.02), tmp_path / "faint.safetensors", safety.architecture)
    pipe = load_lab_pipeline()
    verdicts = []
    for value in (0.0, 5.0):
        def reading(*_a, value=value, **_k):
            return BaseJudge(value, value, {"base": 1.0, "safe": 0.0, "candidate": value}, 0.24, value >= 0.24, 1, 2,
                             8, [200], 0.0)

        monkeypatch.setattr(judge_module, "base_judge", reading)
        config = ScanConfig(candidate=cand, safety=Path(str(safety_path)), base="lab", static_only=True,
                            suites=(str(builtin_dir() / "lab-cross.yaml"),), out=tmp_path / f"r{value}")
        result = scan(config, pipeline=pipe, write=False)
        assert result.report["concept_check"]["base_judge"]["value"] == value
        verdicts.append((result.verdict.verdict, result.verdict.evidence, result.report["reasons"]))
    assert verdicts[0] == verdicts[1]
