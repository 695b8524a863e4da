"""Full models (erased checkpoints, full fine-tunes) in every form: read by canonical tensor name, their
difference to the base exact per tensor and truncated per module, bad inputs refused in one line."""

import json
import pickle
import shutil

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.lab.model import lab_pipeline_available, lab_pipeline_path
from auditkit.lora.adapter import read_adapter
from auditkit.lora.io import serialize
from auditkit.models import architectures
from auditkit.models.architectures import canonical_name, sgm_name
from auditkit.models.base import resolve_base
from auditkit.models.checkpoint import open_checkpoint
from auditkit.models.difference import open_base, read_full_model

pytestmark = pytest.mark.skipif(not lab_pipeline_available(), reason="the lab pipeline is not installed")

full_models = pytest.importorskip("full_models")  # tests/full_models.py (needs the lab)


@pytest.fixture(scope="module")
def lab():
    return architectures.get("lab")


@pytest.fixture(scope="module")
def safety_u():
    return read_adapter(full_models.SAFETY_U).modules


def write_form(tmp_path, form, *adapters):
    if form == "pipeline folder":
        return full_models.pipeline_folder(tmp_path / "erased", *adapters)
    if form == "component folder":
        return full_models.component_folder(tmp_path / "unet", *adapters)
    return full_models.single_file(tmp_path / "erased.safetensors", *adapters, naming=form.split()[-1])


def dense(modules, name):
    return modules[name].delta()


