"""SDXL end to end on a tiny random-initialised ``StableDiffusionXLPipeline`` (real diffusers and
transformers classes, small configs, saved with safetensors): family detection and loading, adapters in
the layouts SDXL files come in read exactly as diffusers converts and applies them (both text encoders
included), a dynamic scan that resumes, and the data-free checks (align, finetune and repair:
tests/train/test_train_sdxl.py)."""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as e2e  # noqa: E402
from conftest import random_modules  # noqa: E402
from tiny_pipelines import tiny_sdxl_pipeline  # noqa: E402

from auditkit.errors import BadInput, Unscannable  # noqa: E402
from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402
from auditkit.lora.io import serialize  # noqa: E402
from auditkit.lora.write import kohya_name, save_adapter, to_state_dict  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.families import FAMILIES, family_of_folder, family_of_pipeline  # noqa: E402
from auditkit.models.pipeline import architecture_of, architecture_of_folder, load_pipeline  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture()
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def arch(folder):
    return architecture_of_folder(folder, "tiny-sdxl")


# --- loading -------------------------------------------------------------------------------------

def test_load_pipeline_detects_sdxl_from_model_index(folder, pipe):
    assert family_of_folder(folder) is FAMILIES["sdxl"]
    assert type(pipe) is diffusers.StableDiffusionXLPipeline and family_of_pipeline(pipe) is FAMILIES["sdxl"]
    arch = architecture_of(pipe)
    components = {n.split(".", 1)[0] for n in arch.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    assert arch.kohya_prefixes == {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    # the architecture built from the folder's configs on the meta device (what adapters are read
    # against before the weights load) is the loaded pipeline's
    assert architecture_of_folder(folder).modules == arch.modules
    out = pipe("a red cross", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def _one_line_bad_input(path, match):
    with pytest.raises(BadInput, match=match) as err:
        load_pipeline(str(path))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_sdxl_folder_with_pickle_weights_is_refused_without_unpickling(folder, tmp_path):
    only_pickles = tmp_path / "pickles"
    shutil.copytree(folder, only_pickles)
    for weights in only_pickles.glob("*/*.safetensors"):
        weights.with_suffix(".bin").write_bytes(b"\x80\x04 not a pickle auditkit would ever open")
        weights.unlink()
    assert "pickle" in _one_line_bad_input(only_pickles, "no .safetensors weights")

    one_pickle = tmp_path / "one"  # text_encoder_2 saved as a pickle, the rest as safetensors
    shutil.copytree(folder, one_pickle)
    (one_pickle / "text_encoder_2" / "model.safetensors").unlink()
    (one_pickle / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"\x80\x04 never opened")
    _one_line_bad_input(one_pickle, r"component 'text_encoder_2' has only pickle weights \(text_encoder_2/pytorch_m")


def test_a_pipeline_class_of_no_known_family_is_refused(folder, tmp_path):
    other = tmp_path / "pixart"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    message = _one_line_bad_input(other, "pipeline class 'PixArtAlphaPipeline' is not supported")
    assert "StableDiffusionXLPipeline" in message and "StableDiffusionPipeline" in message


# --- the shipped SDXL table and the tiny pipeline name modules the same way ---------------------

def _pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def test_the_sdxl_table_and_the_tiny_pipeline_share_one_naming_scheme(arch):
    sdxl = architectures.get("sdxl")
    assert arch.kohya_prefixes == sdxl.kohya_prefixes
    assert {_pattern(n) for n in arch.modules} == {_pattern(n) for n in sdxl.modules}
    # kohya names, SGM block names included: the same patterns (every block index abstracted)
    kohya = {re.sub(r"_\d+(?=_|$)", "_N", k) for k in arch.kohya_names}
    assert kohya == {re.sub(r"_\d+(?=_|$)", "_N", k) for k in sdxl.kohya_names}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in arch.kohya_names  # SDXL's first attention
    assert arch.kohya_names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        sdxl.kohya_names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    # the tiny model is a custom architecture: its shapes are not SDXL's (cross-attention reads 16 + 24)
    assert arch.name == "tiny-sdxl"
    assert arch.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 40


# --- adapters: auditkit's ΔW is diffusers' ΔW, and what diffusers adds to the weights ------------

# diffusers converts kohya files to its legacy attention-processor names; back to module paths
_DIFFUSERS_NAMES = (
    (re.compile(r"\.processor\.to_(q|k|v)_lora$"), lambda m: f".to_{m.group(1)}"),
    (re.compile(r"\.processor\.to_out_lora$"), lambda m: ".to_out.0"),
    (re.compile(r"\.self_attn\.to_(q|k|v)_lora$"), lambda m: f".self_attn.{m.group(1)}_proj"),
    (re.compile(r"\.self_attn\.to_out_lora$"), lambda m: ".self_attn.out_proj"),
)
_DOWN = re.compile(r"^(.+?)\.(lora\.down|lora_linear_layer\.down|down|lora_A)\.weight$")


def diffusers_deltas(path, unet_config) -> dict[str, np.ndarray]:
    """Module -> dense ΔW = scale·B·A from ``StableDiffusionXLPipeline.lora_state_dict`` (diffusers' own
    reading and conversion of the file); the scale is the converted alpha / rank, or, for diffusers/peft
    files, the adapter metadata's lora_alpha / r of the module's component."""
    state, alphas, meta = diffusers.StableDiffusionXLPipeline.lora_state_dict(
        str(path), unet_config=unet_config, return_lora_metadata=True)
    out = {}
    for key, down in state.items():
        m = _DOWN.match(key)
        if not m:
            continue
        module, part = m.group(1), m.group(2)
        up = state[key.replace(f".{part}.weight", f".{part.replace('down', 'up').replace('_A', '_B')}.weight")]
        rank = down.shape[0]
        if alphas:
            alpha = alphas.get(f"{key}.alpha", alphas.get(f"{module.removesuffix('.lora_linear_layer')}.alpha"))
            scale = float(alpha) / rank
        else:
            component = module.split(".", 1)[0]
            assert not meta[f"{component}.alpha_pattern"] and not meta[f"{component}.rank_pattern"]
            scale = meta[f"{component}.lora_alpha"] / meta[f"{component}.r"]
        for pattern, repl in _DIFFUSERS_NAMES:
            module = pattern.sub(repl, module)
        out[module] = scale * (up.double().flatten(1) @ down.double().flatten(1)).numpy()
    return out


def sdxl_modules(arch, seed=0) -> dict[str, LoraModule]:
    """A rank-2 update of every module of the architecture; the text encoders at another scale."""
    mods = random_modules(arch, list(arch.modules), rank=2, scale=0.5, std=0.2, seed=seed)
    return {n: LoraModule(n, m.down, m.up, 0.25 if n.startswith("text_encoder") else m.scale)
            for n, m in mods.items()}


def write_kohya(mods, arch, path, sgm: bool | None) -> object:
    """A kohya file; ``sgm``: UNet modules under SGM block names (as kohya writes SDXL), diffusers
    module paths (False), or alternating, module by module (None)."""
    tensors, _ = to_state_dict(mods, arch, formats.KOHYA)
    renamed = {}
    for i, name in enumerate(mods):
        plain = kohya_name(arch, name, sgm=False)
        target = kohya_name(arch, name, sgm=(i % 2 == 0) if sgm is None else sgm)
        for key in (k for k in tensors if k.split(".", 1)[0] == plain):
            renamed[target + key[len(plain):]] = tensors[key]
    path.write_bytes(serialize(renamed))
    return path


# diffusers (0.42) turns kohya's diffusers-style name lora_unet_add_embedding_linear_N into
# "add.embedding.linear" (its SDXL "emb" index heuristic), a module that does not exist: those two modules
# are dropped without a warning. SGM names (label_emb_0_N) convert correctly.
ADD_EMBEDDING = {"unet.add_embedding.linear_1", "unet.add_embedding.linear_2"}
LAYOUTS = {
    "kohya-sgm": (lambda mods, arch, p: write_kohya(mods, arch, p, sgm=True), set()),
    "kohya-diffusers-names": (lambda mods, arch, p: write_kohya(mods, arch, p, sgm=False), ADD_EMBEDDING),
    "diffusers": (lambda mods, arch, p: save_adapter(mods, p, arch, formats.DIFFUSERS), set()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_auditkit_reads_the_delta_diffusers_converts(arch, folder, tmp_path, layout):
    write, dropped_by_diffusers = LAYOUTS[layout]
    mods = sdxl_modules(arch)
    path = write(mods, arch, tmp_path / f"{layout}.safetensors")
    adapter = read_adapter(path, extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0 and set(adapter.modules) == set(mods)
    unet_config = SimpleNamespace(**diffusers.UNet2DConditionModel.load_config(folder / "unet"))
    theirs = diffusers_deltas(path, unet_config)
    assert set(adapter.modules) - set(theirs) == dropped_by_diffusers
    assert {n.split(".", 1)[0] for n in theirs} >= {"unet", "text_encoder", "text_encoder_2"}
    for name in set(adapter.modules) - dropped_by_diffusers:
        np.testing.assert_allclose(adapter.modules[name].delta(), theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(adapter.modules[name].delta(), mods[name].delta(), rtol=1e-5, atol=1e-7)


def _weights(pipe) -> dict:
    from auditkit.models.architectures import canonical_name
    from auditkit.models.pipeline import lora_components

    out = {}
    for component, model in lora_components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                out[canonical_name(component, name.replace(".base_layer", ""))] = module.weight.detach().clone()
    return out


# diffusers (0.42) strips "text_model." from a text encoder's keys when the model has no such level
# (transformers 5's CLIPTextModel) but not from the target_modules of a file's lora_adapter_metadata, so
# peft finds none of them: diffusers/peft files adapting the first text encoder do not load (see below).
# auditkit then loads its exact conversion instead (auditkit.models.attach.load_adapters), as it does for the
# two add_embedding modules diffusers drops from kohya files with diffusers-style names.
LOADABLE = {"kohya-sgm": "file", "diffusers": "auditkit conversion", "kohya-diffusers-names": "auditkit conversion"}


@pytest.mark.parametrize("layout", LOADABLE)
def test_loaded_adapters_change_the_weights_by_exactly_the_delta(arch, pipe, tmp_path, layout):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    write, _ = LAYOUTS[layout]
    mods = sdxl_modules(arch, seed=1)
    adapter = read_adapter(write(mods, arch, tmp_path / "cand.safetensors"), extra_architectures=(arch,))
    before = _weights(pipe)
    coverage = load_adapters(pipe, {"candidate": adapter})["candidate"]
    source = LOADABLE[layout]
    if source != "file" and layout == "diffusers" and hasattr(pipe.text_encoder, "text_model"):
        source = "file"  # transformers 4: diffusers loads it as it is
    assert {k: coverage[k] for k in ("expected", "loaded", "fraction", "missing", "source")} == {
        "expected": len(mods), "loaded": len(mods), "fraction": 1.0, "missing": [], "source": source}
    # a conversion carries no alphas: peft's default scales are set to the file's ones (checked below)
    assert coverage["scales_corrected"] == 0 or source != "file"
    assert ("note" in coverage) == (source != "file")
    fused = Fused(pipe)
    fused.apply(Configuration("c@0.5", (("candidate", 0.5),)), ["candidate"])
    after = _weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).flatten(1).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert any(n.startswith("text_encoder_2.") for n in adapter.modules)
    fused.restore()
    restored = _weights(pipe)
    assert all(torch.equal(restored[n], before[n]) for n in adapter.modules)


def test_a_file_diffusers_refuses_or_loads_in_part_is_loaded_as_the_exact_conversion(arch, pipe, tmp_path):
    """diffusers/peft files adapting the first text encoder (transformers 5) and kohya files mixing SGM
    and diffusers names (diffusers keeps one naming, drops the other without a warning)."""
    from auditkit.models.attach import load_adapters

    te1 = {n: m for n, m in sdxl_modules(arch).items() if n.startswith("text_encoder.")}
    refused = read_adapter(save_adapter(te1, tmp_path / "te1.safetensors", arch, formats.DIFFUSERS),
                           extra_architectures=(arch,))
    mixed_mods = sdxl_modules(arch, seed=2)
    mixed = read_adapter(write_kohya(mixed_mods, arch, tmp_path / "mixed.safetensors", sgm=None),
                         extra_architectures=(arch,))
    assert mixed.coverage.fraction == 1.0 and len(mixed.modules) == len(mixed_mods)
    for role, adapter, why in (("te1", refused, "diffusers refused the file (NoMatchingPeftModuleError"),
                               ("mixed", mixed, "diffusers applied ")):
        coverage = load_adapters(pipe, {role: adapter})[role]
        pipe.unload_lora_weights()
        assert coverage["fraction"] == 1.0 and coverage["missing"] == []
        if role == "te1" and hasattr(pipe.text_encoder, "text_model"):  # transformers 4: the names match
            assert coverage["source"] == "file"
            continue
        assert coverage["source"] == "auditkit conversion" and coverage["note"].startswith(why), coverage


def test_an_adapter_diffusers_cannot_apply_even_converted_fails_closed_in_one_line(arch, pipe, tmp_path,
                                                                                  monkeypatch):
    from auditkit.models import attach

    mods = sdxl_modules(arch, seed=3)
    adapter = read_adapter(write_kohya(mods, arch, tmp_path / "cand.safetensors", sgm=True),
                           extra_architectures=(arch,))
    lost = sorted(mods)[:5]
    real = attach.lora_layers
    sources = []
    real_load = attach._load

    def load(pipe, role, source):
        sources.append("file" if isinstance(source, str) else "conversion")
        return real_load(pipe, role, source)

    # as if diffusers dropped five modules from the file and from auditkit's conversion alike
    monkeypatch.setattr(attach, "lora_layers", lambda p, roles: {k: v for k, v in real(p, roles).items()
                                                                  if k not in lost})
    monkeypatch.setattr(attach, "_load", load)
    with pytest.raises(Unscannable, match=rf"diffusers applied only {len(mods) - 5} of {len(mods)} modules "
                                          rf"\(\d+%\) \(missing: {re.escape(lost[0])}, .*, …\)") as err:
        attach.load_adapters(pipe, {"lossy": adapter}, min_coverage=1.0)
    assert "\n" not in str(err.value) and sources == ["file", "conversion"]
    pipe.unload_lora_weights()
    coverage = attach.load_adapters(pipe, {"lossy": adapter}, min_coverage=0.9)["lossy"]
    assert coverage["missing"] == lost and coverage["loaded"] == len(mods) - 5
    pipe.unload_lora_weights()


# --- the dynamic scan through the library API, resumed ------------------------------------------

SUITE = """schema: auditkit.suite/1
name: tiny-cross
version: 1
concept: {word: cross, neutral: square, terms: [cross]}
detector: lab-cross
role: concept
sampling: {steps: 2, guidance: 5.0, seed: 7, images_per_prompt: 2}
prompts:
  - a red cross
  - a blue cross on gray
"""


def test_a_dynamic_scan_of_an_sdxl_pipeline_runs_and_resumes(arch, folder, pipe, tmp_path, monkeypatch):
    import auditkit
    from auditkit import runner

    safety_mods = {n: m for n, m in sdxl_modules(arch, seed=3).items()
                   if ".attn2.to_k" in n or ".attn2.to_v" in n or n.startswith("text_encoder_2.")}
    safety = write_kohya(safety_mods, arch, tmp_path / "safety.safetensors", sgm=True)
    undo = {n: LoraModule(n, m.down, -0.9 * m.up, m.scale) for n, m in safety_mods.items()}
    candidate = write_kohya(undo, arch, tmp_path / "candidate.safetensors", sgm=True)
    (tmp_path / "tiny.yaml").write_text(SUITE)
    config = auditkit.ScanConfig(candidate=candidate, safety=safety, base=str(folder),
                                 suites=(str(tmp_path / "tiny.yaml"),), multipliers=(1.0,), batch_size=4,
                                 device="cpu", out=tmp_path / "scan")
    first = auditkit.scan(config, pipeline=pipe)
    dyn = first.report["dynamic"]
    assert set(dyn["configurations"]) == {"base", "base+safety", "base+safety+candidate@1", "base+candidate@1"}
    # 4 configurations x 4 images, of the suite as written and of the trigger search's phrase
    assert dyn["images"] == 2 * 16 and dyn["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert dyn["adapter_coverage"]["safety"]["expected"] == len(safety_mods)
    assert first.report["static"]["cancellation"] == pytest.approx(0.9, abs=1e-4)  # read against the tiny arch
    assert first.verdict.evidence == "behavioural" and "data-free" in first.report["evidence"]["gathered"]
    # the candidate is −0.9 × the safety adapter: exactly linear in it at the keys/values, but both change
    # text_encoder_2 too, and each model's keys/values are computed from its own encoder's (nonlinear) output
    cc = first.report["concept_check"]
    assert cc["applicable"] and cc["reverted"] == pytest.approx(0.9, abs=5e-3) and abs(cc["reverted"] - 0.9) > 1e-5
    assert cc["noise_reversion"]["prediction"] == "noise" and 0.5 < cc["noise_reversion"]["reverted"] < 1.3
    records = [json.loads(line) for line in (tmp_path / "scan" / "run.jsonl").read_text().splitlines()[1:]]
    assert {r["config"] for r in records} == set(dyn["configurations"]) and len(records) == 2 * 16
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scan").rglob("*.png")}
    assert len(stamps) == 2 * 16

    calls = []
    monkeypatch.setattr(runner, "_render_batch", lambda *a, **k: calls.append(a) or pytest.fail("rendered again"))
    second = auditkit.scan(config, pipeline=pipe)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert second.report["dynamic"]["suites"] == dyn["suites"] and second.report["reasons"] == first.report["reasons"]
    assert second.verdict == first.verdict
    assert not any(hasattr(m, "lora_A") for m in pipe.unet.modules()), "the scan leaves the pipeline as it came"


# --- the data-free checks ------------------------------------------------------------------------

def test_the_data_free_checks_give_numbers_on_sdxl(arch, pipe):
    """Cross-attention keys/values read both text encoders' concatenated states (16 + 24 wide); the noise
    prediction is the UNet's with SDXL's added conditioning."""
    safety = {n: m for n, m in sdxl_modules(arch, seed=4).items() if ".attn2.to_" in n or ".attn1.to_q" in n}
    assert any(n.endswith(".attn2.to_k") for n in safety)
    e2e.check_data_free(pipe, safety, "noise", "UNet")
