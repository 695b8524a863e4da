"""Flux.1 full checkpoints in BFL's original single-file layout (``double_blocks.N.img_attn.qkv.weight``, …):
read by canonical name with the fused tensors split by rows, checked against diffusers' own converter
(``convert_flux_transformer_checkpoint_to_diffusers``) on the shipped DiT lab's shapes.

The BFL file's names and shapes are written here from BFL's model (not from auditkit's mapping); diffusers'
converter is the reference for what each canonical tensor holds. The converter hard-codes Flux.1's width
(3072) for the single blocks' split, so it runs here with that one constant set to the lab's width."""

import inspect
import json
import shutil

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.lab.bases import LAB_BASES
from auditkit.lora.io import open_safetensors, serialize
from auditkit.models import architectures
from auditkit.models.base import resolve_base
from auditkit.models.checkpoint import open_checkpoint
from auditkit.models.difference import open_base, read_full_model
from auditkit.repair.pack import checkpoint_snippet

pytestmark = pytest.mark.skipif(not LAB_BASES["lab-dit"].available(), reason="the DiT lab is not installed")

PREFIXES = ["", "model.diffusion_model."]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def dit_config() -> dict:
    return json.loads((LAB_BASES["lab-dit"].path() / "transformer" / "config.json").read_text())


def bfl_shapes(config: dict, guidance: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of a BFL Flux.1 transformer (flux/model.py, flux/modules/layers.py) of this config."""
    heads, head = config["num_attention_heads"], config["attention_head_dim"]
    d, mlp = heads * head, 4 * heads * head  # hidden size, mlp_ratio 4
    out = (config["out_channels"] or config["in_channels"]) * config["patch_size"] ** 2
    shapes = {}

    def linear(name, rows, cols):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (rows, cols), (rows,)

    linear("img_in", d, config["in_channels"] * config["patch_size"] ** 2)
    linear("txt_in", d, config["joint_attention_dim"])
    embedders = ("time_in", "vector_in", "guidance_in") if guidance else ("time_in", "vector_in")
    for embedder, width in zip(embedders, (256, config["pooled_projection_dim"], 256), strict=False):
        linear(f"{embedder}.in_layer", d, width)
        linear(f"{embedder}.out_layer", d, d)
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            linear(f"{b}_mod.lin", 6 * d, d)
            linear(f"{b}_attn.qkv", 3 * d, d)
            linear(f"{b}_attn.proj", d, d)
            linear(f"{b}_mlp.0", mlp, d)
            linear(f"{b}_mlp.2", d, mlp)
            shapes[f"{b}_attn.norm.query_norm.scale"] = shapes[f"{b}_attn.norm.key_norm.scale"] = (head,)
    for i in range(config["num_single_layers"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * d + mlp, d)
        linear(f"{b}.linear2", d, d + mlp)
        linear(f"{b}.modulation.lin", 3 * d, d)
        shapes[f"{b}.norm.query_norm.scale"] = shapes[f"{b}.norm.key_norm.scale"] = (head,)
    linear("final_layer.linear", out, d)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    return shapes


def random_bfl(config: dict, guidance: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in bfl_shapes(config, guidance).items()}


def diffusers_conversion(bfl: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """diffusers' own converter on ``bfl``, its hard-coded Flux.1 width (3072) set to ``width``; every key
    of ``bfl`` must be consumed."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders import single_file_utils

    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert source.count("inner_dim = 3072") == 1  # the converter changed: look at it again
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)  # noqa: S102 - diffusers' own code
    state = {k: torch.from_numpy(v.copy()) for k, v in bfl.items()}
    converted = namespace["convert_flux_transformer_checkpoint_to_diffusers"](state)
    assert state == {}  # the converter took every tensor the BFL file has
    return {k: v.numpy() for k, v in converted.items()}


def write_bfl(path, tensors: dict[str, np.ndarray], prefix: str = ""):
    path.write_bytes(serialize({prefix + k: v for k, v in tensors.items()}))
    return path


def base_with(tmp_path, transformer: dict[str, np.ndarray], **config):
    """A copy of the DiT lab pipeline whose transformer holds ``transformer`` (diffusers names)."""
    folder = shutil.copytree(LAB_BASES["lab-dit"].path(), tmp_path / "base")
    (folder / "transformer" / WEIGHTS).write_bytes(serialize(transformer))
    if config:
        (folder / "transformer" / "config.json").write_text(json.dumps({**dit_config(), **config}))
    return folder


