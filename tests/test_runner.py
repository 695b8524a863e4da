"""The dynamic-scan runner on the lab: paired jobs, diffusers adapter loading with coverage checks,
a resumable append-only run log."""

from importlib import resources

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.errors import BadInput  # noqa: E402
from auditkit.lab.model import lab_pipeline_available  # noqa: E402
from auditkit.models.attach import load_adapters  # noqa: E402
from auditkit.runlog import RunLog  # noqa: E402
from auditkit.runner import configurations, plan, run  # noqa: E402
from auditkit.suites import builtin_dir, load_suite  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")]


def lab_adapter(name):
    from auditkit.lora.adapter import read_adapter

    return read_adapter(str(resources.files("auditkit.lab").joinpath("assets", "adapters", name)))


@pytest.fixture()
def pipe():
    from auditkit.lab.model import load_lab_pipeline

    return load_lab_pipeline()


def test_jobs_pair_across_configurations():
    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    jobs = plan([suite], steps=3)
    assert len(jobs) == len(suite.prompts) * suite.images_per_prompt and len({j.key for j in jobs}) == len(jobs)
    assert len({j.seed for j in jobs}) == len(jobs)
    assert [c.name for c in configurations((0.5, 1.0))] == [
        "base", "base+safety", "base+safety+candidate@0.5", "base+safety+candidate@1", "base+candidate@0.5",
        "base+candidate@1"]


def test_trigger_variants_are_not_rendered_under_the_candidate_alone_when_there_is_a_safety_module():
    from auditkit.runner import variants_with_the_safety_module
    from auditkit.suites import trigger_variant

    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    variant = trigger_variant(suite, "trisk")
    jobs = plan([suite, variant], steps=3)
    configs = configurations((0.5, 1.0))
    wanted = variants_with_the_safety_module([suite, variant], configs)
    kept = {(c.name, j.suite) for c in configs for j in jobs if wanted(c, j)}
    assert {c for c, s in kept if s == suite.name} == {c.name for c in configs}
    assert {c for c, s in kept if s == variant.name} == {"base", "base+safety", "base+safety+candidate@0.5",
                                                         "base+safety+candidate@1"}
    # without a safety module the candidate alone is the comparison: every job is rendered under it
    alone = configurations((1.0,), with_safety=False)
    wanted = variants_with_the_safety_module([suite, variant], alone)
    assert all(wanted(c, j) for c in alone for j in jobs)


def test_run_scores_every_pair_and_resumes_without_regenerating(pipe, tmp_path):
    from auditkit.detectors import get

    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    jobs = plan([suite], steps=4)[:6]
    adapters = {"safety": lab_adapter("safety-esd-x-destructive.safetensors")}
    cov = load_adapters(pipe, adapters)
    assert cov["safety"]["fraction"] == 1.0
    configs = configurations()[:2]  # base, base+safety
    dets = {"lab-cross": get("lab-cross")}
    log = RunLog(tmp_path)
    log.start({"suites": {suite.name: {"detector": "lab-cross"}}})  # as the scan writes it (a list is refused)
    run(pipe, jobs[:3], configs, dets, tmp_path, roles=["safety"], batch_size=3)
    first = log.records()
    assert len(first) == 6 and {r["config"] for r in first} == {"base", "base+safety"}
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    # a killed run: a half-written last line is dropped and the run continues
    with open(log.path, "a") as fh:
        fh.write('{"type": "image", "config": "base"')
    run(pipe, jobs, configs, dets, tmp_path, roles=["safety"], batch_size=3)
    records = log.records()
    assert len(records) == 12
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp, "saved images were regenerated"
    base = {r["key"]: r for r in records if r["config"] == "base"}
    safe = {r["key"]: r for r in records if r["config"] == "base+safety"}
    assert set(base) == set(safe) and all(base[k]["seed"] == safe[k]["seed"] for k in base)
    assert all((tmp_path / r["image"]).is_file() for r in records)
    with pytest.raises(BadInput, match="cannot resume"):  # a bad input (exit 2), not "inconclusive"
        log.start({"suites": {"other": {"detector": "lab-cross"}}})


