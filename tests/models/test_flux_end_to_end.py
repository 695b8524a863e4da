"""Flux.1 end to end on a tiny random-initialised ``FluxPipeline`` (real diffusers and transformers classes,
small configs, saved with safetensors): family detection and loading, adapters in the namings Flux files
come in (kohya's fused q/k/v with one shared down factor, BFL, XLabs, diffusers) composed into the weights
exactly, a dynamic scan that resumes with the data-free checks, and align (ESD), finetune (the
flow-matching objective on packed latents) and a retraining repair."""

import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as e2e  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline  # noqa: E402

from auditkit.errors import BadInput, Unscannable  # noqa: E402
from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import kohya_name, save_adapter  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.families import FAMILIES, family_of_folder, family_of_pipeline  # noqa: E402
from auditkit.models.pipeline import architecture_of, architecture_of_folder, load_pipeline  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture()
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def arch(folder):
    return architecture_of_folder(folder, "tiny-flux")


# --- loading -------------------------------------------------------------------------------------

def test_load_pipeline_detects_flux_from_model_index(folder, pipe):
    assert family_of_folder(folder) is FAMILIES["flux"]
    assert type(pipe) is diffusers.FluxPipeline and family_of_pipeline(pipe) is FAMILIES["flux"]
    arch = architecture_of(pipe)
    assert {n.split(".", 1)[0] for n in arch.modules} == {"transformer", "text_encoder", "text_encoder_2"}
    assert arch.kohya_prefixes == {"transformer": "lora_transformer_", "text_encoder": "lora_te1_",
                                   "text_encoder_2": "lora_te3_"}
    built = architecture_of_folder(folder)  # from the configs on the meta device, before any weight loads
    assert built.modules == arch.modules and built.original_names == arch.original_names
    from auditkit.models.pipeline import render_options

    # the VAE's sample_size, not Flux's 1024; the T5 length its tokenizer declares (16), not 512
    assert render_options(pipe) == {"height": 32, "width": 32, "max_sequence_length": 16}
    out = pipe("a red cross", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
               **render_options(pipe))
    assert out.images.shape == (1, 32, 32, 3)


