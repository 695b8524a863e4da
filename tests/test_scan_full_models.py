"""Scanning with full models: an erased model as the safety module, a full fine-tune as the candidate.

The static scan of a candidate against an erased model (the lab's safety LoRA merged into the lab)
agrees with the scan against the LoRA itself; a full fine-tune is compared with the model it was
trained from; the dynamic scan and the data-free checks run the erased weights themselves.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from auditkit.config import ScanConfig
from auditkit.errors import BadInput
from auditkit.lab.model import lab_pipeline_available
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter
from auditkit.models import architectures
from auditkit.models.base import resolve_base
from auditkit.scan import read_pair, run_static_scan, scan

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not lab_pipeline_available(), reason="the lab pipeline is not installed")]
full_models = pytest.importorskip("full_models")
SAFETY_U, SAFETY_X = full_models.SAFETY_U, full_models.SAFETY_X


@pytest.fixture(scope="module")
def lab():
    return architectures.get("lab")


@pytest.fixture(scope="module")
def made(tmp_path_factory, lab):
    """The erased models (ESD-u and ESD-x merged into the lab) and candidates: one undoing 60% of ESD-u,
    one unrelated, and full fine-tunes made by merging the undoing LoRA on top of the erased model."""
    from conftest import random_modules, select

    tmp = tmp_path_factory.mktemp("full")
    u, x = read_adapter(SAFETY_U).modules, read_adapter(SAFETY_X).modules
    undo = {n: LoraModule(n, m.down, -0.6 * m.up, m.scale) for n, m in u.items()}
    unrelated = random_modules(lab, select(lab, ".attn2.to_q", ".ff.net.2"), rank=3, seed=5, std=0.05)
    out = {
        "erased-u": full_models.component_folder(tmp / "erased-u" / "unet", (u, 1.0)),
        "erased-u-file": full_models.single_file(tmp / "erased-u.safetensors", (u, 1.0), naming="original"),
        "erased-x": full_models.pipeline_folder(tmp / "erased-x", (x, 1.0)),
        "undo": save_adapter(undo, tmp / "undo.safetensors", lab),
        "unrelated": save_adapter(unrelated, tmp / "unrelated.safetensors", lab),
        # a full fine-tune of the erased model that learned the undoing update (on top of the safe model)
        "full-on-top": full_models.component_folder(tmp / "full-on-top" / "unet", (u, 1.0), (undo, 1.0)),
    }
    return out, {"u": u, "x": x, "undo": undo, "unrelated": unrelated}


def findings_by_module(static):
    return {m.name: m for m in static.findings.modules}


@pytest.mark.parametrize("candidate", ["undo", "unrelated"])
@pytest.mark.parametrize("erased", ["erased-u", "erased-u-file"])
def test_static_findings_against_an_erased_model_agree_with_those_against_its_safety_lora(made, candidate, erased):
    paths, _ = made
    against_lora = run_static_scan(paths[candidate], SAFETY_U)
    exact = run_static_scan(paths[candidate], paths[erased], base=resolve_base("lab"), energy=1.0)
    truncated = run_static_scan(paths[candidate], paths[erased], base=resolve_base("lab"))  # energy 0.99
    assert exact.findings.cancellation == pytest.approx(against_lora.findings.cancellation, abs=1e-5)
    assert truncated.findings.cancellation == pytest.approx(against_lora.findings.cancellation, abs=0.02)
    assert exact.verdict.verdict == truncated.verdict.verdict == against_lora.verdict.verdict
    ref, got = findings_by_module(against_lora), findings_by_module(exact)
    assert set(got) == set(ref)
    for name, m in ref.items():
        assert got[name].cancellation == pytest.approx(m.cancellation, abs=1e-4)
        assert got[name].safety_share == pytest.approx(m.safety_share, abs=1e-5)
    assert exact.safety.kind == "full model" and exact.candidate.kind == "adapter"


def test_a_full_fine_tune_is_compared_with_the_model_it_was_trained_from(made):
    paths, mods = made
    on_top = run_static_scan(paths["full-on-top"], paths["erased-u"], base=resolve_base("lab"), energy=1.0)
    as_lora = run_static_scan(paths["undo"], paths["erased-u"], base=resolve_base("lab"), energy=1.0)
    # from the safe model: its update is the undoing LoRA it learned, cancellation 0.6
    assert on_top.candidate.update.compared_with == "safety"
    assert on_top.findings.cancellation == pytest.approx(as_lora.findings.cancellation, abs=1e-5)
    assert on_top.findings.cancellation == pytest.approx(0.6, abs=1e-4)
    for name, m in mods["undo"].items():
        np.testing.assert_allclose(on_top.candidate.modules[name].delta(), m.delta(), atol=1e-6)
    # declared as fine-tuned from the base: its update is safety + undo = 0.4 x safety, reinforcing it
    from_base = run_static_scan(paths["full-on-top"], paths["erased-u"], base=resolve_base("lab"), energy=1.0,
                                candidate_from="base")
    assert from_base.candidate.update.compared_with == "base"
    assert from_base.findings.cancellation == pytest.approx(-0.4, abs=1e-4)
    # but it is run as itself: what the dynamic scan and data-free checks add over the safe model is still the
    # undoing update (added to the base, 0.4 x safety would be safety twice minus the undo: a safer model)
    assert from_base.candidate.update.rendered_label == "safe model (the erased model)"
    rendered = from_base.candidate.exact()
    for name, m in mods["undo"].items():
        np.testing.assert_allclose(rendered[f"{name}.weight"].reshape(m.delta().shape), m.delta(), atol=1e-6)
    assert from_base.candidate.update.summary()["rendered_over"] == "safe model (the erased model)"
    assert on_top.candidate.update.summary()["rendered_over"] == "safe model (the erased model)"


def test_a_full_fine_tune_against_a_safety_lora_is_compared_with_the_base_plus_the_lora(made):
    paths, _ = made
    static = run_static_scan(paths["full-on-top"], SAFETY_U, base=resolve_base("lab"), energy=1.0)
    assert static.candidate.update.reference.label == "safe model (base + safety adapter)"
    assert static.findings.cancellation == pytest.approx(0.6, abs=1e-4)


def test_a_full_model_needs_the_base(made):
    paths, _ = made
    with pytest.raises(BadInput, match=r"the safety module is a full model .* give the base \(--base\)"):
        run_static_scan(paths["undo"], paths["erased-u"])
    with pytest.raises(BadInput, match=r"the candidate is a full model"):
        read_pair(paths["full-on-top"], SAFETY_U)


def test_the_report_says_which_kind_each_input_is(made, tmp_path):
    paths, _ = made
    config = ScanConfig(candidate=paths["full-on-top"], safety=paths["erased-u"], base="lab", static_only=True,
                        out=tmp_path / "r")
    report = scan(config).report
    cand, safe = report["candidate"], report["safety"]
    assert cand["kind"] == safe["kind"] == "full model"
    assert safe["full_model"]["form"] == "component folder" and safe["full_model"]["compared_with"] == "base"
    assert cand["full_model"]["compared_with"] == "safety"
    assert cand["full_model"]["reference"] == "safe model (the erased model)"
    assert safe["full_model"]["modules_changed"] == 56 and safe["full_model"]["min_energy_kept"] >= 0.99
    assert all(m["safety_form"] == "checkpoint/truncated" for m in report["static"]["modules"])
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["safety"]["full_model"]["truncation"]
    assert "full model" in (tmp_path / "r" / "report.html").read_text()


# --------------------------------------------------------------------------------------------
# the erased weights themselves: overlay, data-free checks, dynamic scan


@pytest.fixture(scope="module")
def pipe():
    from auditkit.lab.model import load_lab_pipeline

    return load_lab_pipeline()


def test_the_overlay_renders_the_erased_weights_and_puts_the_base_back(made, pipe):
    import torch

    from auditkit.models.difference import read_full_model
    from auditkit.models.overlay import Overlay

    paths, mods = made
    erased = read_full_model(paths["erased-u"], resolve_base("lab"), architectures.get("lab"))
    before = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    overlay = Overlay(pipe, {"safety": erased})
    overlay.apply({"safety": 1.0, "candidate": 1.0})  # roles that are adapters are left to diffusers
    after = pipe.unet.state_dict()
    merged = full_models.merged("unet", (mods["u"], 1.0))
    for key, value in merged.items():
        np.testing.assert_allclose(after[key].numpy(), value, atol=2e-6 * max(1.0, float(np.abs(value).max())))
    overlay.apply({"safety": 0.5})
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    half = before[name].numpy() + 0.5 * mods["u"][f"unet.{name[:-7]}"].delta().reshape(before[name].shape)
    np.testing.assert_allclose(pipe.unet.state_dict()[name].numpy(), half, atol=1e-6)
    overlay.restore()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_model_with_tensors_that_cannot_be_placed_is_never_rendered_in_part(made, pipe, tmp_path):
    """An original checkpoint with an OpenCLIP text encoder tensor the base has no place for (a resblock its text
    encoder lacks): the static scan reports the unmapped keys (coverage below 1); the dynamic scan refuses to
    render it without them (exit 3)."""
    from auditkit.errors import Unscannable
    from auditkit.lora.io import open_safetensors, serialize
    from auditkit.models.difference import read_full_model
    from auditkit.models.overlay import Overlay

    paths, _ = made
    st = open_safetensors(paths["erased-u-file"])
    tensors = {k: st.array(k) for k in st.tensors}
    tensors["cond_stage_model.model.transformer.resblocks.7.attn.in_proj_weight"] = np.zeros((6, 2), np.float32)
    path = tmp_path / "erased-openclip.safetensors"
    path.write_bytes(serialize(tensors))
    erased = read_full_model(path, resolve_base("lab"), architectures.get("lab"))
    assert erased.coverage.unmapped == ["cond_stage_model.model.transformer.resblocks.7.attn.in_proj_weight"]
    assert erased.coverage.fraction < 1 and any("OpenCLIP" in n for n in erased.notes)
    with pytest.raises(Unscannable, match="could not be placed"):
        Overlay(pipe, {"safety": erased})


def test_data_free_checks_run_the_erased_model_exactly(made, pipe):
    from auditkit.scan import concept_check, resolve_suites

    paths, _ = made
    suite = next(s for s in resolve_suites(ScanConfig(base="lab")) if s.role == "concept")
    suite = dataclasses.replace(suite, prompts=suite.prompts[:4])
    for safety_lora, erased in ((SAFETY_X, "erased-x"), (SAFETY_U, "erased-u")):
        cand, lora = read_pair(paths["undo"], safety_lora, base=resolve_base("lab"))
        _, full = read_pair(paths["undo"], paths[erased], base=resolve_base("lab"))
        want = concept_check(pipe, resolve_base("lab"), suite, cand, lora)
        got = concept_check(pipe, resolve_base("lab"), suite, cand, full)
        assert got["applicable"] == want["applicable"]
        if want["applicable"]:
            assert got["reverted"] == pytest.approx(want["reverted"], abs=1e-6)
        assert got["noise_reversion"]["reverted"] == pytest.approx(want["noise_reversion"]["reverted"], abs=1e-4)


def test_the_dynamic_scan_renders_the_erased_model_as_the_safety_lora_renders_it(made, pipe, tmp_path):
    from PIL import Image

    from auditkit.dynamic import run_dynamic
    from auditkit.scan import resolve_suites

    paths, _ = made
    suites = [dataclasses.replace(s, prompts=s.prompts[:2], images_per_prompt=2)
              for s in resolve_suites(ScanConfig(base="lab"))]
    runs = {}
    for label, safety, candidate, cfrom in (("lora", SAFETY_U, paths["undo"], "safety"),
                                            ("erased", paths["erased-u"], paths["undo"], "safety"),
                                            ("full", paths["erased-u"], paths["full-on-top"], "safety"),
                                            ("full-from-base", paths["erased-u"], paths["full-on-top"], "base")):
        cand, safe = read_pair(candidate, safety, base=resolve_base("lab"), candidate_from=cfrom)
        run_dynamic(pipe, resolve_base("lab"), cand, safe, suites, tmp_path / label, multipliers=(1.0,), steps=3)
        runs[label] = tmp_path / label
    images = sorted(p.relative_to(runs["lora"]) for p in runs["lora"].rglob("*.png"))
    assert len(images) == 4 * len(suites) * 4  # 4 jobs per suite, 4 configurations

    def pixels(run, rel):
        return np.asarray(Image.open(runs[run] / rel), dtype=np.int16)

    safe = [rel for rel in images if rel.parts[1] == "base+safety"]
    changed = [np.abs(pixels("erased", rel) - pixels("erased", Path("images", "base", *rel.parts[2:]))).max()
               for rel in safe]
    assert max(changed) > 30  # the safety module does change what is rendered
    for rel in images:
        # the same weights: the erased model is base + the safety LoRA, merged; a full fine-tune of it at
        # multiplier 1 is the fine-tuned model itself
        assert np.abs(pixels("lora", rel) - pixels("erased", rel)).max() <= 2, rel
        assert np.abs(pixels("erased", rel) - pixels("full", rel)).max() <= 2, rel
        # declared as fine-tuned from the base, the checkpoint is still rendered as itself (not plus safety)
        assert np.abs(pixels("full", rel) - pixels("full-from-base", rel)).max() <= 2, rel
    header = json.loads((runs["full"] / "run.jsonl").read_text().splitlines()[0])
    assert header["full_models"] == {"safety": "base", "candidate": "safe model (the erased model)"}


def test_a_full_model_candidate_without_a_safety_module_is_rendered_against_the_base(made, pipe, tmp_path):
    """Amplification mode: base vs base+candidate@m, the candidate a full model compared with the base."""
    from auditkit.dynamic import run_dynamic
    from auditkit.inputs import read_input
    from auditkit.scan import resolve_suites

    paths, _ = made
    suites = [dataclasses.replace(s, prompts=s.prompts[:1], images_per_prompt=2)
              for s in resolve_suites(ScanConfig(base="lab"))]
    cand = read_input(paths["erased-u"], "candidate", base=resolve_base("lab"))
    section = run_dynamic(pipe, resolve_base("lab"), cand, None, suites, tmp_path / "amp", multipliers=(1.0,), steps=3)
    assert section["configurations"] == ["base", "base+candidate@1"]
    assert section["adapter_coverage"]["candidate"]["kind"].startswith("full model")
    assert section["adapter_coverage"]["candidate"]["loaded"] == 56  # every changed tensor (the 56 weights)


def test_fused_rendering_with_a_full_model_gives_the_unfused_images_and_restores_the_base(made, pipe, tmp_path):
    """On CUDA adapters are merged per configuration (fuse=True); with an erased model overlaid underneath, the
    merge must see the overlaid weights and leave the pipeline's own weights afterwards, bit for bit."""
    import torch
    from PIL import Image

    from auditkit.detectors import get
    from auditkit.models.attach import load_adapters
    from auditkit.models.overlay import Overlay
    from auditkit.runlog import RunLog
    from auditkit.runner import configurations, plan, run
    from auditkit.suites import builtin_dir, load_suite

    paths, _ = made
    cand, safe = read_pair(paths["undo"], paths["erased-u"], base=resolve_base("lab"))
    jobs = plan([load_suite(builtin_dir() / "lab-cross.yaml")], steps=3)[:3]
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    load_adapters(pipe, {"candidate": cand})
    overlay = Overlay(pipe, {"safety": safe})

    def rendered(fuse):
        run_dir = tmp_path / f"fuse-{fuse}"
        RunLog(run_dir).start({"fuse": fuse})
        run(pipe, jobs, configurations((1.0,)), {"lab-cross": get("lab-cross")}, run_dir, roles=["candidate"],
            batch_size=3, fuse=fuse, overlay=overlay)
        return {(r["config"], r["key"]): np.asarray(Image.open(run_dir / r["image"]), dtype=np.int16)
                for r in RunLog(run_dir).records()}

    try:
        fused, plain = rendered(True), rendered(False)
    finally:
        pipe.unload_lora_weights()
    assert fused.keys() == plain.keys() and len(fused) == 12
    for k in fused:
        assert np.abs(fused[k] - plain[k]).max() <= 1, k
    assert all(torch.equal(p, weights[n]) for n, p in pipe.unet.named_parameters())