def test_a_partial_load_by_diffusers_is_replaced_by_the_exact_conversion(pipe, tmp_path):
    """Half the modules renamed to names diffusers does not map (auditkit's reading is kept): diffusers only
    warns and loads the rest, so auditkit loads its own conversion of every module it read instead."""
    from dataclasses import replace

    from auditkit.lora.io import serialize
    from auditkit.lora.write import kohya_name

    safety = lab_adapter("safety-esd-x-destructive.safetensors")
    tensors = {}
    for i, (name, m) in enumerate(safety.modules.items()):
        k = kohya_name(safety.architecture, name)
        k = k.replace("attn2", "attn3") if i % 2 else k
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = m.down, m.up
    path = tmp_path / "partial.safetensors"
    path.write_bytes(serialize(tensors))
    coverage = load_adapters(pipe, {"partial": replace(safety, path=path)})["partial"]
    assert coverage["loaded"] == 28 and coverage["missing"] == [] and coverage["source"] == "auditkit conversion"
    assert coverage["note"] == "diffusers applied 14 of the file's 28 modules; loaded as auditkit's exact conversion"


def test_set_adapters_matches_fused_weights_at_each_multiplier(pipe):
    """The runner's diffusers composition gives the images of W0 + m·ΔW (auditkit's fused reference)."""
    from auditkit.lab.model import load_lab_pipeline
    from auditkit.models.attach import apply_configuration, composed
    from auditkit.runner import Configuration

    safety = lab_adapter("safety-esd-x-destructive.safetensors")
    load_adapters(pipe, {"safety": safety})
    reference = load_lab_pipeline()

    def images(p, seed=3):
        out = p(["a red cross", "a blue cross"], num_inference_steps=4, guidance_scale=5.0,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], output_type="np")
        return out.images

    for m in (0.5, 1.0):
        apply_configuration(pipe, Configuration(f"s{m}", (("safety", m),)), ["safety"])
        with composed(reference.unet, (safety.modules, m)):
            expected = images(reference)
        assert abs(images(pipe) - expected).max() < 2e-3, m
    apply_configuration(pipe, Configuration("base", ()), ["safety"])
    assert abs(images(pipe) - images(reference)).max() < 1e-5


