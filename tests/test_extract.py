"""`auditkit extract`: a full model's update as a LoRA, checked against the dense difference."""


import numpy as np
import pytest
from conftest import run_cli

from auditkit.errors import BadInput, Unscannable
from auditkit.extract import extract
from auditkit.lab.model import lab_pipeline_available, lab_pipeline_path
from auditkit.lora.adapter import read_adapter
from auditkit.models.base import resolve_base

LAB = resolve_base("lab")

pytestmark = pytest.mark.skipif(not lab_pipeline_available(), reason="the lab pipeline is not installed")
full_models = pytest.importorskip("full_models")


@pytest.fixture(scope="module")
def erased(tmp_path_factory):
    """The ESD-u Safety LoRA merged into the lab UNet (a component folder), and the dense differences."""
    from auditkit.models.architectures import canonical_name

    folder = full_models.component_folder(tmp_path_factory.mktemp("erased") / "unet",
                                          (read_adapter(full_models.SAFETY_U).modules, 1.0))
    base, merged = full_models.lab_tensors("unet"), full_models.merged("unet", (read_adapter(
        full_models.SAFETY_U).modules, 1.0))
    dense = {}
    for key, value in merged.items():
        d = value.astype(np.float64) - base[key].astype(np.float64)
        if key.endswith(".weight") and d.ndim >= 2 and d.any():
            dense[canonical_name("unet", key[: -len(".weight")])] = d.reshape(d.shape[0], -1)
    return folder, dense


def test_full_rank_reproduces_the_dense_difference(erased, tmp_path):
    folder, dense = erased
    result = extract(folder, LAB, tmp_path / "safety.safetensors", energy=1.0)
    lora = read_adapter(result.path)
    assert set(lora.modules) == set(dense) and result.modules == len(dense)
    for name, d in dense.items():
        np.testing.assert_allclose(lora.modules[name].delta(), d, rtol=0, atol=1e-6 * np.abs(d).max())


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_energy_mode_keeps_at_least_the_stated_energy_per_module(erased, tmp_path, energy):
    folder, dense = erased
    result = extract(folder, LAB, tmp_path / "safety.safetensors", energy=energy)
    lora = read_adapter(result.path)
    for name, d in dense.items():
        kept = np.sum(lora.modules[name].delta() ** 2) / np.sum(d**2)
        assert kept >= energy - 1e-6, (name, kept)  # float32 factors
    assert result.min_energy_kept >= energy
    assert max(result.ranks) <= 4  # the safety LoRA's rank: the merged difference holds no more (above rounding)


def test_fixed_rank(erased, tmp_path):
    folder, _ = erased
    result = extract(folder, LAB, tmp_path / "r1.safetensors", rank=1)
    assert {m.rank for m in read_adapter(result.path).modules.values()} == {1} and result.ranks == [1]
    assert result.metadata["auditkit.extract.rank"] == "1" and "auditkit.extract.energy" not in result.metadata


def test_metadata_says_how_it_was_made(erased, tmp_path):
    from auditkit import __version__
    from auditkit.models.difference import open_base

    folder, _ = erased
    result = extract(folder, LAB, tmp_path / "safety.safetensors")
    meta = read_adapter(result.path).metadata
    assert meta["auditkit.version"] == __version__ and meta["auditkit.kind"] == "extracted"
    assert meta["auditkit.extract.source"] == folder.name  # issue 26 L10: no local absolute path, the name only
    assert meta["auditkit.extract.source_form"] == "component folder"
    assert meta["auditkit.extract.base"] == "lab" and meta["auditkit.extract.base_sha256"] == open_base(LAB).sha256
    assert meta["auditkit.extract.energy"] == "0.99" and float(meta["auditkit.extract.min_energy_kept"]) >= 0.99
    assert len(meta["auditkit.extract.source_sha256"]) == 64


def test_diffusers_loads_the_extracted_lora_as_the_erased_model(erased, tmp_path):
    pytest.importorskip("diffusers")
    from auditkit.lab.model import load_lab_pipeline

    folder, _ = erased
    result = extract(folder, LAB, tmp_path / "safety.safetensors", energy=1.0)
    pipe = load_lab_pipeline()
    pipe.load_lora_weights(str(result.path), adapter_name="extracted")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    merged = full_models.merged("unet", (read_adapter(full_models.SAFETY_U).modules, 1.0))
    for key, value in merged.items():
        np.testing.assert_allclose(fused[key].numpy(), value, atol=1e-5 * max(1.0, np.abs(value).max()))


