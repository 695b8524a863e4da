"""The contract every model family with a tiny pipeline keeps, end to end on a tiny random-initialised pipeline of
it (real diffusers and transformers classes, small configs, saved with safetensors: tests/tiny_pipelines.py):
family detection and loading, the shipped table's naming scheme, adapters written in the layouts the family reads
composed into the weights exactly, a dynamic scan that resumes with the data-free checks, and align (ESD),
finetune and repair (retraining and corrected).

A family is one :class:`Case` in :data:`CASES`; what only one family does (kohya's SGM names for SDXL, the
original SAI/BFL names, the pipelines' own conditioning and denoiser calls, T5 adapters) is tested in
``tests/models/test_<family>.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as e2e  # noqa: E402
from conftest import random_modules  # noqa: E402

from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.families import FAMILIES, family_of_folder, family_of_pipeline  # noqa: E402
from auditkit.models.pipeline import (  # noqa: E402
    architecture_of,
    architecture_of_folder,
    denoiser_for,
    load_pipeline,
    render_options,
)

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

MMDIT_TEXT_PROJECTIONS = (".attn.add_q_proj", ".attn.add_k_proj", ".attn.add_v_proj", ".attn.to_add_out")
# a single-stream DiT's attention (Z-Image: ESD-x trains its text-only context refiner's)
ATTENTION = (".attention.to_q", ".attention.to_k", ".attention.to_v", ".attention.to_out.0")


@dataclass(frozen=True)
class Case:
    """One family's tiny pipeline and what the contract expects of it."""

    build: Callable  # (folder) -> folder: tests/tiny_pipelines.py
    table: str  # the shipped architecture table whose naming scheme the tiny pipeline shares
    kohya_prefixes: dict  # the architecture's kohya prefixes (component -> prefix)
    text_adapted: tuple[str, ...]  # text encoders whose adapters diffusers loads (beside the denoiser)
    prediction: str  # what the denoiser predicts: noise or velocity
    label: str  # the denoiser as reports name it
    guidance: float  # the suites' guidance
    text_modules: tuple[str, ...]  # what ESD-x trains: the modules that read the prompt
    frozen: tuple[str, ...] = ()  # modules ESD-x holds whose output the model drops (B stays zero)
    finetune_frozen: tuple[str, ...] = ()  # ... and such modules the fine-tune also holds (beside ``frozen``)
    # modules the data-free checks' random safety update changes besides those that read the prompt
    data_free_extra: tuple[str, ...] = ()
    image_size: int = 32
    # how far from 1 the base judge may read the safety adapter's exact inverse: float32 noise of the composed
    # inverse against the gap between the base's and the safe model's scores
    judge_tolerance: float = 1e-3
    frames: int = 0  # a video family: the frames of each clip the detectors score (its PNG is their strip)
    edits: bool = False  # an edit pipeline: the scan's suite names an input image (a lab image)


FLUX_PREFIXES = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}

