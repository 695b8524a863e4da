"""Adapters against the base they are scanned with: an adapter for another model is refused, in one line
naming both architectures, before any model loads (issue 26 M1: the rule for scan, dynamic scan, repair, --arch)."""

from importlib import resources
from pathlib import Path

import pytest
from conftest import assert_one_line_error, random_modules, select

import auditkit
from auditkit.errors import BadInput
from auditkit.inputs import read_input, read_pair
from auditkit.lora import formats
from auditkit.lora.write import save_adapter
from auditkit.models.base import resolve_base

ADAPTERS = Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters")))
LAB_SAFETY = ADAPTERS / "safety-esd-u-destructive.safetensors"


@pytest.fixture()
def no_model_loads(monkeypatch):
    import auditkit.dynamic

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(auditkit.dynamic, "load_base", refuse)


@pytest.fixture()
def sd15_pair(tmp_path, sd15):
    names = select(sd15, ".attn2.to_k", ".attn2.to_v")[:4]
    return tuple(save_adapter(random_modules(sd15, names, seed=s), tmp_path / f"{n}.safetensors", sd15)
                 for s, n in ((1, "jailbreak"), (2, "safety")))


@pytest.mark.parametrize("with_safety", [True, False])
def test_sd15_adapters_on_the_lab_base_are_refused_before_any_model_loads(tmp_path, sd15_pair, no_model_loads,
                                                                          with_safety):  # issue 26 M1
    cand, safety = sd15_pair
    config = auditkit.ScanConfig(candidate=cand, safety=safety if with_safety else None, base="lab",
                                 out=tmp_path / "r")
    with pytest.raises(BadInput) as err:
        auditkit.scan(config)
    text = str(err.value)
    assert "\n" not in text and "adapts sd15" in text and "another architecture than --base lab (lab:" in text, text
    assert not (tmp_path / "r").exists()


def test_a_lab_adapter_on_the_dit_lab_is_refused_by_the_static_scan_too(tmp_path, no_model_loads):  # issue 26 M1
    config = auditkit.ScanConfig(candidate=LAB_SAFETY, safety=LAB_SAFETY, base="lab-dit", static_only=True,
                                 out=tmp_path / "r")
    assert_one_line_error(lambda: auditkit.scan(config), LAB_SAFETY, "adapts lab")
    assert not (tmp_path / "r").exists()


def test_an_arch_that_is_not_the_bases_is_refused(tmp_path, no_model_loads):  # issue 26 M1: --arch too
    config = auditkit.ScanConfig(candidate=LAB_SAFETY, base="lab-dit", arch="lab", out=tmp_path / "r")
    assert_one_line_error(lambda: auditkit.scan(config), LAB_SAFETY,
                          "another architecture than --base lab-dit (lab-dit:")


def test_repair_reads_its_pair_against_the_base(sd15_pair):  # issue 26 M1: repair.run reads with read_pair
    cand, safety = sd15_pair
    assert_one_line_error(lambda: read_pair(cand, safety, base=resolve_base("lab")), safety, "adapts sd15")


def test_the_base_settles_which_model_an_ambiguous_adapter_adapts(tmp_path, sd15, sdxl):  # issue 26 M1
    names = [n for n in sd15.modules if n.startswith("text_encoder.") and n.endswith("self_attn.q_proj")][:2]
    path = save_adapter(random_modules(sd15, names), tmp_path / "te.safetensors", sd15, formats.DIFFUSERS)
    adapter = read_input(path, "candidate", base=resolve_base("an-sdxl-folder"), base_arch=sdxl)
    assert adapter.architecture.name == "sdxl" and not any("several" in n for n in adapter.notes)