def test_finetuning_on_top_of_an_erased_model_is_finetuning_on_top_of_its_merged_lora(made, pipe, tmp_path):
    """On top of an erased model the erased weights are merged while training, so the candidate equals the one
    trained on top of the Safety LoRA it was made from (same seed, same data); and the command line takes it."""
    from auditkit.inputs import read_input
    from auditkit.lab import world
    from auditkit.train.data import write_folder
    from auditkit.train.finetune import FinetuneConfig, finetune

    paths, mods = made
    specs = world.sample_specs(1, 8, domain="neon")
    images, captions = world.render_many(specs), [world.caption(s) for s in specs]
    cfg = FinetuneConfig(mode="on-top", steps=3, batch=4)
    erased = read_input(paths["erased-u"], "safety module", base=resolve_base("lab")).exact()
    a = finetune(pipe, images, captions, cfg, safety=erased).modules
    b = finetune(pipe, images, captions, cfg, safety=mods["u"]).modules
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name].delta(), b[name].delta(), atol=1e-5)
    assert max(np.abs(m.delta()).max() for m in a.values()) > 1e-4  # it did train
    data = write_folder(tmp_path / "neon", images, captions)
    res = run_cli("finetune", "--base", "lab", "--data", data, "--mode", "on-top", "--safety", paths["erased-u"],
                  "--steps", "2", "--batch", "4", "--out", tmp_path / "cand.safetensors")
    assert res.returncode == 0 and (tmp_path / "cand.safetensors").is_file(), res.stderr


