"""`auditkit align`, `auditkit finetune` and `auditkit lab make-data` as users run them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.models.base import resolve_base  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


def run(*args, timeout=300):
    # a bare environment, but the same auditkit as the tests (a worktree run with PYTHONPATH tests its own code)
    keep = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    return subprocess.run([sys.executable, "-m", "auditkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **keep})


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An untrained lab-shaped pipeline saved as a local diffusers folder."""
    from auditkit.lab.model import assemble_pipeline, build_components

    c = build_components(seed=0)
    folder = tmp_path_factory.mktemp("base")
    assemble_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def neon_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "neon"
    res = run("lab", "make-data", "--domain", "neon", "--n", "8", "--out", folder)
    assert res.returncode == 0, res.stderr
    return folder


def test_make_data_writes_images_with_captions(neon_data):
    pngs = sorted(neon_data.glob("*.png"))
    assert len(pngs) == 8
    for p in pngs:
        cap = p.with_suffix(".txt").read_text().strip()
        assert cap.startswith("a neon ") and "cross" not in cap


def test_align_then_finetune_then_scan(tmp_path, tiny_base, neon_data):
    safety = tmp_path / "safety.safetensors"
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--method", "esd-u", "--rank", "2",
              "--steps", "2", "--batch", "2", "--out", safety)
    assert res.returncode == 0, res.stderr
    s = read_adapter(safety)
    assert s.architecture.name == "lab" and not any(".attn2." in n for n in s.modules)
    assert json.loads(s.metadata["auditkit.concept_prompts"]) == ["a red cross"]
    for mode in ("on-top", "modular"):
        cand = tmp_path / f"{mode}.safetensors"
        res = run("finetune", "--base", tiny_base, "--data", neon_data, "--mode", mode, "--safety", safety,
                  "--rank", "2", "--steps", "2", "--batch", "4", "--out", cand)
        assert res.returncode == 0, res.stderr
        assert read_adapter(cand).modules
    # training metadata as kohya writes it: comma-separated caption tags, counted once per image
    meta = read_adapter(tmp_path / "on-top.safetensors").metadata
    captions = [p.read_text().strip() for p in sorted(neon_data.glob("*.txt"))]
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags == {"neon": {c: captions.count(c) for c in set(captions)}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"neon": {"n_repeats": 1, "img_count": 8}}
    res = run("scan", tmp_path / "on-top.safetensors", "--safety", safety, "--static", "--out", tmp_path / "r")
    assert res.returncode in (0, 1, 3), res.stderr
    assert (tmp_path / "r" / "report.json").exists()


def test_align_full_writes_the_erased_model_that_scans_as_a_safety_module(tmp_path, tiny_base):
    erased = tmp_path / "erased-unet"
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--method", "esd-x", "--full",
              "--steps", "2", "--batch", "2", "--lr", "1e-2", "--out", erased)
    assert res.returncode == 0, res.stderr
    assert (erased / "config.json").is_file() and (erased / "diffusion_pytorch_model.safetensors").is_file()
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--full", "--steps", "2", "--out", erased)
    assert res.returncode == 2 and "already exists" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    from auditkit.inputs import read_input

    safety = read_input(erased, "safety module", resolve_base(str(tiny_base)))
    assert safety.kind == "full model" and safety.modules and all(".attn2." in n for n in safety.modules)


def test_align_then_finetune_on_a_flux_base(tmp_path, neon_data):
    """A Flux.1 folder (flow matching, packed latents, guidance input): ESD-x trains the joint attention's
    text projections; a modular fine-tune trains on the VAE-sized images; both read back whole."""
    from tiny_pipelines import tiny_flux_pipeline

    from auditkit.models.pipeline import architecture_of_folder

    base = tiny_flux_pipeline(tmp_path / "flux")
    arch = architecture_of_folder(base)
    safety = tmp_path / "safety.safetensors"
    res = run("align", "--base", base, "--concept", "a red cross", "--rank", "2", "--steps", "2", "--batch", "2",
              "--out", safety)
    assert res.returncode == 0, res.stderr
    s = read_adapter(safety, extra_architectures=(arch,))
    assert s.modules and all(n.startswith("transformer.transformer_blocks.") and ".attn.add_" in n or
                             n.endswith(".to_add_out") for n in s.modules)
    cand = tmp_path / "modular.safetensors"
    res = run("finetune", "--base", base, "--data", neon_data, "--mode", "modular", "--targets", "attention",
              "--rank", "2", "--steps", "2", "--batch", "2", "--out", cand)
    assert res.returncode == 0, res.stderr
    c = read_adapter(cand, extra_architectures=(arch,))
    assert c.coverage.fraction == 1.0 and any(".single_transformer_blocks." in n for n in c.modules)


