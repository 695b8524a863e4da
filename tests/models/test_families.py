"""The model-family registry: detection from model_index.json and from loaded pipelines, records that name
real classes and functions, one module per family, and a registry that imports no torch."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from auditkit.errors import BadInput
from auditkit.models.families import FAMILIES, family_of_folder, family_of_pipeline

PIPELINE_FAMILIES = [f for f in FAMILIES.values() if f.pipeline_class]


@pytest.mark.parametrize("family", PIPELINE_FAMILIES, ids=lambda f: f.name)
def test_every_record_names_a_real_pipeline_class_conditioning_and_denoising(family):
    from auditkit.lora import formats
    from auditkit.models.denoising import Denoising

    diffusers = pytest.importorskip("diffusers")
    assert family.pipeline_class in family.class_names and hasattr(diffusers, family.pipeline_class)
    assert callable(family.conditioning) and (family.render_options is None or callable(family.render_options))
    assert isinstance(family.denoising, Denoising)
    assert family.lora_components[0] == family.denoiser
    assert set(family.native_layouts) <= set(formats.LAYOUTS)
    assert set(family.kohya_prefixes) <= set(family.text_encoders)
    pipeline = getattr(diffusers, family.pipeline_class)
    # the record says what diffusers has: a pipeline without a LoRA loader mixin loads through its denoiser's PEFT mixin
    assert family.loras_through_denoiser == (not hasattr(pipeline, "load_lora_weights"))
    assert family.guider is None or family.guider in inspect.signature(pipeline.__init__).parameters


def test_every_family_is_one_module_of_the_family_package_and_its_tables_are_the_builtin_architectures():
    from auditkit.models import architectures, build
    from auditkit.models.families import MODULES

    assert [m.FAMILY for m in MODULES] == list(FAMILIES.values())
    assert all(m.__name__ == f"auditkit.models.family.{m.__name__.rsplit('.', 1)[1]}" for m in MODULES)
    tables = [t for f in FAMILIES.values() for t in f.tables]
    assert len(set(tables)) == len(tables) and architectures.BUILTIN == (*tables, "lab", "lab-dit")
    assert build.CONFIG_NAMES == tuple(tables)
    # a family known to the static scan only (none since HunyuanVideo 1.5 loads) declares nothing of a pipeline
    static = [f for f in FAMILIES.values() if not f.pipeline_class]
    assert all(not f.class_names and f.conditioning is None and f.denoising is None for f in static)


def test_the_registry_and_the_architecture_tables_import_no_torch_or_diffusers():
    code = ("import sys; import auditkit.models.families, auditkit.models.architectures, auditkit.models.build; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[2])  # this tree's auditkit, whatever is installed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_subclass_of_a_family_pipeline_is_that_family():
    class StableDiffusionXLPipeline:  # stands for diffusers' class: matching is by class name
        pass

    class MyPipeline(StableDiffusionXLPipeline):
        pass

    assert family_of_pipeline(MyPipeline()) is FAMILIES["sdxl"]
    with pytest.raises(BadInput, match="pipeline class 'object' is not supported"):
        family_of_pipeline(object())


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"unet": ["diffusers", "UNet2DConditionModel"]}', "no pipeline class"),
    ('{"_class_name": "KandinskyPipeline"}',
     "'KandinskyPipeline' is not supported; supported: .*FluxPipeline, .*StableDiffusion"),
])
def test_a_model_index_that_names_no_known_family_is_refused_in_one_line(tmp_path, text, match):
    (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(BadInput, match=match) as err:
        family_of_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_a_folder_without_model_index_is_not_a_pipeline(tmp_path):
    with pytest.raises(BadInput, match="no model_index.json"):
        family_of_folder(tmp_path)


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"), "nested deeper than 64 levels"),  # M3
    (lambda p: p.mkdir(), "not a regular file"),  # issue 26: read_bounded, never an IsADirectoryError
    (lambda p: p.write_text(" " * (1 << 20) + "{}"), "larger than 1 MiB"),
])
def test_a_hostile_model_index_is_refused_in_one_line(tmp_path, make, match):  # issue 26 M3
    from conftest import assert_one_line_error

    make(tmp_path / "model_index.json")
    assert_one_line_error(lambda: family_of_folder(tmp_path), tmp_path / "model_index.json", match)


def test_a_deep_component_config_is_refused_in_one_line(tmp_path):  # issue 26 M3: diffusers' reader recursed
    from conftest import assert_one_line_error

    from auditkit.models.pipeline import architecture_of_folder

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_one_line_error(lambda: architecture_of_folder(tmp_path), tmp_path / "unet" / "config.json",
                          "nested deeper than 64 levels")


def test_the_padded_prompt_length_is_the_pipelines_limit_or_the_tokenizers_shorter_one():
    from types import SimpleNamespace

    from auditkit.models.conditioning import padded_length

    def tok(n):
        return SimpleNamespace(model_max_length=n)

    assert padded_length(tok(77), 512) == 77 and padded_length(tok(10**30), 512) == 512  # transformers' "no limit"
    assert padded_length(SimpleNamespace(), 512) == 512 and padded_length(tok(None), 512) == 512
    assert padded_length(tok(0), 512) == 512
    # Qwen-Image: the template's system-prompt tokens are cut off after encoding
    assert padded_length(tok(1024 + 34), 1024, 34) == 1024 and padded_length(tok(100), 1024, 34) == 66
    assert padded_length(tok(34), 1024, 34) == 1024