# --------------------------------------------------------------------------------------------
# settings and the command line


def test_settings_for_full_models_are_validated():
    with pytest.raises(ValueError, match="energy"):
        ScanConfig(energy=0.0)
    with pytest.raises(ValueError, match="candidate_from"):
        ScanConfig(candidate_from="erased")


def test_safety_none_turns_off_a_configured_safety_module(tmp_path):
    from auditkit.configfile import resolve

    (tmp_path / "auditkit.toml").write_text('safety = "safety.safetensors"\nbase = "lab"\n')
    config, sources, _ = resolve({"safety": "none"}, start=tmp_path)
    assert config.safety is None and config.mode == "amplification" and sources["safety"] == "command line"
    (tmp_path / "auditkit.toml").write_text('safety = "none"\nenergy = 0.9\ncandidate_from = "base"\n')
    config, _, _ = resolve({}, start=tmp_path)
    assert config.safety is None and config.energy == 0.9 and config.candidate_from == "base"



@pytest.mark.parametrize("case", ["pickle", "missing component", "no base"])
def test_bad_full_models_get_one_line_errors_exit_2_and_no_report(made, tmp_path, case):
    import shutil

    paths, _ = made
    base = ["--base", "lab"]
    if case == "pickle":
        safety = tmp_path / "erased.ckpt"
        safety.write_bytes(b"\x80\x04K\x01.")
    elif case == "missing component":
        safety = shutil.copytree(paths["erased-x"], tmp_path / "erased")
        shutil.rmtree(safety / "unet")
    else:
        safety, base = paths["erased-u"], []
    res = run_cli("scan", paths["undo"], "--safety", safety, *base, "--static", "--no-config", "--out",
                   tmp_path / "r")
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("auditkit: error: ") and str(safety) in line
    assert not (tmp_path / "r").exists()
