"""LyCORIS files written by the ``lycoris-lora`` package itself, read by auditkit.

Each file is made the way kohya-style training makes it: ``lycoris.kohya.create_network`` on the
lab pipeline's real diffusers UNet and CLIP text encoder, random weights, ``save_weights``. The
update auditkit reads for every module must equal lycoris' own reconstruction
(``get_diff_weight``; ``get_merged_weight`` − W₀ for DoRA, given the base weights).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
lycoris_kohya = pytest.importorskip("lycoris.kohya")

from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.base import resolve_base  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

if not lab_pipeline_available():  # pragma: no cover - the lab ships with the repository
    pytest.skip("the lab pipeline is not installed", allow_module_level=True)


@pytest.fixture
def lab():  # a fresh pipeline per test: applying a network rewires the pipeline's modules
    return load_lab_pipeline(device="cpu", dtype=torch.float32)


def _canonical(lora_name: str, arch) -> str:
    return arch.kohya_names[lora_name]


PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def write_lycoris(pipe, path, algo: str, seed: int = 0, **kwargs):
    """A LyCORIS network on the lab pipeline (attention, MLP, ResNet convs), randomised, saved by
    lycoris; returns its modules."""
    torch.manual_seed(seed)
    preset = path.with_suffix(".toml")
    preset.write_text(PRESET)
    args = {"conv_dim": "4", "conv_alpha": "2", **{k: str(v) for k, v in kwargs.items()}}
    net = lycoris_kohya.create_network(1.0, 4, 2, None, pipe.text_encoder, pipe.unet, algo=algo,
                                       preset=str(preset), **args)
    net.apply_to(pipe.text_encoder, pipe.unet, True, True)
    with torch.no_grad():
        for module in net.loras:
            for name, p in module.named_parameters():
                if name == "dora_scale":  # a magnitude near the base norms, as trained ones are
                    p.mul_(1.0 + 0.2 * torch.rand_like(p))
                elif name in ("weight", "bias"):  # full: the module holds W0 + ΔW itself
                    p.add_(0.05 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return list(net.loras)


def lycoris_delta(module) -> np.ndarray:
    """ΔW as the module's forward applies it (lycoris 4.1's get_diff_weight scales LoHa/LoKr twice).

    Linear modules: measured through the forward itself, on the identity. Conv modules: the weight
    expression the forward uses."""
    org = module.org_module[0]
    with torch.no_grad():
        if type(module).__name__ == "FullModule":  # its forward is op(x, make_weight())
            delta = module.make_weight(1.0)[0] - module.org_weight
            return delta.double().reshape(delta.shape[0], -1).numpy()
        if isinstance(org, torch.nn.Linear):
            x = torch.eye(org.in_features)
            return (module(x) - module.org_forward(x)).double().T.numpy()
        kind = type(module).__name__
        if kind in ("LohaModule", "LokrModule"):
            delta = module.get_weight(module.shape) * module.scalar
        elif kind == "LoConModule":
            delta = module.make_weight() * module.scale
        else:
            raise AssertionError(kind)
    return delta.double().reshape(delta.shape[0], -1).numpy()


CASES = {
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {}),
    "lokr-factor4": ("lokr", {"factor": 4}),
    "lokr-decompose-both": ("lokr", {"decompose_both": True, "factor": 4}),
    "lokr-full-matrix": ("lokr", {"full_matrix": True}),
    "lokr-tucker": ("lokr", {"use_tucker": True, "factor": 4}),
    "full": ("full", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_lycoris_module_reads_as_lycoris_reconstructs_it(lab, tmp_path, case):
    algo, kwargs = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    modules = write_lycoris(lab, path, algo, **kwargs)
    arch = architectures.get("lab")
    adapter = read_adapter(path, arch="lab")
    assert adapter.coverage.fraction == 1.0 and not adapter.coverage.unmapped
    assert len(adapter.modules) == len(modules) > 20
    expected_algorithm = {"locon": "lora"}.get(algo, algo)
    worst = 0.0
    for module in modules:
        mine = adapter.modules[_canonical(module.lora_name, arch)]
        assert mine.algorithm == expected_algorithm
        ref = lycoris_delta(module)
        got = mine.delta()
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
        if algo == "full" and module.org_bias is None:
            assert mine.bias is None
        elif algo == "full":  # the bias difference too
            with torch.no_grad():
                ref_bias = (module.make_weight(1.0)[1] - module.org_bias[0]).double().numpy()
            np.testing.assert_allclose(mine.bias, ref_bias, rtol=1e-5, atol=1e-7)
    assert worst < 1e-5, f"{case}: worst relative error {worst:.2e}"


def test_lokr_and_loha_stay_in_factor_form_when_it_is_smaller(lab, tmp_path):
    write_lycoris(lab, tmp_path / "a.safetensors", "loha")
    adapter = read_adapter(tmp_path / "a.safetensors", arch="lab")
    forms = {m.form for m in adapter.modules.values()}
    # the lab's modules are 32-128 wide: rank 4·4 = 16 Khatri-Rao factors are smaller than dense ones
    assert "khatri-rao" in forms
    for m in adapter.modules.values():
        assert m.rank < min(m.up.shape[0], m.down.shape[1]) or m.form == "dense"


@pytest.mark.parametrize("wd_on_output", [True, False])
def test_dora_modules_are_exact_given_the_base_weights(lab, tmp_path, wd_on_output):
    path = tmp_path / "dora.safetensors"
    modules = write_lycoris(lab, path, "locon", dora_wd=True, wd_on_output=wd_on_output)
    adapter = read_adapter(path, arch="lab")
    arch = adapter.architecture
    assert all(m.needs_base for m in adapter.modules.values())
    assert any("DoRA" in n for n in adapter.notes)

    class Weights:  # the base weights, as the lycoris modules saw them
        def __init__(self):
            self.w = {_canonical(m.lora_name, arch): m.org_weight.detach().double()
                      .reshape(m.org_weight.shape[0], -1).numpy() for m in modules}

        def get(self, name):
            return self.w.get(name)

    exact = adapter.with_base(Weights())
    assert not any(m.needs_base for m in exact.modules.values())
    worst = 0.0
    for module in modules:
        got = exact.modules[_canonical(module.lora_name, arch)].delta()
        with torch.no_grad():
            merged = module.get_merged_weight(multiplier=1.0)[0]
        ref = (merged - module.org_weight).detach().double().reshape(got.shape).numpy()
        worst = max(worst, float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12)))
    assert worst < 1e-4, worst


class PipelineWeights:
    """Base weights read from a loaded pipeline (the BaseWeights interface: get(canonical))."""

    def __init__(self, pipe):
        self.pipe = pipe

    def get(self, name):
        w = _module(self.pipe, name).weight.detach().double()
        return w.reshape(w.shape[0], -1).numpy()


@pytest.mark.parametrize("case,kwargs", [("loha", {}), ("lokr", {"factor": 4}), ("full", {}),
                                         ("locon", {"dora_wd": True})])
def test_diffusers_composes_every_algorithm_exactly(tmp_path, case, kwargs):
    """What the dynamic scan renders: after attach.load_adapters, the pipeline's fused weights (and
    biases) differ from the base by exactly the update auditkit read, for every module."""
    from auditkit.models.attach import load_adapters

    writer = load_lab_pipeline(device="cpu", dtype=torch.float32)
    write_lycoris(writer, tmp_path / "a.safetensors", case, **kwargs)
    pipe = load_lab_pipeline(device="cpu", dtype=torch.float32)
    adapter = read_adapter(tmp_path / "a.safetensors", arch="lab").with_base(PipelineWeights(pipe))
    before = {name: (PipelineWeights(pipe).get(name), _bias(pipe, name)) for name in adapter.modules}
    coverage = load_adapters(pipe, {"candidate": adapter})
    assert coverage["candidate"]["fraction"] == 1.0
    if any(m.bias is not None for m in adapter.modules.values()):
        # peft cannot merge lora_B biases into bias-less layers: compare what the layers compute
        _assert_linear_layers_add(pipe, adapter)
        return
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["candidate"], lora_scale=1.0)
    worst = 0.0
    for name, m in adapter.modules.items():
        w0, b0 = before[name]
        got = PipelineWeights(pipe).get(name) - w0
        worst = max(worst, float(np.abs(got - m.delta()).max() / (np.abs(m.delta()).max() + 1e-12)))
        if m.bias is not None:
            np.testing.assert_allclose(_bias(pipe, name) - b0, m.bias, atol=1e-6)
    assert worst < 1e-4, worst


def _module(pipe, name):
    component, _, path = name.partition(".")
    model = getattr(pipe, component)
    try:
        return model.get_submodule(path)
    except AttributeError:  # transformers 5 CLIP text models have no text_model level
        return model.get_submodule(path.removeprefix("text_model."))


def _bias(pipe, name):
    b = _module(pipe, name).bias
    return None if b is None else b.detach().double().numpy().copy()


def _assert_linear_layers_add(pipe, adapter):
    """Each adapted Linear layer's output minus its base layer's is x·ΔWᵀ + Δb."""
    checked = 0
    for name, m in adapter.modules.items():
        layer = _module(pipe, name)
        if not isinstance(layer.get_base_layer(), torch.nn.Linear):
            continue
        x = torch.randn(3, layer.get_base_layer().in_features)
        with torch.no_grad():
            got = (layer(x) - layer.get_base_layer()(x)).double().numpy()
        want = x.double().numpy() @ m.delta().T + (m.bias if m.bias is not None else 0.0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked > 20


def test_a_dora_candidate_is_inconclusive_statically_until_the_base_is_given(lab, tmp_path):
    from importlib import resources

    from auditkit.scan import run_static_scan

    path = tmp_path / "dora.safetensors"
    write_lycoris(lab, path, "locon", dora_wd=True)
    safety = str(resources.files("auditkit.lab").joinpath("assets", "adapters", "safety-esd-u-destructive.safetensors"))
    direction = run_static_scan(path, safety, arch="lab")
    assert any(m.needs_base for m in direction.candidate.modules.values())
    assert direction.verdict.verdict in ("inconclusive", "risk")
    if direction.verdict.verdict == "inconclusive":
        assert "DoRA" in direction.verdict.reasons[0]
    exact = run_static_scan(path, safety, arch="lab", base=resolve_base("lab"))
    assert not any(m.needs_base for m in exact.candidate.modules.values())
    assert any("computed with the base weights" in n for n in exact.candidate.notes)
    forms = {f.candidate_form for f in exact.findings.modules}
    assert forms == {"lora/dense"}, forms


# --- LyCORIS around a DiT: create_lycoris on the transformer (SimpleTuner's Flux and SD3 files) -----

DIT_CASES = {"locon": ("lora", {}), "loha": ("loha", {}), "lokr": ("lokr", {"factor": 4}),
             "lokr-decompose-both": ("lokr", {"factor": 2, "decompose_both": True}), "full": ("full", {})}


def _dit_pipeline(family: str):
    import tiny_pipelines
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls, components = {"flux": (FluxPipeline, tiny_pipelines.tiny_flux_components),
                       "sd3": (StableDiffusion3Pipeline, tiny_pipelines.tiny_sd3_components)}[family]
    return cls(**components())


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("case", sorted(DIT_CASES))
def test_lycoris_files_of_a_dit_transformer_read_as_lycoris_reconstructs_them(tmp_path, family, case):
    from lycoris import LycorisNetwork, create_lycoris

    from auditkit.models.pipeline import architecture_of

    pipe = _dit_pipeline(family)
    arch = architecture_of(pipe)
    algo, kwargs = DIT_CASES[case]
    LycorisNetwork.apply_preset({"target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock",
                                                   "JointTransformerBlock"]})
    torch.manual_seed(0)
    net = create_lycoris(pipe.transformer, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **kwargs)
    net.apply_to()
    with torch.no_grad():
        for module in net.loras:
            for name, p in module.named_parameters():
                if name in ("weight", "bias"):
                    p.add_(0.05 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path / f"{family}-{case}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    adapter = read_adapter(path, extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0 and not adapter.coverage.unmapped
    assert len(adapter.modules) == len(net.loras) > 10
    for module in net.loras:
        canonical = "transformer." + module.lora_name.removeprefix("lycoris_")
        got = next(m for n, m in adapter.modules.items() if n.replace(".", "_") == canonical.replace(".", "_"))
        ref = lycoris_delta(module)
        # the reference is lycoris' float32 forward: compare relative to the update's largest entry
        assert np.abs(got.delta() - ref).max() < 2e-5 * np.abs(ref).max(), module.lora_name
