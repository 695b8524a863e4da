"""Lab validation of erased full models (issue 12): the ESD-u Safety LoRA merged into the lab UNet is an
erased full model; candidates fine-tuned on top of it (the erased weights themselves merged while
training) and modularly (on the base) are scanned against it, and the static findings agree with
scanning them against the Safety LoRA itself: the erased model is the base plus exactly that update.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.model import lab_pipeline_available  # noqa: E402
from auditkit.models.base import resolve_base  # noqa: E402

# two short fine-tunes on the lab: about 25 s on 2 cores, under the minute that would make it a slow test
# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")]
full_models = pytest.importorskip("full_models")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The erased model, and an on-top and a modular candidate trained in the lab on benign neon data."""
    from auditkit.lab import world
    from auditkit.lab.model import load_lab_pipeline
    from auditkit.lora.adapter import read_adapter
    from auditkit.lora.write import save_adapter
    from auditkit.models import architectures
    from auditkit.models.difference import read_full_model
    from auditkit.train.finetune import FinetuneConfig, finetune

    folder = tmp_path_factory.mktemp("lab-full")
    lab = architectures.get("lab")
    safety = read_adapter(full_models.SAFETY_U).modules
    erased = full_models.pipeline_folder(folder / "erased", (safety, 1.0))
    exact = read_full_model(erased, resolve_base("lab"), lab).exact()  # what training on top of the erased model merges
    pipe = load_lab_pipeline()
    neon = world.sample_specs(7, 256, domain="neon")
    images, captions = world.render_many(neon), [world.caption(s) for s in neon]
    cfg = {"rank": 8, "lr": 1e-3, "batch": 16, "seed": 0, "steps": 80}
    candidates = {
        "on-top": finetune(pipe, images, captions, FinetuneConfig(mode="on-top", **cfg), safety=exact),
        "modular": finetune(pipe, images, captions, FinetuneConfig(mode="modular", **cfg)),
    }
    paths = {k: save_adapter(v.modules, folder / f"{k}.safetensors", lab) for k, v in candidates.items()}
    return erased, paths


@pytest.mark.parametrize("candidate", ["on-top", "modular"])
def test_static_findings_against_the_erased_model_agree_with_those_against_the_safety_lora(trained, candidate):
    from auditkit.scan import run_static_scan

    erased, paths = trained
    lora = run_static_scan(paths[candidate], full_models.SAFETY_U)
    truncated = run_static_scan(paths[candidate], erased, base=resolve_base("lab"))  # energy 0.99 per module
    exact = run_static_scan(paths[candidate], erased, base=resolve_base("lab"), energy=1.0)
    assert exact.findings.cancellation == pytest.approx(lora.findings.cancellation, abs=1e-4)
    assert truncated.findings.cancellation == pytest.approx(lora.findings.cancellation, abs=0.01)
    assert truncated.verdict.verdict == lora.verdict.verdict
    groups = {(g.block, g.kind): g for g in lora.findings.groups}
    for g in truncated.findings.groups:
        assert g.safety_share == pytest.approx(groups[(g.block, g.kind)].safety_share, abs=0.01)
        assert g.cancellation == pytest.approx(groups[(g.block, g.kind)].cancellation, abs=0.02)
    ranked = [m.name for m in lora.findings.modules[:5]]
    assert [m.name for m in exact.findings.modules[:5]] == ranked  # the same modules undo safety most
    assert np.isfinite(truncated.findings.energy_in_safety_subspace)


def test_the_on_top_candidate_cancels_more_of_the_erased_update_than_the_modular_one(trained):
    """The fine-tuning jailbreak's signature in weight space, seen against the erased model."""
    from auditkit.scan import run_static_scan

    erased, paths = trained
    on_top = run_static_scan(paths["on-top"], erased, base=resolve_base("lab")).findings
    modular = run_static_scan(paths["modular"], erased, base=resolve_base("lab")).findings
    assert on_top.cancellation > modular.cancellation
    assert on_top.energy_in_safety_subspace > modular.energy_in_safety_subspace
