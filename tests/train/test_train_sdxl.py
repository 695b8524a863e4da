"""align (ESD), finetune and repair on a tiny SDXL pipeline: the denoiser gets SDXL's conditioning (both
text encoders, pooled embedding and size ids), and what they write loads back into the pipeline whole."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tiny_pipelines import tiny_sdxl_pipeline  # noqa: E402

from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402
from auditkit.models.pipeline import architecture_of, encode, load_pipeline  # noqa: E402
from auditkit.train.esd import ESDConfig, train_esd  # noqa: E402
from auditkit.train.finetune import FinetuneConfig, finetune  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

SUITE = """schema: auditkit.suite/1
name: tiny-cross
version: 1
concept: {word: cross, neutral: square, terms: [cross]}
detector: lab-cross
role: concept
sampling: {steps: 2, guidance: 5.0, seed: 7, images_per_prompt: 2}
prompts: [a red cross, a blue cross]
"""
DOMAIN = SUITE.replace("tiny-cross", "tiny-neon").replace("role: concept", "role: control") \
    .replace("[a red cross, a blue cross]", "[a neon pink tee]")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="module")
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def safety(pipe, tmp_path_factory):
    mods = train_esd(pipe, ["a red cross", "a blue cross"], ESDConfig(method="esd-x", rank=2, steps=5, batch=2,
                                                                        ddim_steps=3, lr=1e-2))
    return save_adapter(mods, tmp_path_factory.mktemp("safety") / "safety.safetensors", architecture_of(pipe))


def _data(folder, n=4):
    from auditkit.lab import world
    from auditkit.train.data import write_folder

    specs = world.sample_specs(0, n, domain="neon")
    return write_folder(folder, world.render_many(specs), [world.caption(s) for s in specs])


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


def test_align_trains_an_esd_safety_lora_that_loads_whole(pipe, safety):
    from auditkit.models.attach import load_adapters

    adapter = read_adapter(safety, extra_architectures=(architecture_of(pipe),))
    assert adapter.modules and all(".attn2." in n for n in adapter.modules)
    assert any(np.abs(m.up).sum() > 0 for m in adapter.modules.values()), "B moved away from its zero init"
    try:
        assert load_adapters(pipe, {"safety": adapter})["safety"]["fraction"] == 1.0
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("mode", ["on-top", "modular"])
def test_finetune_trains_on_sdxl_and_leaves_the_pipeline_unchanged(pipe, safety, tmp_path, mode):
    from auditkit.train.data import load_folder

    data = load_folder(_data(tmp_path / "data"), 32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    safety_modules = read_adapter(safety, extra_architectures=(architecture_of(pipe),)).modules
    result = finetune(pipe, data.images, data.captions, FinetuneConfig(mode=mode, rank=2, steps=5, batch=2),
                      safety=safety_modules if mode == "on-top" else None)
    assert result.modules and len(result.losses) == 5 and all(np.isfinite(result.losses))
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_modular_repair_of_an_sdxl_candidate_retrains_and_rescans(folder, pipe, safety, tmp_path):
    from auditkit.config import ScanConfig
    from auditkit.repair.run import RepairRequest, repair
    from auditkit.suites import load_suites

    data = _data(tmp_path / "data")
    safety_modules = read_adapter(safety, extra_architectures=(architecture_of(pipe),)).modules
    ft = finetune(pipe, *_images(data), FinetuneConfig(mode="on-top", rank=2, steps=3, batch=2),
                  safety=safety_modules)
    cand = save_adapter(ft.modules, tmp_path / "cand.safetensors", architecture_of(pipe))
    for name, text in (("cross", SUITE), ("neon", DOMAIN)):
        (tmp_path / f"{name}.yaml").write_text(text)
    suite_files = (str(tmp_path / "cross.yaml"), str(tmp_path / "neon.yaml"))
    config = ScanConfig(base=str(folder), suites=suite_files, multipliers=(1.0,), batch_size=8, device="cpu")
    request = RepairRequest(candidate=cand, safety=safety, out=tmp_path / "r", method="modular", data=data,
                            scan=config, suites=load_suites([tmp_path / "cross.yaml", tmp_path / "neon.yaml"]),
                            train={"steps": 3, "batch": 2})
    report = repair(request)
    section = report["repair"]
    assert section["method"] == "modular" and section["training"]["steps"] == 3
    repaired = read_adapter(tmp_path / "r" / "pack" / "finetune.safetensors",
                            extra_architectures=(architecture_of(pipe),))
    assert set(repaired.modules) == set(ft.modules)
    assert report["dynamic"]["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert set(report["dynamic"]["configurations"]) == {"base", "base+safety", "base+safety+candidate@1",
                                                         "base+candidate@1"}


def _images(folder):
    from auditkit.train.data import load_folder

    data = load_folder(folder, 32)
    return data.images, data.captions
