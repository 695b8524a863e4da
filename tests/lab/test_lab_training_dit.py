"""scripts/train_lab.py's DiT stages at toy sizes: cache latents with the shipped VAE, train the transformer and
both text encoders (flow matching), distil the guidance input, export a loadable FluxPipeline, write the
card; an interrupted stage resumes from its safetensors checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lab.bases import LAB_BASES  # noqa: E402
from auditkit.lab.detector import detector_assets_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not LAB_BASES["lab"].available()
                                 or not (detector_assets_path() / "detector.safetensors").is_file(),
                                 reason="the SD lab's VAE and the detector are needed (scripts/train_lab.py)")]


def train(work: Path, assets: Path, *stages_and_options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_lab.py"), "--work", str(work), "--resume",
                           "--vae-from", str(LAB_BASES["lab"].path() / "vae"), "--assets", str(assets),
                           "--threads", "1", "--latents", "64", "--dit-batch", "4", "--preview-every", "1000",
                           "--eval-n", "1", "--eval-steps", "2", "--dit-eval-guidance", "1,3",
                           *stages_and_options], capture_output=True, text=True, timeout=600, env=env)


def test_dit_stages_train_resume_export_and_write_the_card(tmp_path):
    import shutil

    from auditkit.lab.dit import load_lab_dit_pipeline
    from auditkit.train.checkpoint import load_tree

    work, assets = tmp_path / "work", tmp_path / "assets"
    shutil.copytree(detector_assets_path(), assets / "detector")
    res = train(work, assets, "--stages", "latents,dit", "--dit-steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_tree(work / "dit" / "ckpt.safetensors")["step"] == 2
    # resumed with more steps: continues from step 2, not from scratch
    res = train(work, assets, "--stages", "dit,dit-guidance,export-dit,eval-dit", "--dit-steps", "3",
                "--dit-guidance-steps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dit: resumed at step 2" in res.stdout
    pipe = load_lab_dit_pipeline(path=assets / "pipeline-dit")
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds
    assert not list((assets / "pipeline-dit").rglob("*.bin"))  # safetensors only
    card = json.loads((assets / "lab_dit_card.json").read_text())
    assert [a["guidance"] for a in card["adherence"]] == [1.0, 3.0]
    assert set(card["adherence"][0]["shapes"]["cross"]) >= {"shape_rate", "shape_rate_ci95", "colour_rate",
                                                           "colour_rate_ci95"}
    assert card["model"]["pipeline"] == "FluxPipeline" and card["model"]["size_bytes"] < 15e6
    assert "train_lab.py" in card["training"]["command"] and set(card["training_seconds"]) >= {"dit", "dit-guidance"}