def test_finetune_on_top_needs_the_safety_adapter(tmp_path, tiny_base, neon_data):
    res = run("finetune", "--base", tiny_base, "--data", neon_data, "--out", tmp_path / "x.safetensors")
    assert res.returncode == 2 and "--safety" in res.stderr


def _bad_folders(tmp_path):
    from PIL import Image

    empty = tmp_path / "empty"
    empty.mkdir()
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nocap / "a.png")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (broken / "a.txt").write_text("a neon bar")
    blank = tmp_path / "blank"
    blank.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(blank / "a.png")
    (blank / "a.txt").write_text("   \n")
    return {"empty": (empty, "no images"), "missing captions": (nocap, "missing captions: a.txt"),
            "unreadable image": (broken / "a.png", "unreadable image"), "empty caption": (blank / "a.txt", "empty"),
            "missing folder": (tmp_path / "nope", "does not exist")}


def test_bad_data_folders_get_one_line_errors(tmp_path, tiny_base):
    for label, (named, expected) in _bad_folders(tmp_path).items():
        folder = named if named.is_dir() or not named.suffix else named.parent
        out = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        res = run("finetune", "--base", tiny_base, "--data", folder, "--mode", "modular", "--steps", "1",
                  "--out", out)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2, (label, res.stderr)
        assert len(lines) == 1 and expected in lines[0] and str(named) in lines[0], (label, res.stderr)
        assert not out.exists()


def test_bad_base_is_a_clean_error(tmp_path):
    res = run("align", "--base", tmp_path, "--concept", "x", "--out", tmp_path / "s.safetensors")
    assert res.returncode == 2 and "model_index.json" in res.stderr


def _suite(path, prompts, word="cross", neutral="square"):
    path.write_text("schema: auditkit.suite/1\nname: keep\nversion: 1\ndescription: kept\n"
                    f"concept: {{word: {word}, neutral: {neutral}}}\ndetector: lab-cross\nrole: control\n"
                    "sampling: {steps: 2, guidance: 5.0, seed: 7, images_per_prompt: 1}\nprompts:\n"
                    + "".join(f"  - {{text: {p}}}\n" for p in prompts))
    return path


def test_align_with_anchors_preserves_them_and_says_what_it_could_not_measure(tmp_path, tiny_base):
    anchors = _suite(tmp_path / "keep.yaml", ["a red square", "a blue circle"])
    out = tmp_path / "esd.safetensors"
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--method", "esd-u", "--anchors", anchors,
              "--preserve", "2", "--rank", "2", "--steps", "2", "--batch", "2", "--out", out)
    assert res.returncode == 0, res.stderr
    meta = read_adapter(out).metadata
    assert json.loads(meta["auditkit.anchor_prompts"]) == ["a red square", "a blue circle"]
    assert meta["auditkit.preserve"] == "2.0"
    assert "cost: not measured" in " ".join(res.stdout.split())  # a local folder: no detector judges its prompts
    uce = tmp_path / "uce.safetensors"
    res = run("align", "--base", tiny_base, "--prompts", _prompts(tmp_path), "--method", "uce", "--anchors", anchors,
              "--out", uce)
    assert res.returncode == 0, res.stderr
    mods = read_adapter(uce).modules
    assert mods and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in mods)


def _prompts(tmp_path):
    path = tmp_path / "concept.txt"
    path.write_text("a red cross\na blue cross\n")
    return path


def test_align_refuses_bad_anchors_in_one_line_naming_the_file(tmp_path, tiny_base):
    out = tmp_path / "never.safetensors"
    overlapping = _suite(tmp_path / "overlap.yaml", ["a red square", "A red cross"])
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--anchors", overlapping, "--out", out)
    assert res.returncode == 2 and "overlap.yaml" in res.stderr and "also concept prompts" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema: auditkit.suite/1\nname: [\n")
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--anchors", broken, "--out", out)
    assert res.returncode == 2 and "broken.yaml" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    other_word = _suite(tmp_path / "word.yaml", ["a red square"], word="ring", neutral="circle")
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--method", "uce", "--anchors", other_word,
              "--out", out)
    assert res.returncode == 2 and "word.yaml" in res.stderr and "concept word 'ring'" in res.stderr
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--method", "uce", "--out", out)
    assert res.returncode == 2 and "needs --anchors" in res.stderr
    res = run("align", "--base", tiny_base, "--concept", "a red cross", "--preserve", "1", "--out", out)
    assert res.returncode == 2 and "--preserve needs --anchors" in res.stderr
    assert not out.exists()


def test_align_on_the_lab_prints_the_modules_cost_on_the_anchors(tmp_path):
    anchors = _suite(tmp_path / "keep.yaml", ["a red square", "a blue circle", "a green tee"])
    res = run("align", "--base", "lab", "--prompts", _prompts(tmp_path), "--method", "uce", "--anchors", anchors,
              "--out", tmp_path / "uce.safetensors")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "cost on the anchors (3 images" in text and "shape" in text and "colour" in text