CASES = {
    "sdxl": Case(e2e.tiny_sdxl_pipeline, "sdxl", {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                 ("text_encoder", "text_encoder_2"), "noise", "UNet", 5.0,
                 (".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0"), data_free_extra=(".attn1.to_q",)),
    "sd3": Case(e2e.tiny_sd3_pipeline, "sd35-medium",
                {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_",
                 "text_encoder_3": "lora_te3_"}, (), "velocity", "transformer", 5.0, MMDIT_TEXT_PROJECTIONS,
                # the last block is context-pre-only: the model drops the text tokens' output, so their queries
                # get no gradient
                ("transformer.transformer_blocks.1.attn.add_q_proj",)),
    "flux": Case(e2e.tiny_flux_pipeline, "flux", FLUX_PREFIXES, ("text_encoder",), "velocity", "transformer", 3.5,
                 MMDIT_TEXT_PROJECTIONS),
    "flux-kontext": Case(e2e.tiny_kontext_pipeline, "flux-kontext", FLUX_PREFIXES, ("text_encoder",), "velocity",
                         "transformer", 3.5, MMDIT_TEXT_PROJECTIONS, edits=True),
    "chroma": Case(e2e.tiny_chroma_pipeline, "chroma", {"transformer": "lora_transformer_"}, (), "velocity",
                   "transformer", 4.0, MMDIT_TEXT_PROJECTIONS),
    "qwen-image": Case(e2e.tiny_qwen_image_pipeline, "qwen-image", {"transformer": "lora_transformer_"}, (),
                       "velocity", "transformer", 4.0, MMDIT_TEXT_PROJECTIONS,
                       # only the image stream leaves the last block: its text queries and output get no gradient
                       ("transformer.transformer_blocks.1.attn.add_q_proj",
                        "transformer.transformer_blocks.1.attn.to_add_out"),
                       finetune_frozen=("transformer.transformer_blocks.1.txt_mlp.net.0.proj",
                                        "transformer.transformer_blocks.1.txt_mlp.net.2"),
                       # the text projections alone move the tiny model's prediction by under 1%: the base judge's
                       # scores of base and safe model would differ by little more than float32 noise
                       data_free_extra=(".attn.to_q", ".img_mlp.net.2")),
    "flux2": Case(e2e.tiny_flux2_klein_pipeline, "flux2-klein-4b", {"transformer": "lora_transformer_"}, (),
                  "velocity", "transformer", 4.0, MMDIT_TEXT_PROJECTIONS,
                  # the tiny Flux.2's mean judge scores (0.022) are a difference of per-sample scores of ±0.16 that
                  # move ~1e-4 per 1e-6 of the final latents: base and safe means ~9e-5 apart, the composed inverse's
                  # float32 residue ~1.5e-5 from the base (measured: 1.18). Loose: see the report of issue 25 §2
                  judge_tolerance=0.25),
    "wan": Case(e2e.tiny_wan_pipeline, "wan21-1.3b", {"transformer": "lora_transformer_"}, (), "velocity",
                "transformer", 5.0, (".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0"), frames=4),
    "z-image": Case(e2e.tiny_z_image_pipeline, "z-image", {"transformer": "lora_transformer_"}, (), "velocity",
                    "transformer", 4.0, ATTENTION),
    "hunyuanvideo15": Case(e2e.tiny_hunyuanvideo15_pipeline, "hunyuanvideo15", {"transformer": "lora_transformer_"},
                           (), "velocity", "transformer", 6.0, MMDIT_TEXT_PROJECTIONS,
                           # the text stream leaves the last block unread: its text queries and output get no gradient
                           ("transformer.transformer_blocks.1.attn.add_q_proj",
                            "transformer.transformer_blocks.1.attn.to_add_out"),
                           finetune_frozen=("transformer.transformer_blocks.1.ff_context.net.0.proj",
                                            "transformer.transformer_blocks.1.ff_context.net.2"),
                           # the text projections alone move the base judge's mean score (3.2e-3) by 3e-5, the
                           # composed inverse's float32 residue by 8e-6 (judged 1.26; exactly 1.0 with the pipeline
                           # in float64); with the attention outputs too, base and safe are 8.3e-4 apart: 0.9987
                           data_free_extra=(".attn.to_out.0",), judge_tolerance=0.02, frames=4),
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def case(family) -> Case:
    return CASES[family]


@pytest.fixture(scope="module")
def folder(family, case, tmp_path_factory):
    return case.build(tmp_path_factory.mktemp("tiny") / family)


@pytest.fixture()
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def arch(family, folder):
    return architecture_of_folder(folder, f"tiny-{family}")


def test_every_family_with_a_pipeline_class_has_a_case():
    assert set(CASES) <= set(FAMILIES) and all(FAMILIES[n].pipeline_class for n in CASES)
    # SD 1/2 is the lab's family: tests/lab and the scan, train and repair tests run it end to end
    assert {n for n, f in FAMILIES.items() if f.pipeline_class} - set(CASES) == {"sd"}


# --- loading -------------------------------------------------------------------------------------

def test_the_folder_loads_as_its_family_and_renders_at_its_size(family, case, folder, pipe):
    assert family_of_folder(folder) is FAMILIES[family] and family_of_pipeline(pipe) is FAMILIES[family]
    assert type(pipe).__name__ == FAMILIES[family].pipeline_class
    arch = architecture_of(pipe)
    assert {n.split(".", 1)[0] for n in arch.modules} == set(FAMILIES[family].lora_components)
    assert arch.kohya_prefixes == case.kohya_prefixes
    # the architecture built from the folder's configs on the meta device (what adapters are read against
    # before the weights load) is the loaded pipeline's
    built = architecture_of_folder(folder)
    assert built.modules == arch.modules and built.original_names == arch.original_names
    out = pipe(prompt="a red cross", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", **render_options(pipe))
    if case.frames:  # a clip of the family's frame count
        from auditkit.models.pipeline import render

        assert out.frames.shape[0] == 1 and out.frames.shape[1] > case.frames
        assert out.frames.shape[2:] == (case.image_size, case.image_size, 3)
        sampled = render(pipe, ["a red cross"], 2, case.guidance, [torch.Generator().manual_seed(0)])
        assert sampled.shape == (1, case.frames, case.image_size, case.image_size, 3)
        last = np.clip(np.rint(out.frames[0, -1] * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(sampled[0, -1], last)  # the last frame is among those sampled
    else:
        assert out.images.shape == (1, case.image_size, case.image_size, 3)


def test_an_input_image_is_what_an_edit_family_edits_and_refused_elsewhere(case, folder, pipe, tmp_path):
    import auditkit
    from auditkit.errors import BadInput
    from auditkit.models.pipeline import render
    from auditkit.scan import resolve_suites
    from auditkit.suites import InputImage

    (tmp_path / "edit.yaml").write_text(e2e.suite_yaml("tiny-edit", "concept", ["a red cross"],
                                                       input_image="{lab_seed: 1}"))
    config = auditkit.ScanConfig(base=str(folder), suites=(str(tmp_path / "edit.yaml"),), device="cpu")
    if not case.edits:
        with pytest.raises(BadInput, match="names an input image, but .* render from text only"):
            resolve_suites(config)
        return
    assert resolve_suites(config)[0].input_image == InputImage(lab_seed=1)
    a, b = (render(pipe, ["a red cross"], 2, case.guidance, [torch.Generator().manual_seed(0)], InputImage(lab_seed=s))
            for s in (1, 2))
    assert a.shape == (1, case.image_size, case.image_size, 3) and not np.array_equal(a, b)


def _pattern(name: str) -> str:
    return re.sub(r"([._])\d+(?=[._]|$)", r"\1N", name)


def test_the_shipped_table_and_the_tiny_pipeline_share_one_naming_scheme(family, case, arch):
    shipped = architectures.get(case.table)
    assert arch.name == f"tiny-{family}"  # a custom architecture: the shapes are not the real model's
    assert arch.kohya_prefixes == shipped.kohya_prefixes
    for names in ("modules", "original_names", "kohya_names"):
        assert {_pattern(n) for n in getattr(arch, names)} == {_pattern(n) for n in getattr(shipped, names)}, names


# --- adapters: read exactly, composed into the weights exactly ----------------------------------

def adapted_modules(arch, family: str, seed: int = 0) -> dict[str, LoraModule]:
    """A rank-2 update of every module of the denoiser and of the text encoders diffusers loads adapters of."""
    components = (FAMILIES[family].denoiser, *CASES[family].text_adapted)
    names = [n for n in arch.modules if n.split(".", 1)[0] in components]
    return random_modules(arch, names, rank=2, scale=0.5, std=0.2, seed=seed)


LAYOUTS = (formats.KOHYA, formats.DIFFUSERS, formats.PEFT)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_adapter_in_a_layout_the_family_reads_changes_the_weights_by_exactly_its_delta(family, arch, pipe,
                                                                                         tmp_path, layout):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    record = FAMILIES[family]
    if layout not in (formats.KOHYA, record.written_layout, *record.native_layouts):
        pytest.skip(f"{family} files do not come in the {layout} layout")
    mods = adapted_modules(arch, family)
    if layout == formats.PEFT:  # a peft file adapts one model: the denoiser
        mods = {n: m for n, m in mods.items() if n.startswith(record.denoiser + ".")}
    adapter = read_adapter(save_adapter(mods, tmp_path / "cand.safetensors", arch, layout),
                           extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0 and set(adapter.modules) == set(mods)
    for name, module in adapter.modules.items():
        np.testing.assert_allclose(module.delta(), mods[name].delta(), rtol=1e-5, atol=1e-7, err_msg=name)
    before = e2e.lora_weights(pipe)
    coverage = load_adapters(pipe, {"candidate": adapter})["candidate"]
    assert (coverage["fraction"], coverage["loaded"], coverage["missing"]) == (1.0, len(mods), [])
    assert coverage["source"] in ("file", "auditkit conversion")
    fused = Fused(pipe)
    fused.apply(Configuration("c@0.5", (("candidate", 0.5),)), ["candidate"])
    after = e2e.lora_weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).flatten(1).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert all(torch.equal(after[n], before[n]) for n in set(before) - set(adapter.modules))
    fused.restore()
    restored = e2e.lora_weights(pipe)
    assert all(torch.equal(restored[n], before[n]) for n in adapter.modules)


# --- the static and dynamic scan through the library API, resumed -------------------------------

def test_a_dynamic_scan_runs_and_resumes_with_the_data_free_checks(family, case, arch, folder, pipe, tmp_path,
                                                                    monkeypatch):
    import auditkit
    from auditkit import runner

    den = denoiser_for(pipe)
    # the safety update: the prompt's keys and values and every attention output of the denoiser; the candidate
    # undoes 0.9 of it, exactly linear in it at the keys/values
    safety_mods = {n: m for n, m in adapted_modules(arch, family, seed=3).items()
                   if n.startswith(den.component + ".") and n.endswith((*den.record.text_kv, ".to_out.0"))}
    undo = {n: LoraModule(n, m.down, -0.9 * m.up, m.scale) for n, m in safety_mods.items()}
    layout = FAMILIES[family].written_layout
    safety = save_adapter(safety_mods, tmp_path / "safety.safetensors", arch, layout)
    candidate = save_adapter(undo, tmp_path / "candidate.safetensors", arch, layout)
    prompts = ["a red cross", "a blue cross on gray"]
    (tmp_path / "tiny.yaml").write_text(e2e.suite_yaml("tiny-cross", "concept", prompts, guidance=case.guidance,
                                                       input_image="{lab_seed: 5}" if case.edits else ""))
    config = auditkit.ScanConfig(candidate=candidate, safety=safety, base=str(folder),
                                 suites=(str(tmp_path / "tiny.yaml"),), multipliers=(1.0,), batch_size=4,
                                 device="cpu", out=tmp_path / "scan")
    first = auditkit.scan(config, pipeline=pipe)
    dyn = first.report["dynamic"]
    assert set(dyn["configurations"]) == {"base", "base+safety", "base+safety+candidate@1", "base+candidate@1"}
    # 4 configurations x 4 images of the suite as written, 3 x 4 of the trigger search's phrase (a variant is not
    # rendered under the candidate alone: runner.variants_with_the_safety_module)
    rendered = 16 + 12
    assert dyn["images"] == rendered and dyn["adapter_coverage"]["candidate"]["fraction"] == 1.0
    assert dyn["adapter_coverage"]["safety"]["expected"] == len(safety_mods)
    assert first.report["static"]["cancellation"] == pytest.approx(0.9, abs=1e-4)  # read against the tiny arch
    assert first.verdict.evidence == "behavioural" and "data-free" in first.report["evidence"]["gathered"]
    cc = first.report["concept_check"]
    assert cc["applicable"] and cc["reverted"] == pytest.approx(0.9, abs=1e-6)
    assert cc["noise_reversion"]["prediction"] == case.prediction and 0.5 < cc["noise_reversion"]["reverted"] < 1.3
    html = (tmp_path / "scan" / "report.html").read_text()
    assert f"change to the {case.label}'s {case.prediction} prediction" in html
    records = [json.loads(line) for line in (tmp_path / "scan" / "run.jsonl").read_text().splitlines()[1:]]
    assert {r["config"] for r in records} == set(dyn["configurations"]) and len(records) == rendered
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "scan" / "images").rglob("*.png")}
    assert len(stamps) == rendered
    from PIL import Image

    # a clip's PNG is the strip of its sampled frames, side by side
    assert all(Image.open(p).size == (case.image_size * max(case.frames, 1), case.image_size) for p in stamps)
    if case.frames:  # the detectors scored that many frames of each clip; report.json and the report say so
        assert all(r["frames"] == case.frames for r in records) and dyn["frames_sampled"] == case.frames
        assert f"{case.frames} frames of each sampled and scored" in html
    else:
        assert "frames" not in records[0] and "frames_sampled" not in dyn
    if case.edits:  # every record names the input image, kept in the run folder and shown first in the report
        assert all(r["input_image"] == f"inputs/{r['suite']}.png" for r in records)
        assert {p.name for p in (tmp_path / "scan" / "inputs").iterdir()} == {f"{s}.png" for s in dyn["suites"]}
        assert html.count('alt="the image the prompts edit"') == len(dyn["suites"])
    else:
        assert not (tmp_path / "scan" / "inputs").exists() and "input_image" not in records[0]

    calls = []
    monkeypatch.setattr(runner, "_render_batch", lambda *a, **k: calls.append(a) or pytest.fail("rendered again"))
    second = auditkit.scan(config, pipeline=pipe)
    assert calls == [] and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert second.report["dynamic"]["suites"] == dyn["suites"] and second.report["reasons"] == first.report["reasons"]
    assert second.verdict == first.verdict
    assert not any(hasattr(m, "lora_A") for m in den.model.modules()), "the scan leaves the pipeline as it came"


# --- training (align, finetune, repair) and the data-free checks ----------------------------------

@pytest.fixture(scope="module")
def trained(family, case, folder, tmp_path_factory):
    """A 5-step ESD-x safety adapter of the tiny pipeline (checked by check_align), an image-caption folder and
    a 5-step on-top fine-tune of it (checked by check_finetune): the candidate the repairs start from."""
    tmp = tmp_path_factory.mktemp(f"{family}-train")
    pipe = load_pipeline(str(folder))
    safety = e2e.check_align(pipe, tmp / "safety.safetensors", case.text_modules, case.frozen)
    data = e2e.image_caption_folder(tmp / "data")
    candidate = e2e.check_finetune(pipe, data, safety, "on-top", case.frozen + case.finetune_frozen).modules
    return safety, data, candidate


def test_align_trains_only_the_modules_that_read_the_prompt(family, case, pipe, trained):
    adapter = read_adapter(trained[0], extra_architectures=(architecture_of(pipe),))
    assert all(n.startswith(FAMILIES[family].denoiser + ".") and n.endswith(case.text_modules)
               for n in adapter.modules)
    assert {suffix for suffix in case.text_modules if any(n.endswith(suffix) for n in adapter.modules)} == \
        set(case.text_modules)


def test_finetune_modular_trains_a_lora_and_leaves_the_pipeline_as_it_was(case, pipe, trained):
    safety, data, _ = trained  # on top of the safety adapter: the fixture's fine-tune, checked alike
    e2e.check_finetune(pipe, data, safety, "modular", case.frozen + case.finetune_frozen)


def test_the_data_free_checks_give_numbers(family, case, arch, pipe):
    """On a random update of the modules that read the prompt (and, for the tiny UNet, of the self-attention's
    queries: without them the base judge's two renders of it do not differ)."""
    safety = {n: m for n, m in adapted_modules(arch, family, seed=4).items()
              if n.endswith((*case.text_modules, *case.data_free_extra))}
    e2e.check_data_free(pipe, safety, case.prediction, case.label, case.judge_tolerance)


def test_a_modular_repair_retrains_and_rescans(folder, pipe, trained, tmp_path):
    safety, data, candidate = trained
    e2e.check_modular_repair(folder, pipe, safety, candidate, data, tmp_path)


def test_a_corrected_repair_trains_on_the_denoiser(pipe, trained):
    safety, data, candidate = trained
    e2e.check_correction(pipe, safety, candidate, data)
