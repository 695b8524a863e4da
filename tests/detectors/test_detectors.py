"""Detectors: one interface, a lazy registry, pinned profiles."""

import json
import subprocess
import sys

import numpy as np
import pytest

from auditkit.detectors import REGISTRY, available, get, names
from auditkit.errors import BadInput


def test_registry_lists_detectors_without_importing_heavy_packages():
    code = ("import sys, auditkit.detectors as d; d.names(); [d.available(n) for n in d.names()]; "
            "print(json.dumps([m for m in ('torch', 'onnxruntime', 'open_clip') if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
    assert {"nudenet-default", "nudenet-strict", "clip", "lab-cross"} <= set(names())


def test_unknown_detector_suggests_the_closest_name():
    with pytest.raises(BadInput, match="did you mean 'nudenet-default'"):
        get("nudenet-defalt")
    with pytest.raises(BadInput, match="unknown detector"):
        get("zzz")


def test_nudenet_score_is_the_best_box_among_the_profile_classes():
    from auditkit.detectors.nudenet import PROFILES, image_scores

    dets = [[{"class": "FACE_FEMALE", "score": 0.9}, {"class": "BUTTOCKS_EXPOSED", "score": 0.5}],
            [{"class": "FEET_EXPOSED", "score": 0.8}], [],
            [{"class": "ANUS_EXPOSED", "score": 0.3}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}]]
    np.testing.assert_allclose(image_scores(dets, PROFILES["default"]["classes"]), [0.5, 0.0, 0.0, 0.7])
    np.testing.assert_allclose(image_scores(dets, PROFILES["strict"]["classes"]), [0.0, 0.0, 0.0, 0.7])


@pytest.mark.skipif(not available("nudenet-default"), reason="nudenet not installed")
def test_nudenet_runs_offline_and_pins_its_profile():
    det = get("nudenet-default")
    imgs = np.zeros((2, 64, 64, 3), np.uint8)
    imgs[1] = 255
    scores = det.score(imgs)
    assert scores.shape == (2,) and (scores == 0).all() and not det.flag(imgs).any()
    prof = det.profile()
    assert prof["threshold"] == 0.45 and len(prof["onnx_sha256"]) == 64 and prof["package_version"]
    assert get("nudenet-strict").threshold == 0.6 and get("nudenet-default", threshold=0.3).threshold == 0.3


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clipcfg")
    (folder / "auditkit-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder)
    return "auditkit-tiny-clip"


def test_clip_detector_with_a_random_model(tiny_clip):
    det = get("clip", model=tiny_clip, pretrained=None, concept="cross", neutral="square")
    imgs = np.random.default_rng(0).integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)
    s = det.score(imgs)
    assert s.shape == (5,) and ((s >= 0) & (s <= 1)).all()
    assert det.flag(imgs).dtype == bool
    assert det.profile()["pretrained"] is None and det.profile()["concept_prompts"][0] == "a photo of cross"


def test_clip_loads_a_local_safetensors_checkpoint_and_refuses_pickles(tiny_clip, tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = open_clip.create_model(tiny_clip, pretrained=None)
    ckpt = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    imgs = np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    a = get("clip", model=tiny_clip, pretrained=str(ckpt)).score(imgs)
    b = get("clip", model=tiny_clip, pretrained=str(ckpt)).score(imgs)
    c = get("clip", model=tiny_clip, pretrained=None).score(imgs)
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, c)
    assert len(get("clip", model=tiny_clip, pretrained=str(ckpt)).profile()["sha256"]) == 64
    with pytest.raises(BadInput, match="pickle"):
        get("clip", model=tiny_clip, pretrained=str(tmp_path / "weights.pt"))


def test_lab_detector_through_the_registry():
    from auditkit.lab import world
    from auditkit.lab.detector import detector_assets_path

    if not (detector_assets_path() / "detector.safetensors").exists():
        pytest.skip("lab detector not installed")
    det = get("lab-cross")
    crosses = world.render_many(world.sample_specs(5, 16, shape="cross"))
    squares = world.render_many(world.sample_specs(6, 16, shape="square"))
    assert det.flag(crosses).mean() >= 0.9 and det.flag(squares).mean() <= 0.1
    assert det.profile()["threshold"] == det.threshold


def test_every_registry_entry_names_a_real_target():
    import importlib

    for name, entry in REGISTRY.items():
        module, _, attr = entry.target.partition(":")
        if available(name):
            assert callable(getattr(importlib.import_module(module), attr)), name


def test_cli_lists_detectors():
    res = subprocess.run([sys.executable, "-m", "auditkit", "detectors", "ls"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "nudenet-default" in res.stdout and "lab-cross" in res.stdout


@pytest.mark.parametrize("name", ["e.PT", "e.pickle", "e.Pth", "e.BIN", "e.npz", "e.txt", "e"])
def test_clip_weights_other_than_safetensors_never_reach_an_unpickler(tiny_clip, tmp_path, no_unpickling, name):
    # issue 26 H5: only .pt/.pth/.bin/.ckpt/.pkl (exact case) were refused; .PT, .pickle, ... reached torch.load
    import pickle

    path = tmp_path / name
    path.write_bytes(pickle.dumps({"x": [0.0, 0.0]}))
    with pytest.raises(BadInput) as exc:
        get("clip", model=tiny_clip, pretrained=str(path))
    assert str(path) in str(exc.value) and ("pickle" in str(exc.value) or ".safetensors" in str(exc.value))


def test_clip_weights_safetensors_in_any_case_are_read_by_auditkit(tiny_clip, tmp_path, no_unpickling):
    # issue 26 H5: a .SAFETENSORS file is read by auditkit's reader (open_clip would hand it to torch.load)
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = open_clip.create_model(tiny_clip, pretrained=None)
    lower, upper = tmp_path / "clip.safetensors", tmp_path / "CLIP.SafeTensors"
    for path in (lower, upper):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    imgs = np.random.default_rng(2).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(get("clip", model=tiny_clip, pretrained=str(upper)).score(imgs),
                               get("clip", model=tiny_clip, pretrained=str(lower)).score(imgs), rtol=1e-5)


def test_clip_weights_that_are_a_renamed_pickle_or_do_not_fit_are_one_line(tiny_clip, tmp_path, no_unpickling):
    # issue 26 H5
    import torch.serialization
    from safetensors.numpy import save_file

    fake = tmp_path / "fake.safetensors"
    torch.serialization.save({"x": 1}, str(fake))  # a zip pickle under a safetensors name
    with pytest.raises(BadInput, match="pickle"):
        get("clip", model=tiny_clip, pretrained=str(fake))
    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(other))
    with pytest.raises(BadInput, match="do not fit"):
        get("clip", model=tiny_clip, pretrained=str(other))
    with pytest.raises(BadInput, match="no such file"):
        get("clip", model=tiny_clip, pretrained=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("model", ["hf-hub:someone/clip", "local-dir:/tmp"])
def test_clip_models_that_fetch_their_own_weights_are_refused(no_unpickling, model):
    # issue 26 H5: open_clip's hf-hub:/local-dir: models pick .bin/.pth files and unpickle them
    pytest.importorskip("open_clip")
    with pytest.raises(BadInput, match="built-in model names"):
        get("clip", model=model, pretrained=None)
