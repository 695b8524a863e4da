"""`auditkit repair` with an erased model as the safety module: the modular retrain trains on the base,
the re-scans compose it with the erased model, and the pack's manifest loads the erased model and the
adapter in diffusers."""

import json

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.model import lab_pipeline_available  # noqa: E402
from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402
from auditkit.models import architectures  # noqa: E402

pytestmark = pytest.mark.skipif(not lab_pipeline_available(), reason="lab model not installed")
full_models = pytest.importorskip("full_models")
LAB = architectures.get("lab")

SUITES = {"cross": ("concept", "a red cross", "a blue cross"), "neon": ("control", "a neon red bar", "a neon blue tee")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from auditkit.lab import world
    from auditkit.train.data import write_folder

    tmp = tmp_path_factory.mktemp("repair-full")
    safety = read_adapter(full_models.SAFETY_U).modules
    erased = full_models.component_folder(tmp / "erased" / "unet", (safety, 1.0))
    undo = {n: LoraModule(n, m.down, -0.8 * m.up, m.scale) for n, m in safety.items()}
    cand = save_adapter(undo, tmp / "cand.safetensors", LAB,
                        metadata={"ss_network_dim": "4", "ss_network_alpha": "4", "ss_max_train_steps": "3"})
    specs = world.sample_specs(3, 8, domain="neon")
    data = write_folder(tmp / "data", world.render_many(specs), [world.caption(s) for s in specs])
    suites = []
    for name, (role, *prompts) in SUITES.items():
        lines = "\n".join(f"  - {{text: {p}}}" for p in prompts)
        (tmp / f"{name}.yaml").write_text(
            f"schema: auditkit.suite/1\nname: tiny-{name}\nversion: 1\nconcept: {{word: cross, neutral: square}}\n"
            f"detector: lab-cross\nrole: {role}\nsampling: {{steps: 25, guidance: 5.0, seed: 7, images_per_prompt: 3}}"
            f"\nprompts:\n{lines}\n")
        suites += ["--suite", tmp / f"{name}.yaml"]
    return {"erased": erased, "cand": cand, "data": data, "suites": [*suites, "--steps", "4"], "safety": safety}


@pytest.mark.slow  # about 20 s: a retrain and two dynamic scans
def test_modular_repair_against_an_erased_model_and_the_manifest_that_loads_it(setup, tmp_path):
    import diffusers

    res = run_cli("repair", setup["cand"], "--safety", setup["erased"], "--data", setup["data"], "--base", "lab",
                   *setup["suites"], "--train-batch", "4", "--out", tmp_path / "r")
    assert res.returncode in (0, 1, 3), res.stdout[-2000:] + res.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rp = report["repair"]
    assert rp["method"] == "modular" and rp["training"]["steps"] == 3
    assert report["safety"]["kind"] == "full model"
    # before: the candidate undoes 80% of the erased model's update; after: trained on the base, nothing of it
    assert rp["before"]["static_cancellation"] == pytest.approx(0.8, abs=0.02)
    assert abs(rp["after"]["static_cancellation"]) < 0.05
    assert rp["comparisons"]  # both re-scans rendered base+safety (the erased model) + candidate / repair
    pack = tmp_path / "r" / "pack"
    assert sorted(p.name for p in pack.iterdir()) == ["finetune.safetensors", "manifest.json"]
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["safety_source"]["kind"] == "full model" and manifest["safety_source"]["form"] == "component folder"
    assert manifest["compose"][0]["model"] == str(setup["erased"]) and manifest["single_file"] is None
    # the manifest's snippet, as a user would paste it: the erased UNet in the base pipeline, the adapter on top
    scope = {"diffusers": diffusers}
    exec(manifest["diffusers"], scope)
    pipe = scope["pipe"]
    assert "finetune" in pipe.get_list_adapters()["unet"]
    weights = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    for key, value in full_models.merged("unet", (setup["safety"], 1.0)).items():
        np.testing.assert_allclose(weights[key].numpy(), value, atol=1e-6)


@pytest.mark.slow  # about 15 s: two scans with the data-free checks
def test_a_data_free_repair_projects_against_the_truncated_erased_update(setup, tmp_path):
    res = run_cli("repair", setup["cand"], "--safety", setup["erased"], "--base", "lab", "--static",
                   *setup["suites"], "--out", tmp_path / "r")
    assert res.returncode in (1, 3), res.stderr
    rp = json.loads((tmp_path / "r" / "report.json").read_text())["repair"]
    assert rp["method"] == "sign-aware" and abs(rp["after"]["static_cancellation"]) < 0.01
    assert any("truncated SVD" in n for n in rp["notes"])


def test_a_full_model_candidate_is_refused_with_the_way_out(setup, tmp_path):
    res = run_cli("repair", setup["erased"], "--safety", full_models.SAFETY_U, "--base", "lab", "--out",
                   tmp_path / "r")
    assert res.returncode == 2 and "auditkit extract" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "r" / "report.json").exists()