def test_the_extracted_lora_scans_like_the_erased_model(erased, tmp_path):
    from auditkit.scan import run_static_scan

    folder, _ = erased
    lora = extract(folder, LAB, tmp_path / "safety.safetensors").path
    a = run_static_scan(full_models.SAFETY_U, lora)
    b = run_static_scan(full_models.SAFETY_U, folder, base=resolve_base("lab"))
    assert a.findings.cancellation == pytest.approx(b.findings.cancellation, abs=1e-6)
    assert a.findings.cancellation == pytest.approx(-1.0, abs=0.02)  # ESD-u against itself: reinforces fully


# --------------------------------------------------------------------------------------------
# bad inputs: one line, nothing written


def test_a_model_equal_to_the_base_has_nothing_to_extract(tmp_path):
    out = tmp_path / "none.safetensors"
    with pytest.raises(Unscannable, match="no update to extract"):
        extract(lab_pipeline_path(), LAB, out)
    assert not out.exists()


@pytest.mark.parametrize("out_name", ["lora.ckpt", "unet/inside.safetensors"])
def test_bad_outputs_are_refused_before_any_work(erased, tmp_path, out_name):
    folder, _ = erased
    out = tmp_path / out_name if not out_name.startswith("unet/") else folder / "inside.safetensors"
    with pytest.raises(BadInput, match="output"):
        extract(folder, LAB, out)
    assert not out.exists()



def test_no_local_path_is_written_into_the_metadata(erased, tmp_path, monkeypatch):
    # issue 26 L10: auditkit.extract.source/base held local absolute paths (a shared LoRA leaked them)
    import auditkit.models.base
    from auditkit.models import architectures

    monkeypatch.setattr(auditkit.models.base, "architecture_of_folder",
                        lambda folder, **kw: architectures.get("lab"))  # fast
    folder, _ = erased
    base = tmp_path / "private" / "my-base"
    base.parent.mkdir()
    base.symlink_to(lab_pipeline_path())
    meta = read_adapter(extract(folder, resolve_base(str(base)), tmp_path / "s.safetensors").path).metadata
    assert meta["auditkit.extract.source"] == "unet" and meta["auditkit.extract.base"] == "my-base"
    assert not any(str(tmp_path) in v or "/" in v for k, v in meta.items() if k.startswith("auditkit.extract."))


@pytest.mark.parametrize("where", ["a file", "read-only"])
def test_an_unwritable_out_is_refused_before_any_work(erased, tmp_path, monkeypatch, where):
    # issue 26 M11: `extract … --out ro/o.safetensors` failed after the work (an internal error)
    import os

    import auditkit.models.difference

    folder, _ = erased
    if where == "a file":
        (tmp_path / "ro").write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setattr(auditkit.models.difference, "read_full_model",
                        lambda *a, **k: pytest.fail("the work started before --out was checked"))
    out = tmp_path / "ro" / "o.safetensors"
    with pytest.raises(BadInput, match="cannot write here") as exc:
        extract(folder, LAB, out)
    assert str(exc.value).startswith(str(out)) and "\n" not in str(exc.value)


def test_cli_writes_the_lora_and_says_what_it_kept(erased, tmp_path):
    folder, dense = erased
    res = run_cli("extract", folder, "--base", "lab", "--out", tmp_path / "s.safetensors", "--energy", "0.95")
    assert res.returncode == 0, res.stderr
    assert f"{len(dense)} modules written (energy 0.95" in " ".join(res.stdout.split())
    assert (tmp_path / "s.safetensors").is_file()


@pytest.mark.parametrize("args", [["--energy", "0.9", "--rank", "2"], ["--energy", "1.5"], ["--rank", "0"]])
def test_cli_refuses_bad_settings_in_one_line(erased, tmp_path, args):
    folder, _ = erased
    res = run_cli("extract", folder, "--base", "lab", "--out", tmp_path / "s.safetensors", *args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s.safetensors").exists()


def test_cli_refuses_a_pickle_model_without_unpickling_it(tmp_path):
    model = tmp_path / "erased.ckpt"
    model.write_bytes(b"\x80\x04K\x01.")
    res = run_cli("extract", model, "--base", "lab", "--out", tmp_path / "s.safetensors")
    assert res.returncode == 2 and "pickle" in res.stderr and str(model) in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.safetensors").exists()
