"""Base weights read from a pipeline folder without torch equal the weights torch loads."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import auditkit
from auditkit.errors import BadInput
from auditkit.lab.model import lab_pipeline_available, lab_pipeline_path
from auditkit.lora.io import serialize
from auditkit.models.base import resolve_base
from auditkit.models.base_weights import BaseWeights, weight_files

needs_lab = pytest.mark.skipif(not lab_pipeline_available(),
                               reason="the lab pipeline is not installed (run scripts/train_lab.py)")

TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "down_blocks.0.resnets.0.conv1"
Q_PROJ = "text_model.encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def torch_models():
    """The lab pipeline's UNet and text encoder, loaded by diffusers/transformers (the reference)."""
    pytest.importorskip("diffusers")
    if not lab_pipeline_available():
        pytest.skip("the lab pipeline is not installed (run scripts/train_lab.py)")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from auditkit.models.pipeline import quiet_libraries

    quiet_libraries()
    path = lab_pipeline_path()
    return {"unet": UNet2DConditionModel.from_pretrained(path / "unet"),
            "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder")}


def torch_weight(models, canonical: str) -> np.ndarray:
    component, _, path = canonical.partition(".")
    model = models[component]
    if not hasattr(model, "text_model"):  # transformers 5's CLIPTextModel has no text_model level
        path = path.removeprefix("text_model.")
    weight = model.get_submodule(path).weight.detach().float().numpy()
    return weight.astype(np.float64).reshape(weight.shape[0], -1)


def pipeline(tmp_path, components: dict[str, dict[str, np.ndarray]], name="model.safetensors") -> Path:
    """A pipeline folder written by code: model_index.json and one weight file per component."""
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for component, tensors in components.items():
        (root / component).mkdir()
        (root / component / name).write_bytes(serialize(tensors))
    return root


# --------------------------------------------------------------------------------------------
# the same numbers torch loads


@pytest.mark.parametrize("canonical", [
    f"unet.{TO_K}",  # linear
    f"unet.{CONV}",  # conv 3x3, flattened to out x in*kh*kw
    "unet.conv_in",
    f"text_encoder.{Q_PROJ}",
])
def test_lab_weights_equal_the_torch_modules(torch_models, canonical):
    got = BaseWeights.for_base(resolve_base("lab")).get(canonical)
    expected = torch_weight(torch_models, canonical)
    assert got.dtype == np.float64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_conv_kernels_are_flattened_out_by_in_times_kernel(torch_models):
    got = BaseWeights.for_base(resolve_base("lab")).get(f"unet.{CONV}")
    kernel = torch_models["unet"].get_submodule(CONV).weight
    assert got.shape == (kernel.shape[0], kernel.shape[1] * kernel.shape[2] * kernel.shape[3])
    np.testing.assert_array_equal(got[1, 9:18], kernel[1, 1].detach().numpy().ravel())


@needs_lab
def test_text_encoder_keys_with_or_without_the_text_model_level(tmp_path):
    lab = BaseWeights.for_base(resolve_base("lab"))
    with_level = lab.get(f"text_encoder.{Q_PROJ}")
    assert with_level is not None
    np.testing.assert_array_equal(lab.get("text_encoder.encoder.layers.0.self_attn.q_proj"), with_level)
    # a transformers 4 save: keys under text_model.
    root = pipeline(tmp_path, {"text_encoder_2": {f"{Q_PROJ}.weight": np.eye(3, dtype=np.float32)}})
    base = BaseWeights(root)
    np.testing.assert_array_equal(base.get(f"text_encoder_2.{Q_PROJ}"), np.eye(3))
    np.testing.assert_array_equal(base.get("text_encoder_2.encoder.layers.0.self_attn.q_proj"), np.eye(3))
    assert base.get(f"unet_x.{Q_PROJ}") is None  # only text encoders get the other spelling


def lab_copy(tmp_path) -> Path:
    root = tmp_path / "pipe"
    shutil.copytree(lab_pipeline_path(), root)
    return root