@pytest.fixture(scope="module")
def dit():
    config = dit_config()
    return config, config["num_attention_heads"] * config["attention_head_dim"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_canonical_tensor_is_what_diffusers_converter_makes_of_the_bfl_file(tmp_path, dit, prefix):
    config, width = dit
    bfl = random_bfl(config)
    reference = diffusers_conversion(bfl, width)
    base = open_base(resolve_base("lab-dit"))
    stored = open_safetensors(LAB_BASES["lab-dit"].path() / "transformer" / WEIGHTS).tensors
    assert {k: tuple(v.shape) for k, v in reference.items()} == {k: t.shape for k, t in stored.items()}

    ckpt = open_checkpoint(write_bfl(tmp_path / "flux.safetensors", bfl, prefix), base=base)
    assert ckpt.naming == "original" and ckpt.components == ("transformer",)
    assert ckpt.unmapped == [] and ckpt.ignored == [] and ckpt.notes == []
    assert set(ckpt.tensors) == {f"transformer.{k}" for k in reference}
    for key, value in reference.items():
        name = f"transformer.{key}"
        assert ckpt.tensors[name].shape == value.shape == base.tensors[name].shape, key
        np.testing.assert_array_equal(ckpt.array(name), value, err_msg=key)
    assert not np.array_equal(ckpt.array("transformer.norm_out.linear.weight"),
                              bfl["final_layer.adaLN_modulation.1.weight"])  # swapped halves, not a rename


def test_a_bfloat16_bfl_file_reads_as_diffusers_converter_makes_it(tmp_path, dit):
    """BFL publishes Flux.1 in bfloat16: each share of a fused tensor is decoded from its own rows."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    config, width = dit
    bfl = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in random_bfl(config, seed=3).items()}
    reference = diffusers_conversion({k: v.float().numpy() for k, v in bfl.items()}, width)  # bf16 values, exact
    path = tmp_path / "flux-bf16.safetensors"
    save_file(bfl, str(path))
    ckpt = open_checkpoint(path, base=open_base(resolve_base("lab-dit")))
    assert set(ckpt.tensors) == {f"transformer.{k}" for k in reference} and ckpt.unmapped == []
    for key, value in reference.items():
        np.testing.assert_array_equal(ckpt.array(f"transformer.{key}"), value, err_msg=key)


def test_a_schnell_file_against_a_schnell_base_and_a_dev_file_against_it(tmp_path, dit):
    """No guidance embedder (FLUX.1-schnell): nothing of it is looked for; a dev file's guidance_in tensors,
    which such a base lacks, are unmapped, never dropped."""
    config, width = dit
    schnell = random_bfl(config, guidance=False)
    reference = diffusers_conversion(schnell, width)
    folder = base_with(tmp_path, reference, guidance_embeds=False)
    base = open_checkpoint(folder)
    ckpt = open_checkpoint(write_bfl(tmp_path / "schnell.safetensors", schnell), base=base)
    assert set(ckpt.tensors) == {f"transformer.{k}" for k in reference} and ckpt.unmapped == []
    for key, value in reference.items():
        np.testing.assert_array_equal(ckpt.array(f"transformer.{key}"), value, err_msg=key)
    dev = open_checkpoint(write_bfl(tmp_path / "dev.safetensors", random_bfl(config)), base=base)
    assert dev.unmapped == sorted(k for k in bfl_shapes(config) if k.startswith("guidance_in."))
    assert set(dev.tensors) == set(ckpt.tensors)


def test_the_difference_to_the_base_is_exactly_the_tensors_changed_in_the_bfl_file(tmp_path, dit):
    """An erased model in BFL layout made from a base: changes inside fused tensors land on the right canonical
    tensors (k of img_attn.qkv, the MLP rows of a single block's linear1, norm_out's shift half) and nowhere else."""
    config, width = dit
    bfl = random_bfl(config, seed=1)
    folder = base_with(tmp_path, diffusers_conversion(bfl, width))
    rng = np.random.default_rng(2)
    erased = {k: v.copy() for k, v in bfl.items()}
    d = width
    k_rows = rng.standard_normal((d, d)).astype(np.float32)
    erased["double_blocks.1.img_attn.qkv.weight"][d:2 * d] += k_rows
    mlp_rows = rng.standard_normal((4 * d, d)).astype(np.float32)
    erased["single_blocks.0.linear1.weight"][3 * d:] += mlp_rows
    erased["single_blocks.0.linear1.bias"][d:2 * d] += 1.0  # single block 0's to_k bias
    erased["final_layer.adaLN_modulation.1.weight"][:d] += 0.5  # BFL's shift: diffusers' second half
    erased["double_blocks.0.txt_attn.norm.key_norm.scale"] += 0.25
    path = write_bfl(tmp_path / "erased.safetensors", erased, "model.diffusion_model.")

    adapter = read_full_model(path, resolve_base(str(folder)), architectures.get("lab-dit"), energy=1.0)
    deltas = adapter.update.deltas()
    assert set(deltas) == {"transformer.transformer_blocks.1.attn.to_k.weight",
                           "transformer.single_transformer_blocks.0.proj_mlp.weight",
                           "transformer.single_transformer_blocks.0.attn.to_k.bias",
                           "transformer.norm_out.linear.weight",
                           "transformer.transformer_blocks.0.attn.norm_added_k.weight"}
    np.testing.assert_allclose(deltas["transformer.transformer_blocks.1.attn.to_k.weight"], k_rows, atol=1e-5)
    np.testing.assert_allclose(deltas["transformer.single_transformer_blocks.0.proj_mlp.weight"], mlp_rows,
                               atol=1e-5)
    np.testing.assert_allclose(deltas["transformer.single_transformer_blocks.0.attn.to_k.bias"], 1.0, atol=1e-5)
    norm_out = deltas["transformer.norm_out.linear.weight"]
    np.testing.assert_array_equal(norm_out[:d], 0.0)
    np.testing.assert_allclose(norm_out[d:], 0.5, atol=1e-5)
    np.testing.assert_allclose(deltas["transformer.transformer_blocks.0.attn.norm_added_k.weight"], 0.25, atol=1e-6)
    assert set(adapter.modules) == {"transformer.transformer_blocks.1.attn.to_k",
                                    "transformer.single_transformer_blocks.0.proj_mlp",
                                    "transformer.norm_out.linear"}
    assert sorted(adapter.update.outside) == ["transformer.single_transformer_blocks.0.attn.to_k.bias",
                                      "transformer.transformer_blocks.0.attn.norm_added_k.weight"]
    assert adapter.coverage.fraction == 1.0 and adapter.coverage.unmapped == []
    assert 'type(pipe.transformer).from_single_file(' in checkpoint_snippet(adapter.update.checkpoint, str(folder),
                                                                            "FluxPipeline")


def test_real_flux1_names_and_shapes_are_what_diffusers_unmodified_converter_makes():
    """Key and shape level on the meta device, at FLUX.1-dev's real size (width 3072, 19 + 38 blocks), with
    the converter as it is: every BFL tensor placed, nothing else, each canonical tensor of its shape."""
    pytest.importorskip("torch")
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from full_models import assert_original_layout_places_like_diffusers

    from auditkit.models.build import load_config

    assert_original_layout_places_like_diffusers(FluxTransformer2DModel, load_config("flux")["denoiser"]["config"],
                                                 bfl_shapes, convert_flux_transformer_checkpoint_to_diffusers,
                                                 PREFIXES)


def sd3_base(tmp_path):
    pytest.importorskip("torch")
    from tiny_pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path / "sd3")


@pytest.mark.parametrize("base", ["lab", "sd3"])
def test_a_bfl_file_against_a_base_that_is_no_flux_model_is_refused_in_one_line(tmp_path, dit, base):

    folder = sd3_base(tmp_path) if base == "sd3" else resolve_base("lab").folder
    path = write_bfl(tmp_path / "flux.safetensors", random_bfl(dit[0]), "model.diffusion_model.")
    with pytest.raises(BadInput, match="another architecture than the base") as exc:
        open_checkpoint(path, base=open_checkpoint(folder))
    message = str(exc.value)
    assert str(path) in message and "\n" not in message
    assert "FluxTransformer2DModel in its original layout (double_blocks, single_blocks)" in message


def test_a_fused_tensor_of_another_width_is_refused_naming_it(tmp_path, dit):
    bfl = random_bfl(dit[0])
    bfl["single_blocks.1.linear1.weight"] = bfl["single_blocks.1.linear1.weight"][:-8]
    path = write_bfl(tmp_path / "flux.safetensors", bfl)
    with pytest.raises(BadInput, match=r"single_blocks\.1\.linear1\.weight is \[888, 128\] here but .* 896 rows"):
        open_checkpoint(path, base=open_base(resolve_base("lab-dit")))