def test_a_flux_folder_with_pickle_weights_is_refused_without_unpickling(folder, tmp_path):
    one_pickle = tmp_path / "one"
    shutil.copytree(folder, one_pickle)
    for weights in (one_pickle / "transformer").glob("*.safetensors"):
        weights.unlink()
    (one_pickle / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 never opened")
    with pytest.raises(BadInput, match=r"component 'transformer' has only pickle weights") as err:
        load_pipeline(str(one_pickle))
    assert "\n" not in str(err.value)


# --- the tiny pipeline and the shipped Flux.1 table name modules the same way -------------------

def _pattern(name: str) -> str:
    return re.sub(r"([._])\d+(?=[._]|$)", r"\1N", name)


def test_the_flux_table_and_the_tiny_pipeline_share_one_naming_scheme(arch):
    flux = architectures.get("flux")
    assert arch.kohya_prefixes == flux.kohya_prefixes
    assert {_pattern(n) for n in arch.modules} == {_pattern(n) for n in flux.modules}
    assert {_pattern(n) for n in arch.original_names} == {_pattern(n) for n in flux.original_names}
    assert {_pattern(k) for k in arch.kohya_names} == {_pattern(k) for k in flux.kohya_names}
    assert arch.name == "tiny-flux"  # a custom architecture: the shapes are not Flux.1's
    qkv = arch.fused[arch.originals["double_blocks.1.img_attn.qkv"]]
    assert [(c.rsplit(".", 1)[1], a, b) for c, a, b in qkv] == [("to_q", 0, 16), ("to_k", 0, 16), ("to_v", 0, 16)]


# --- adapters composed exactly: what diffusers adds to the weights is auditkit's ΔW --------------

def bfl_factors(arch, seed=0, scale_up=1.0) -> dict[str, tuple]:
    """Rank-2 (down, up) of every BFL-named module of the transformer, as a kohya or BFL trainer holds
    them: one down factor per module, fused ones included."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(n for n in arch.original_names if formats.is_bfl_name(n)):
        shape = arch.shape(arch.originals[name])
        out[name] = (rng.normal(0, 0.3, (2, shape.in_features)).astype(np.float32),
                     (scale_up * rng.normal(0, 0.3, (shape.out_features, 2))).astype(np.float32))
    return out


def text_encoder_tensors(arch, seed=0) -> dict:
    rng = np.random.default_rng(seed + 100)
    out = {}
    for name in (n for n in arch.modules if n.startswith("text_encoder.") and ".self_attn." in n):
        s, key = arch.modules[name], kohya_name(arch, name)
        out[f"{key}.lora_down.weight"] = rng.normal(0, 0.3, (2, s.in_features)).astype(np.float32)
        out[f"{key}.lora_up.weight"] = rng.normal(0, 0.3, (s.out_features, 2)).astype(np.float32)
        out[f"{key}.alpha"] = np.asarray(1.0, np.float32)
    return out


def write_kohya(arch, path, seed=0, scale_up=1.0, text_encoder=True):
    """sd-scripts' Flux file: lora_unet_<BFL name> with a shared lora_down for fused q/k/v, alpha 1 (scale
    0.5), and the CLIP text encoder under lora_te1_."""
    tensors = {}
    for name, (down, up) in bfl_factors(arch, seed, scale_up).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.asarray(1.0, np.float32)})
    if text_encoder:
        tensors.update(text_encoder_tensors(arch, seed))
    save_file(tensors, str(path), {"ss_base_model_version": "flux1"})
    return path


def write_bfl(arch, path, seed=0):
    tensors = {}
    for name, (down, up) in bfl_factors(arch, seed).items():
        tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    save_file(tensors, str(path))
    return path


def write_xlabs(arch, path, seed=0):
    mods = {n: m for n, m in read_adapter(write_bfl(arch, path, seed), extra_architectures=(arch,)).modules.items()
            if formats.LAYOUTS[formats.XLABS].can_hold(n)}
    return save_adapter(mods, path, arch, formats.XLABS)


def write_diffusers(arch, path, seed=0):
    mods = {n: m for n, m in read_adapter(write_kohya(arch, path, seed), extra_architectures=(arch,)).modules.items()
            if n.startswith("transformer.")}  # diffusers-layout text encoder files: see the SDXL tests (transformers 5)
    return save_adapter(mods, path, arch, formats.DIFFUSERS)


WRITERS = {"kohya": write_kohya, "bfl": write_bfl, "xlabs": write_xlabs, "diffusers": write_diffusers}


def _weights(pipe) -> dict:
    from auditkit.models.architectures import canonical_name
    from auditkit.models.pipeline import lora_components

    out = {}
    for component, model in lora_components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[canonical_name(component, name.replace(".base_layer", ""))] = module.weight.detach().clone()
    return out


@pytest.mark.parametrize("naming", WRITERS)
def test_loaded_adapters_change_the_weights_by_exactly_the_delta(arch, pipe, tmp_path, naming):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    adapter = read_adapter(WRITERS[naming](arch, tmp_path / "cand.safetensors"), extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0
    if naming in ("kohya", "bfl", "diffusers"):  # every transformer module (XLabs: attention only)
        assert {n for n in arch.modules if n.startswith("transformer.")} <= set(adapter.modules)
    before = _weights(pipe)
    coverage = load_adapters(pipe, {"candidate": adapter})["candidate"]
    assert coverage["fraction"] == 1.0 and coverage["loaded"] == len(adapter.modules)
    fused = Fused(pipe)
    fused.apply(Configuration("c@0.5", (("candidate", 0.5),)), ["candidate"])
    after = _weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    untouched = set(before) - set(adapter.modules)
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    fused.restore()
    restored = _weights(pipe)
    assert all(torch.equal(restored[n], before[n]) for n in adapter.modules)


def test_a_t5_adapter_diffusers_does_not_load_fails_closed(arch, pipe, tmp_path):
    from auditkit.models.attach import load_adapters

    rng = np.random.default_rng(0)
    tensors = {}
    for name in (n for n in arch.modules if n.startswith("text_encoder_2.") and ".SelfAttention." in n):
        s, key = arch.modules[name], kohya_name(arch, name)
        tensors[f"{key}.lora_down.weight"] = rng.normal(size=(2, s.in_features)).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(size=(s.out_features, 2)).astype(np.float32)
    save_file(tensors, str(tmp_path / "t5.safetensors"))
    adapter = read_adapter(tmp_path / "t5.safetensors", extra_architectures=(arch,))
    assert adapter.coverage.fraction == 1.0 and all(n.startswith("text_encoder_2.") for n in adapter.modules)
    with pytest.raises(Unscannable, match=r"diffusers applied only 0 of \d+ modules \(0%\) \(diffusers loads none of "
                                          r"text_encoder_2's modules\)"):
        load_adapters(pipe, {"t5": adapter})


# --- the dynamic scan through the library API, resumed ------------------------------------------

SUITE = e2e.suite_yaml("tiny-cross", "concept", ["a red cross", "a blue cross on gray"], guidance=3.5)


def test_a_dynamic_scan_of_a_flux_pipeline_runs_and_resumes(arch, folder, pipe, tmp_path, monkeypatch):
    import auditkit
    from auditkit import runner

    safety = write_kohya(arch, tmp_path / "safety.safetensors", seed=3, text_encoder=False)
    candidate = write_kohya(arch, tmp_path / "candidate.safetensors", seed=3, scale_up=-0.9, text_encoder=False)
    (tmp_path / "tiny.yaml").write_text(SUITE)
    config = auditkit.ScanConfig(candidate=candidate, safety=safety, base=str(folder),
                                 suites=(str(tmp_path / "tiny.yaml"),), multipliers=(1.0,), batch_size=4,
                                 device="cpu", out=tmp_path / "scan")
    first = auditkit.scan(config, pipeline=pipe)
    dyn = first.report["dynamic"]
    assert set(dyn["configurations"]) == {"base", "base+safety", "base+safety+candidate@1", "base+candidate@1"}
    # 4 configurations x 4 images, of the suite as written and of the trigger search's phrase
    assert dyn["images"] == 2 * 16 and dyn["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert dyn["adapter_coverage"]["safety"]["expected"] == len([n for n in arch.modules
                                                                 if n.startswith("transformer.")])
    assert first.report["static"]["cancellation"] == pytest.approx(0.9, abs=1e-4)  # read against the tiny arch
    assert first.verdict.evidence == "behavioural" and "data-free" in first.report["evidence"]["gathered"]
    cc = first.report["concept_check"]  # the candidate is −0.9 × the safety adapter: exactly linear in it
    assert cc["applicable"] and cc["reverted"] == pytest.approx(0.9, abs=1e-6)
    assert cc["noise_reversion"]["prediction"] == "velocity" and 0.5 < cc["noise_reversion"]["reverted"] < 1.3
    assert "change to the transformer's velocity prediction" in (tmp_path / "scan" / "report.html").read_text()
    records = [json.loads(line) for line in (tmp_path / "scan" / "run.jsonl").read_text().splitlines()[1:]]
    assert {r["config"] for r in records} == set(dyn["configurations"]) and len(records) == 2 * 16
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scan").rglob("*.png")}
    assert len(stamps) == 2 * 16
    from PIL import Image

    assert all(Image.open(p).size == (32, 32) for p in stamps)

    calls = []
    monkeypatch.setattr(runner, "_render_batch", lambda *a, **k: calls.append(a) or pytest.fail("rendered again"))
    second = auditkit.scan(config, pipeline=pipe)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert second.report["dynamic"]["suites"] == dyn["suites"] and second.report["reasons"] == first.report["reasons"]
    assert second.verdict == first.verdict
    assert not any(hasattr(m, "lora_A") for m in pipe.transformer.modules()), "the scan leaves the pipeline as it came"


# --- training (align, finetune, repair) and the data-free checks ----------------------------------

def test_flux_conditioning_is_the_pipelines_own(pipe):
    from auditkit.models.pipeline import encode

    cond = encode(pipe, ["a red cross", "a blue cross"])
    with torch.no_grad():  # at the T5 length renders use: the tokenizer's 16 here (512 for Flux.1's)
        embeds, pooled, text_ids = pipe.encode_prompt(["a red cross", "a blue cross"], device="cpu",
                                                      max_sequence_length=16)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.added["pooled_projections"], pooled)
    assert set(cond[np.array([1, 0, 1])].kwargs()) == {"encoder_hidden_states", "pooled_projections"}
    (tokenizer, ids), = cond.tokens  # T5's tokens are the sequence (CLIP only pools)
    assert tokenizer is pipe.tokenizer_2 and ids.shape == embeds.shape[:2] == (2, 16)


def flux_reference(pipe, x, t, prompts, guidance=3.5):
    """The transformer called on latents x as FluxPipeline calls it and diffusers' Flux DreamBooth script
    unpacks it: packed 2×2 patches, image ids, the pipeline's text ids, timestep / 1000, the guidance."""
    b, c, h, w = x.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=16)
    out = pipe.transformer(hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=t.expand(b) / 1000,
                           guidance=torch.full((b,), guidance), pooled_projections=pooled, encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                           return_dict=False)[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def test_the_denoiser_call_is_the_pipelines(pipe):
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    assert den.latent_shape() == (4, 16, 16) and den.image_size() == 32 and den.prediction == "velocity"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    with torch.no_grad():
        ours = den.predict(x, t, encode(pipe, ["a red cross", "a blue cross"]))
        theirs = flux_reference(pipe, x, t, ["a red cross", "a blue cross"])
        other = flux_reference(pipe, x, t, ["a red cross", "a blue cross"], guidance=1.0)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, other), "the guidance input reaches the transformer"


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A 5-step ESD-x safety adapter of the tiny Flux pipeline and an image-caption folder."""
    tmp = tmp_path_factory.mktemp("flux-train")
    pipe = load_pipeline(str(folder))
    return e2e.check_align(pipe, tmp / "safety.safetensors", TEXT_PROJECTIONS), e2e.image_caption_folder(tmp / "data")


TEXT_PROJECTIONS = (".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out")


def test_align_trains_the_joint_attentions_text_projections(pipe, trained):
    safety, _ = trained  # check_align asserted the rest when it trained it
    adapter = read_adapter(safety, extra_architectures=(architecture_of(pipe),))
    assert {n.rsplit(".", 1)[1] for n in adapter.modules} == {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert all(n.startswith("transformer.transformer_blocks.") for n in adapter.modules)  # the double-stream blocks


@pytest.mark.parametrize("mode", ["on-top", "modular"])
def test_finetune_trains_a_lora_on_flux(pipe, trained, mode):
    safety, data = trained
    e2e.check_finetune(pipe, data, safety, mode)


def test_finetune_minimises_the_flow_matching_loss_on_packed_latents(pipe, trained):
    e2e.check_first_flow_matching_loss(pipe, trained[1], lambda gen: torch.rand((2,), generator=gen), flux_reference)


def test_the_data_free_checks_give_numbers_on_flux(pipe, trained):
    safety = read_adapter(trained[0], extra_architectures=(architecture_of(pipe),)).modules
    e2e.check_data_free(pipe, safety, "velocity", "transformer")


def test_a_modular_repair_of_a_flux_candidate_retrains_and_rescans(folder, pipe, trained, tmp_path):
    safety, data = trained
    candidate = e2e.check_finetune(pipe, data, safety, "on-top").modules
    e2e.check_modular_repair(folder, pipe, safety, candidate, data, tmp_path)


def test_a_corrected_repair_trains_on_the_flux_transformer(pipe, trained):
    safety, data = trained
    candidate = e2e.check_finetune(pipe, data, safety, "on-top").modules
    e2e.check_correction(pipe, safety, candidate, data)