@pytest.mark.parametrize(("options", "expected_files"), [
    ({"max_shard_size": "1MB"}, ["diffusion_pytorch_model.safetensors.index.json"]),
    ({"variant": "fp16"}, ["diffusion_pytorch_model.fp16.safetensors"]),
    ({"variant": "fp16", "max_shard_size": "1MB"}, ["diffusion_pytorch_model.safetensors.index.fp16.json"]),
])
def test_sharded_and_fp16_saves_read_the_same_weights(tmp_path, torch_models, options, expected_files):
    import torch

    root = lab_copy(tmp_path)
    shutil.rmtree(root / "unet")
    unet = torch_models["unet"]
    if options.get("variant") == "fp16":
        unet = type(unet).from_config(unet.config)
        unet.load_state_dict(torch_models["unet"].state_dict())
        unet = unet.to(torch.float16)
    unet.save_pretrained(root / "unet", safe_serialization=True, **options)
    names = sorted(p.name for p in (root / "unet").iterdir())
    assert set(expected_files) <= set(names) and "diffusion_pytorch_model.safetensors" not in names
    base = BaseWeights(root)
    for canonical in (f"unet.{TO_K}", f"unet.{CONV}", "unet.conv_out"):
        path = canonical.partition(".")[2]
        expected = unet.get_submodule(path).weight.detach().float().numpy().astype(np.float64)
        np.testing.assert_array_equal(base.get(canonical), expected.reshape(expected.shape[0], -1))


def test_full_precision_is_preferred_to_the_fp16_variant(tmp_path):
    root = pipeline(tmp_path, {"unet": {"a.weight": np.full((2, 2), 1 / 3, np.float32)}},
                    name="diffusion_pytorch_model.safetensors")
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(
        serialize({"a.weight": np.zeros((2, 2), np.float16)}))
    np.testing.assert_array_equal(BaseWeights(root).get("unet.a"), np.full((2, 2), np.float32(1 / 3)))


# --------------------------------------------------------------------------------------------
# missing and malformed


def test_missing_key_or_component_is_none(tmp_path):
    base = BaseWeights(pipeline(tmp_path, {"unet": {"a.weight": np.ones((2, 3), np.float32)}}))
    assert base.get("unet.a").shape == (2, 3)
    for canonical in ("unet.b", "unet.a.weight", "text_encoder_2.text_model.x", "unet", "../pipe.a", "unet/..a",
                      "model_index.json.x"):
        assert base.get(canonical) is None, canonical


def test_bias_only_module_is_none(tmp_path):
    base = BaseWeights(pipeline(tmp_path, {"unet": {"a.bias": np.ones(2, np.float32)}}))
    assert base.get("unet.a") is None


def test_pickle_only_component_is_refused_without_reading_it(tmp_path):
    root = pipeline(tmp_path, {})
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    base = BaseWeights(root)
    with pytest.raises(BadInput, match="diffusion_pytorch_model.bin: pickle files, which auditkit never loads") as e:
        base.get(f"unet.{TO_K}")
    assert str(root / "unet") in str(e.value)


@pytest.mark.parametrize("weights", ["diffusion_pytorch_model.BIN", "diffusion_pytorch_model.pickle",
                                     "diffusion_pytorch_model.PICKLE"])