FORMS = ["pipeline folder", "component folder", "single file diffusers", "single file component",
         "single file original"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_of_an_erased_model_gives_the_merged_update_exactly(tmp_path, lab, safety_u, form):
    path = write_form(tmp_path, form, (safety_u, 1.0))
    adapter = read_full_model(path, resolve_base("lab"), lab, energy=1.0)
    update = adapter.update
    assert adapter.kind == "full model" and update.checkpoint.form == form.removesuffix(
        " diffusers").removesuffix(" component").removesuffix(" original")
    assert set(adapter.modules) == set(safety_u)  # exactly the modules the safety LoRA changes
    unet_modules = [n for n in lab.modules if n.startswith("unet.")]
    assert len(update.unchanged) == len(unet_modules) - len(safety_u) + (
        0 if form in ("component folder", "single file component") else len(lab.modules) - len(unet_modules))
    deltas = update.deltas()
    assert set(deltas) == {f"{n}.weight" for n in safety_u}
    for name, m in safety_u.items():
        ref = m.delta()
        tol = 1e-6 * np.abs(ref).max()  # the merged weights were stored in float32
        np.testing.assert_allclose(deltas[f"{name}.weight"].reshape(ref.shape), ref, atol=tol)
        np.testing.assert_allclose(adapter.modules[name].delta(), ref, atol=tol)  # energy 1: every direction
    assert update.outside == [] and adapter.coverage.fraction == 1.0


def test_original_layout_keys_left_out_are_the_vae_and_bookkeeping(tmp_path, lab, safety_u):
    path = full_models.single_file(tmp_path / "erased.safetensors", (safety_u, 1.0), naming="original")
    ckpt = open_checkpoint(path, open_base(resolve_base("lab")), lab)
    assert ckpt.naming == "original" and ckpt.components == ("text_encoder", "unet")
    assert ckpt.ignored == ["alphas_cumprod", "first_stage_model.decoder.conv_out.weight"]
    assert any("VAE" in n for n in ckpt.notes) and ckpt.unmapped == []


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_truncation_keeps_the_stated_energy_per_module_and_reports_rank_and_energy(tmp_path, lab, safety_u, energy):
    path = full_models.component_folder(tmp_path / "unet", (safety_u, 1.0))
    adapter = read_full_model(path, resolve_base("lab"), lab, energy=energy)
    summary = adapter.summary()["full_model"]
    assert summary["energy"] == energy and summary["modules_changed"] == len(safety_u)
    for name, t in adapter.update.truncation.items():
        ref = safety_u[name].delta()
        kept = np.sum(adapter.modules[name].delta() ** 2) / np.sum(ref**2)
        assert t.energy_kept >= energy and kept == pytest.approx(t.energy_kept, abs=1e-6)
        assert t.rank == adapter.modules[name].rank <= safety_u[name].rank
        assert summary["truncation"][name]["rank"] == t.rank
    assert summary["min_energy_kept"] >= energy


def test_a_fixed_rank_truncation(tmp_path, lab, safety_u):
    path = full_models.component_folder(tmp_path / "unet", (safety_u, 1.0))
    adapter = read_full_model(path, resolve_base("lab"), lab, rank=1)
    assert {m.rank for m in adapter.modules.values()} == {1}
    assert adapter.summary()["full_model"]["rank"] == 1 and adapter.summary()["full_model"]["energy"] is None


def test_a_model_identical_to_the_base_changes_nothing_and_counts_every_module_unchanged(lab):
    adapter = read_full_model(lab_pipeline_path(), resolve_base("lab"), lab)
    assert adapter.modules == {} and len(adapter.update.unchanged) == len(lab.modules)
    assert adapter.update.deltas() == {}


def test_changed_tensors_outside_the_modules_are_listed_and_exact(tmp_path, lab):
    tensors = full_models.lab_tensors("unet")
    tensors["conv_norm_out.weight"] = tensors["conv_norm_out.weight"] + 0.5
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(lab_pipeline_path() / "unet" / "config.json", folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(serialize(tensors))
    adapter = read_full_model(folder, resolve_base("lab"), lab)
    assert adapter.modules == {} and adapter.update.outside == ["unet.conv_norm_out.weight"]
    np.testing.assert_allclose(adapter.update.deltas()["unet.conv_norm_out.weight"], 0.5, atol=1e-6)  # float32 sums
    assert any("outside the linear/conv modules" in n for n in adapter.notes)


def test_a_text_encoder_component_folder_is_placed_by_its_names_and_shapes(tmp_path, lab):
    from conftest import random_modules, select

    te = random_modules(lab, select(lab, "self_attn.q_proj", component="text_encoder."), rank=2, seed=3)
    folder = full_models.component_folder(tmp_path / "renamed", (te, 1.0), component="text_encoder")
    adapter = read_full_model(folder, resolve_base("lab"), lab, energy=1.0)
    assert adapter.update.checkpoint.components == ("text_encoder",)
    assert set(adapter.modules) == set(te)
    for name, m in te.items():
        np.testing.assert_allclose(adapter.modules[name].delta(), m.delta(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# original names: checked against diffusers' own conversion of original checkpoints


def test_original_unet_and_clip_names_round_trip_through_diffusers_conversion():
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    names = full_models.original_names()
    unet, te = full_models.lab_tensors("unet"), full_models.lab_tensors("text_encoder")
    config = json.loads((lab_pipeline_path() / "unet" / "config.json").read_text())
    ldm = {names[canonical_name("unet", k)]: torch.from_numpy(v) for k, v in unet.items()}
    converted = convert_ldm_unet_checkpoint(ldm, config)
    assert set(converted) == set(unet)
    for key, value in unet.items():
        np.testing.assert_array_equal(converted[key].numpy(), value)
    clip = convert_ldm_clip_checkpoint({names[canonical_name("text_encoder", k)]: torch.from_numpy(v)
                                        for k, v in te.items()})
    assert {canonical_name("text_encoder", k) for k in clip} == {canonical_name("text_encoder", k) for k in te}


@pytest.mark.parametrize("arch_name", ["sd15", "sd2", "sdxl"])
def test_every_real_size_unet_tensor_has_the_original_name_diffusers_converts_back(arch_name):
    """Key level, on the meta device: SD1.5, SD2 and SDXL UNets (norms, shortcuts, samplers, SDXL's label_emb)."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from auditkit.models.build import load_config

    arch = architectures.get(arch_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_config(arch_name)["unet"])
    keys = list(unet.state_dict())
    ldm = {}
    for key in keys:
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{sgm_name(module, arch.unet_layout)}.{param}"] = torch.zeros(1)
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(keys)


# --------------------------------------------------------------------------------------------
# bad inputs: one line naming the file, exit code 2 (BadInput), never unpickled


class _Boom:
    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path, lab, suffix):
    boom = _Boom()
    boom.marker = tmp_path / "unpickled"
    path = tmp_path / f"erased{suffix}"
    path.write_bytes(pickle.dumps(boom))
    with pytest.raises(BadInput, match="pickle") as exc:
        read_full_model(path, resolve_base("lab"), lab)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert not boom.marker.exists()


def test_a_folder_with_only_pickle_weights_is_refused_naming_them(tmp_path, lab):
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(lab_pipeline_path() / "unet" / "config.json", folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BadInput, match=r"diffusion_pytorch_model\.bin: pickle"):
        read_full_model(folder, resolve_base("lab"), lab)


def test_a_pipeline_folder_missing_a_component_is_refused_naming_it(tmp_path, lab):
    folder = shutil.copytree(lab_pipeline_path(), tmp_path / "erased")
    shutil.rmtree(folder / "unet")
    with pytest.raises(BadInput, match="component 'unet' is missing") as exc:
        read_full_model(folder, resolve_base("lab"), lab)
    assert str(folder) in str(exc.value)


def test_a_component_that_does_not_render_may_be_absent(tmp_path, lab, safety_u):
    """A base saved with a safety checker, an erased pipeline saved without one: nothing is missing."""
    base = shutil.copytree(lab_pipeline_path(), tmp_path / "base")
    shutil.copytree(base / "vae", base / "safety_checker")
    index = json.loads((base / "model_index.json").read_text())
    index["safety_checker"] = ["diffusers", "AutoencoderKL"]
    (base / "model_index.json").write_text(json.dumps(index))
    erased = full_models.pipeline_folder(tmp_path / "erased", (safety_u, 1.0))
    adapter = read_full_model(erased, resolve_base(str(base)), lab)
    assert set(adapter.modules) == set(safety_u)


def test_a_pipeline_whose_index_does_not_list_a_component_is_refused(tmp_path, lab):
    folder = shutil.copytree(lab_pipeline_path(), tmp_path / "erased")
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput, match="component 'text_encoder' is missing"):
        read_full_model(folder, resolve_base("lab"), lab)


def test_a_component_the_base_lacks_is_left_out_and_said(tmp_path, lab, safety_u):
    folder = full_models.pipeline_folder(tmp_path / "erased", (safety_u, 1.0))
    shutil.copytree(folder / "vae", folder / "safety_checker")
    index = json.loads((folder / "model_index.json").read_text())
    index["safety_checker"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index))
    adapter = read_full_model(folder, resolve_base("lab"), lab)
    assert "safety_checker" not in adapter.update.checkpoint.components and adapter.coverage.fraction == 1.0
    assert any("safety_checker are not in the base" in n for n in adapter.notes)


def test_a_pipeline_of_another_family_is_refused(tmp_path, lab):
    folder = shutil.copytree(lab_pipeline_path(), tmp_path / "xl")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput, match="of another family than the base"):
        read_full_model(folder, resolve_base("lab"), lab)


def test_a_shape_mismatch_is_refused_naming_the_tensor(tmp_path, lab):
    tensors = full_models.lab_tensors("unet")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    tensors[key] = np.zeros((tensors[key].shape[0], 7), np.float32)
    path = tmp_path / "unet.safetensors"
    path.write_bytes(serialize(tensors))
    with pytest.raises(BadInput, match=rf"unet\.{key} is \[32, 7\] here but \[32, 64\] in the base: a model of "
                                       "another architecture"):
        read_full_model(path, resolve_base("lab"), lab)


def test_a_unet_of_another_architecture_is_refused(tmp_path, lab):
    """SD1.5-shaped UNet names (wider layers, more blocks) against the lab base."""
    sd15 = architectures.get("sd15")
    tensors = {f"{n.split('.', 1)[1]}.weight": np.zeros((2, 2), np.float32) for n in sd15.modules
               if n.startswith("unet.down_blocks.0.resnets")}
    tensors["down_blocks.0.resnets.0.conv1.weight"] = np.zeros((320, 320, 3, 3), np.float16)
    path = tmp_path / "sd15-unet.safetensors"
    path.write_bytes(serialize(tensors))
    with pytest.raises(BadInput, match="another architecture than the base"):
        read_full_model(path, resolve_base("lab"), lab)


def test_a_folder_that_is_no_model_is_refused(tmp_path, lab):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="neither a diffusers pipeline folder"):
        read_full_model(tmp_path / "empty", resolve_base("lab"), lab)


@pytest.mark.parametrize("tamper", ["missing", "integer"])
def test_a_module_weight_missing_or_not_float_lowers_coverage_and_is_named(tmp_path, lab, tamper):
    # issue 26 M18: such a module counted as "unchanged" at 100% coverage
    tensors = full_models.lab_tensors("unet")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    if tamper == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key].astype(np.int32)
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(lab_pipeline_path() / "unet" / "config.json", folder)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(serialize(tensors))
    adapter = read_full_model(folder, resolve_base("lab"), lab)
    assert adapter.coverage.fraction < 1 and f"unet.{key}" in adapter.coverage.unmapped
    assert f"unet.{key[:-len('.weight')]}" not in adapter.update.unchanged
    assert any("missing or not floating-point" in n and f"unet.{key}" in n for n in adapter.notes), adapter.notes


def test_an_adapter_given_as_a_full_model_is_named_as_an_adapter(lab):  # issue 26 L9: was "another architecture"
    with pytest.raises(BadInput, match="its keys are a LoRA adapter's, not a full model's") as err:
        read_full_model(full_models.SAFETY_U, resolve_base("lab"), lab)
    assert "another architecture" not in str(err.value)
