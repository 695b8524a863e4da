"""What only SDXL does, on a tiny random-initialised ``StableDiffusionXLPipeline`` (tests/tiny_pipelines.py):
kohya's SGM block names, adapters in the namings SDXL files come in read exactly as diffusers converts and
applies them (both text encoders included), files diffusers refuses or loads in part, pickle weights refused,
and the pipeline's own conditioning. Loading, the dynamic scan, the data-free checks, align, finetune and repair
are the family contract's (tests/models/test_family_contract.py)."""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import random_modules  # noqa: E402
from tiny_pipelines import lora_weights, tiny_sdxl_pipeline  # noqa: E402

from auditkit.errors import BadInput, Unscannable  # noqa: E402
from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402
from auditkit.lora.io import serialize  # noqa: E402
from auditkit.lora.write import kohya_name, save_adapter, to_state_dict  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.pipeline import architecture_of_folder, encode, load_pipeline  # noqa: E402

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

def test_the_sdxl_table_and_the_tiny_pipeline_name_sgm_blocks_alike(arch):
    sdxl = architectures.get("sdxl")  # (the naming scheme as a whole: the family contract)
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


# diffusers (0.42) strips "text_model." from a text encoder's keys when the model has no such level
# (transformers 5's CLIPTextModel) but not from the target_modules of a file's lora_adapter_metadata, so
# peft finds none of them: diffusers/peft files adapting the first text encoder do not load (see below).
# auditkit then loads its exact conversion instead (auditkit.models.attach.load_adapters), as it does for the
# two add_embedding modules diffusers drops from kohya files with diffusers-style names.
# (a diffusers file of every module: the family contract)
LOADABLE = {"kohya-sgm": "file", "kohya-diffusers-names": "auditkit conversion"}


@pytest.mark.parametrize("layout", LOADABLE)
def test_loaded_adapters_change_the_weights_by_exactly_the_delta(arch, pipe, tmp_path, layout):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    write, _ = LAYOUTS[layout]
    mods = sdxl_modules(arch, seed=1)
    adapter = read_adapter(write(mods, arch, tmp_path / "cand.safetensors"), extra_architectures=(arch,))
    before = lora_weights(pipe)
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
    after = lora_weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).flatten(1).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert any(n.startswith("text_encoder_2.") for n in adapter.modules)
    fused.restore()
    restored = lora_weights(pipe)
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


# --- the pipeline's own conditioning ------------------------------------------------------------

def test_sdxl_conditioning_is_the_pipelines_own(pipe):
    cond = encode(pipe, ["a red cross", "a blue cross"])
    embeds, _, pooled, _ = pipe.encode_prompt(["a red cross", "a blue cross"], device="cpu",
                                              do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.added["text_embeds"], pooled)
    assert cond.hidden.shape[-1] == 40 and cond.added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    picked = cond[np.array([1, 1, 0])]
    assert torch.equal(picked.hidden[2], embeds[0]) and picked.added["text_embeds"].shape == (3, 24)
    x = torch.zeros(3, 4, 16, 16)
    assert pipe.unet(x, 10, **picked.kwargs()).sample.shape == x.shape