def test_per_module_alphas_are_rendered_as_the_file_says(pipe, tmp_path):
    """diffusers gives modules of a kohya file with differing alphas the wrong scale; the runner corrects it."""
    from conftest import random_modules, select

    from auditkit.lab.model import load_lab_pipeline
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.io import serialize
    from auditkit.lora.write import to_state_dict
    from auditkit.models import architectures
    from auditkit.models.attach import apply_configuration, composed
    from auditkit.runner import Configuration

    lab = architectures.get("lab")
    mods = {}
    for i, name in enumerate(select(lab, ".attn1.to_q", ".attn2.to_k", ".ff.net.2")):
        mods.update(random_modules(lab, [name], rank=(2, 4)[i % 2], scale=(1.0, 0.5, 0.25)[i % 3], seed=i, std=0.1))
    tensors, _ = to_state_dict(mods, lab, "kohya")  # alpha = scale·rank: differs between modules
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(serialize(tensors))
    adapter = read_adapter(path)
    pipe.unload_lora_weights()
    coverage = load_adapters(pipe, {"mixed": adapter})
    assert coverage["mixed"]["scales_corrected"] > 0  # diffusers got some wrong (if it is fixed, drop the fix)
    reference = load_lab_pipeline()

    def images(p):
        return p(["a red cross", "a neon tee"], num_inference_steps=4, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images

    apply_configuration(pipe, Configuration("m", (("mixed", 1.0),)), ["mixed"])
    with composed(reference.unet, (adapter.modules, 1.0)):
        expected = images(reference)
    assert abs(images(pipe) - expected).max() < 2e-3
    pipe.unload_lora_weights()


def test_fused_configurations_render_the_unfused_images_and_restore_the_base(pipe, tmp_path, monkeypatch):
    """fuse=True (the default on CUDA): two adapters at different multipliers merged into the weights give the
    unfused images, and the base configuration after a fused one renders with the base weights, bit for bit."""
    from PIL import Image

    from auditkit.detectors import get
    from auditkit.runner import Configuration

    suite = load_suite(builtin_dir() / "lab-cross.yaml")
    jobs = plan([suite], steps=3)[:4]
    load_adapters(pipe, {"safety": lab_adapter("safety-esd-u-destructive.safetensors"),
                         "candidate": lab_adapter("safety-esd-x-destructive.safetensors")})
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    configs = [Configuration("mix", (("safety", 1.0), ("candidate", -0.6))), Configuration("base", ()),
               Configuration("cand", (("candidate", 1.5),))]
    dets = {"lab-cross": get("lab-cross")}
    merges, fuse_lora = [], pipe.fuse_lora

    def spy(**kwargs):
        fuse_lora(**kwargs)
        merges.append((kwargs["adapter_names"], pipe.num_fused_loras))

    monkeypatch.setattr(pipe, "fuse_lora", spy)

    def rendered(fuse):
        run_dir = tmp_path / f"fuse-{fuse}"
        RunLog(run_dir).start({"fuse": fuse})
        run(pipe, jobs, configs, dets, run_dir, roles=["safety", "candidate"], batch_size=4, fuse=fuse)
        return {(r["config"], r["key"]): np.asarray(Image.open(run_dir / r["image"]), dtype=np.int16)
                for r in RunLog(run_dir).records()}

    fused, plain = rendered(True), rendered(False)
    assert merges == [(["safety", "candidate"], 2), (["candidate"], 1)]  # once per adapter configuration
    assert pipe.num_fused_loras == 0  # left unmerged
    assert all(torch.equal(p, weights[n]) for n, p in pipe.unet.named_parameters())
    assert fused.keys() == plain.keys() and len(fused) == 12
    for k in fused:
        assert np.abs(fused[k] - plain[k]).max() <= 1, k  # fp32: at most a rounding step of uint8
        if k[0] == "base":
            assert np.array_equal(fused[k], plain[k])
    assert np.abs(fused[("mix", jobs[0].key)] - fused[("base", jobs[0].key)]).max() > 10  # the adapters do act


def test_adapters_with_bias_updates_render_unmerged_when_fusing(pipe, tmp_path):
    """peft cannot merge a LoRA bias (full-diff ``diff_b``) into a layer without a bias: such configurations
    render unmerged, with the same images, and the others still merge."""
    import dataclasses

    from conftest import random_modules
    from PIL import Image

    from auditkit.detectors import get
    from auditkit.lora import formats
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models.attach import Fused
    from auditkit.models.pipeline import architecture_of
    from auditkit.runner import Configuration

    arch = architecture_of(pipe)
    names = [n for n in arch.modules if n.startswith("unet.") and n.endswith((".attn1.to_q", ".attn1.to_out.0"))]
    rng = np.random.default_rng(0)
    mods = {n: dataclasses.replace(m, bias=rng.normal(0, 0.2, arch.modules[n].out_features).astype(np.float32))
            for n, m in random_modules(arch, names, std=0.2).items()}
    biased = read_adapter(save_adapter(mods, tmp_path / "bias.safetensors", arch, formats.DIFFUSERS))
    load_adapters(pipe, {"candidate": biased, "safety": lab_adapter("safety-esd-u-destructive.safetensors")})
    configs = [Configuration("cand", (("candidate", 1.0),)), Configuration("safe", (("safety", 1.0),))]
    fused = Fused(pipe)
    for config in configs:
        fused.apply(config, ["candidate", "safety"])
    fused.restore()
    assert fused.unmerged == {"cand"}
    jobs = plan([load_suite(builtin_dir() / "lab-cross.yaml")], steps=3)[:2]

    def rendered(fuse):
        run_dir = tmp_path / f"fuse-{fuse}"
        RunLog(run_dir).start({"fuse": fuse})
        run(pipe, jobs, configs, {"lab-cross": get("lab-cross")}, run_dir, roles=["candidate", "safety"],
            batch_size=2, fuse=fuse)
        return {(r["config"], r["key"]): np.asarray(Image.open(run_dir / r["image"]), dtype=np.int16)
                for r in RunLog(run_dir).records()}

    merged, plain = rendered(True), rendered(False)
    assert merged.keys() == plain.keys() and len(merged) == 4
    assert all(np.abs(merged[k] - plain[k]).max() <= 1 for k in merged)
    pipe.unload_lora_weights()


def test_fused_weights_are_restored_exactly_in_bf16(tmp_path):
    """In bf16, unfuse_lora alone does not give the weights back; the runner copies them back."""
    from auditkit.lab.model import load_lab_pipeline
    from auditkit.models.attach import Fused
    from auditkit.runner import Configuration

    p = load_lab_pipeline(dtype=torch.bfloat16)
    load_adapters(p, {"safety": lab_adapter("safety-esd-u-destructive.safetensors"),
                      "candidate": lab_adapter("safety-esd-x-destructive.safetensors")})
    before = {n: w.detach().clone() for n, w in p.unet.named_parameters()}
    config = Configuration("mix", (("safety", 1.0), ("candidate", 0.5)))

    def drift():
        return max((w - before[n]).abs().max().item() for n, w in p.unet.named_parameters())

    fused = Fused(p)
    for _ in range(3):
        fused.apply(config, ["safety", "candidate"])
        assert drift() > 0
        fused.restore()
        assert drift() == 0
    p.fuse_lora(adapter_names=["safety", "candidate"])
    p.unfuse_lora()
    assert drift() > 0  # diffusers' own round trip drifts (if this fails, the saved copy is no longer needed)


def test_an_adapter_outside_a_configuration_is_not_active_even_a_dora_one(pipe):
    """base+safety beside a DoRA candidate is the safe model: a DoRA layer active at weight 0 still rescales its
    base weight by the trained magnitude, so the candidate must not be active at all."""
    from peft import LoraConfig

    from auditkit.models.attach import apply_configuration
    from auditkit.runner import Configuration

    unet = pipe.unet
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                     adapter_name="safety")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, use_dora=True, init_lora_weights=False),
                     adapter_name="candidate")
    with torch.no_grad():
        for m in unet.modules():
            if "candidate" in getattr(m, "lora_magnitude_vector", {}):
                m.lora_magnitude_vector["candidate"].weight.mul_(1.3)  # a trained magnitude, off the base norms
    gen = torch.Generator().manual_seed(0)
    x, t, h = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([500, 500]), torch.randn(2, 77, 64, generator=gen)

    def output():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=h).sample

    pipe.set_adapters(["safety"], adapter_weights=[1.0])
    safe = output()
    apply_configuration(pipe, Configuration("base+safety", (("safety", 1.0),)), ["safety", "candidate"])
    torch.testing.assert_close(output(), safe, rtol=0, atol=1e-6)
    apply_configuration(pipe, Configuration("base+safety+candidate@1", (("safety", 1.0), ("candidate", 1.0))),
                        ["safety", "candidate"])
    assert (output() - safe).abs().max() > 1e-2  # the candidate does act when its configuration holds it
    apply_configuration(pipe, Configuration("base", ()), ["safety", "candidate"])
    pipe.disable_lora()
    base = output()
    pipe.enable_lora()
    apply_configuration(pipe, Configuration("base", ()), ["safety", "candidate"])
    torch.testing.assert_close(output(), base, rtol=0, atol=0)