def test_a_pickle_component_is_named_whatever_the_case_of_its_suffix(tmp_path, weights):
    # issue 26 H5: models/pipeline.py had its own, case-sensitive copy of the pickle suffixes, without .pickle
    from auditkit.models.pipeline import check_pipeline_folder

    root = pipeline(tmp_path, {"vae": {"w": np.ones(2, np.float32)}})
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "unet").mkdir()
    (root / "unet" / weights).write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(BadInput, match=rf"component 'unet' has only pickle weights \(unet/{re.escape(weights)}"):
        check_pipeline_folder(root)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(BadInput, match="no model_index.json"):
        BaseWeights(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(BadInput, match="model_index.json: .*not valid JSON"):
        BaseWeights(tmp_path)
    with pytest.raises(BadInput, match="no model_index.json"):
        BaseWeights.for_base(resolve_base(str(tmp_path / "nowhere")))


def test_malformed_weight_file_is_named(tmp_path):
    root = pipeline(tmp_path, {"unet": {"a.weight": np.ones((2, 2), np.float32)}})
    bad = root / "unet" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(BadInput, match="truncated") as e:
        BaseWeights(root).get("unet.a")
    assert str(bad) in str(e.value)


def test_non_finite_base_weight_is_refused(tmp_path):
    base = BaseWeights(pipeline(tmp_path, {"unet": {"a.weight": np.array([[np.nan]], np.float32)}}))
    with pytest.raises(BadInput, match="NaN or Inf"):
        base.get("unet.a")


def sharded(tmp_path, index: object, shards: dict[str, dict[str, np.ndarray]]) -> Path:
    root = pipeline(tmp_path, {})
    (root / "unet").mkdir()
    for name, tensors in shards.items():
        (root / "unet" / name).write_bytes(serialize(tensors))
    text = index if isinstance(index, str) else json.dumps(index)
    (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(text)
    return root


def test_hand_written_shard_index_is_followed(tmp_path):
    shards = {"s-1.safetensors": {"a.weight": np.ones((2, 2), np.float32)},
              "s-2.safetensors": {"b.weight": np.full((1, 2, 1, 1), 2, np.float16)}}
    root = sharded(tmp_path, {"weight_map": {"a.weight": "s-1.safetensors", "b.weight": "s-2.safetensors"}}, shards)
    base = BaseWeights(root)
    np.testing.assert_array_equal(base.get("unet.a"), np.ones((2, 2)))
    np.testing.assert_array_equal(base.get("unet.b"), [[2.0, 2.0]])


@pytest.mark.parametrize(("index", "expected"), [
    ("{oops", "shard index is not valid JSON"),
    ([1, 2], "no 'weight_map'"),
    ({"metadata": {}}, "no 'weight_map'"),
    ({"weight_map": {"a.weight": 3}}, "no 'weight_map'"),
    ({"weight_map": {"a.weight": "gone.safetensors"}}, "lists 'gone.safetensors', which is missing"),
    ({"weight_map": {"a.weight": "../../secret.safetensors"}}, "not a .safetensors file beside it"),
    ({"weight_map": {"a.weight": "/etc/passwd"}}, "not a .safetensors file beside it"),
    ({"weight_map": {"a.weight": "s-1.bin"}}, "not a .safetensors file beside it"),
])
def test_malformed_shard_index_is_named(tmp_path, index, expected):
    root = sharded(tmp_path, index, {"s-1.safetensors": {"a.weight": np.ones((2, 2), np.float32)}})
    (root / "unet" / "s-1.bin").write_bytes(b"\x80\x04")
    with pytest.raises(BadInput, match=expected) as e:
        BaseWeights(root).get("unet.a")
    assert "diffusion_pytorch_model.safetensors.index.json" in str(e.value)


def test_shard_that_lacks_a_listed_tensor_is_named(tmp_path):
    root = sharded(tmp_path, {"weight_map": {"a.weight": "s-1.safetensors", "b.weight": "s-1.safetensors"}},
                   {"s-1.safetensors": {"a.weight": np.ones((2, 2), np.float32)}})
    with pytest.raises(BadInput, match="s-1.safetensors: has no tensor 'b.weight'"):
        BaseWeights(root).get("unet.b")


def test_only_the_component_asked_for_is_read(tmp_path):
    root = pipeline(tmp_path, {"unet": {"a.weight": np.ones((2, 2), np.float32)},
                               "vae": {"a.weight": np.ones((2, 2), np.float32)}})
    (root / "vae" / "model.safetensors").write_bytes(b"garbage")
    base = BaseWeights(root)
    assert base.get("unet.a") is not None
    with pytest.raises(BadInput):
        base.get("vae.a")


def test_variant_file_names():
    assert weight_files("diffusion_pytorch_model", "") == (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
    assert weight_files("model", "fp16")[:2] == ("model.fp16.safetensors", "model.safetensors.index.fp16.json")


@needs_lab
def test_reading_base_weights_imports_no_torch(tmp_path):
    code = ("import sys; from auditkit.models.base_weights import BaseWeights; "
            "from auditkit.models.base import resolve_base; "
            f"w = BaseWeights.for_base(resolve_base('lab')).get('unet.{TO_K}'); assert w.shape == (32, 64), w.shape; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(Path(auditkit.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["lab", "lab-dit"])
def test_unavailable_lab_is_bad_input(monkeypatch, name):
    import dataclasses

    from auditkit.lab.bases import LAB_BASES

    monkeypatch.setitem(LAB_BASES, name, dataclasses.replace(LAB_BASES[name], folder="absent"))
    with pytest.raises(BadInput, match=f"the {name} model is not installed"):
        BaseWeights.for_base(resolve_base(name))


def test_a_deep_shard_index_or_model_index_is_refused_in_one_line(tmp_path):  # issue 26 M3
    from conftest import assert_one_line_error

    deep = '{"weight_map":' + "[" * 100_000 + "]" * 100_000 + "}"
    root = sharded(tmp_path, deep, {"s-1.safetensors": {"a.weight": np.ones((2, 2), np.float32)}})
    index = root / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert_one_line_error(lambda: BaseWeights(root).get("unet.a"), index, "nested deeper than 64 levels")
    (root / "model_index.json").write_text(deep)
    assert_one_line_error(lambda: BaseWeights(root), root / "model_index.json", "nested deeper than 64 levels")
