"""SD3/SD3.5 full checkpoints in SAI's original single-file layout (``joint_blocks.N.x_block.attn.qkv.weight``,
``pos_embed``, …): read by canonical name with the fused tensors split by rows, checked against diffusers' own
converter (``convert_sd3_transformer_checkpoint_to_diffusers``, which hard-codes no width) on the tiny
SD3.5-Medium-like pipeline (a second image attention in block 0, RMS q/k norms, a context-pre-only last
block whose two-chunk modulation is swapped) and, names and shapes, at the real models' sizes.

The SAI file's names and shapes are written here from SAI's MMDiT (not from auditkit's mapping)."""

import json
import shutil

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.lora.io import serialize
from auditkit.models.base import resolve_base
from auditkit.models.checkpoint import open_checkpoint
from auditkit.models.difference import read_full_model
from auditkit.models.pipeline import architecture_of_folder
from auditkit.repair.pack import checkpoint_snippet

torch = pytest.importorskip("torch")

PREFIXES = ["", "model.diffusion_model."]
WEIGHTS = "diffusion_pytorch_model.safetensors"


def sai_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of SAI's MMDiT (sd3/mmditx.py) of this diffusers config."""
    head = config["attention_head_dim"]
    d, p = config["num_attention_heads"] * head, config["patch_size"]
    out = config["out_channels"] or config["in_channels"]
    dual, n = tuple(config.get("dual_attention_layers") or ()), config["num_layers"]
    shapes = {"pos_embed": (1, config["pos_embed_max_size"] ** 2, d),
              "x_embedder.proj.weight": (d, config["in_channels"], p, p), "x_embedder.proj.bias": (d,)}

    def linear(name, rows, cols):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (rows, cols), (rows,)

    def attention(name, proj=True):
        linear(f"{name}.qkv", 3 * d, d)
        if proj:
            linear(f"{name}.proj", d, d)
        if config.get("qk_norm"):
            shapes[f"{name}.ln_q.weight"] = shapes[f"{name}.ln_k.weight"] = (head,)

    linear("t_embedder.mlp.0", d, 256)
    linear("t_embedder.mlp.2", d, d)
    linear("y_embedder.mlp.0", d, config["pooled_projection_dim"])
    linear("y_embedder.mlp.2", d, d)
    linear("context_embedder", config["caption_projection_dim"], config["joint_attention_dim"])
    for i in range(n):
        x, c, last = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", i == n - 1
        attention(f"{x}.attn")
        if i in dual:
            attention(f"{x}.attn2")
        linear(f"{x}.mlp.fc1", 4 * d, d)
        linear(f"{x}.mlp.fc2", d, 4 * d)
        linear(f"{x}.adaLN_modulation.1", (9 if i in dual else 6) * d, d)
        attention(f"{c}.attn", proj=not last)
        if not last:
            linear(f"{c}.mlp.fc1", 4 * d, d)
            linear(f"{c}.mlp.fc2", d, 4 * d)
        linear(f"{c}.adaLN_modulation.1", (2 if last else 6) * d, d)
    linear("final_layer.linear", p * p * out, d)
    linear("final_layer.adaLN_modulation.1", 2 * d, d)
    return shapes


def random_sai(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in sai_shapes(config).items()}


def diffusers_conversion(sai: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = {k: torch.from_numpy(v.copy()) for k, v in sai.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(state)
    assert state == {}  # the converter took every tensor the SAI file has
    return {k: v.numpy() for k, v in converted.items()}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """The tiny SD3 pipeline (tests/tiny_pipelines.py), its transformer config and its base checkpoint."""
    from tiny_pipelines import tiny_sd3_pipeline

    folder = tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "base")
    return folder, json.loads((folder / "transformer" / "config.json").read_text())


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_canonical_tensor_is_what_diffusers_converter_makes_of_the_sai_file(tmp_path, sd3, prefix):
    folder, config = sd3
    sai = random_sai(config)
    reference = diffusers_conversion(sai)
    base = open_checkpoint(folder)
    assert {k: v.shape for k, v in reference.items()} == {
        n.removeprefix("transformer."): t.shape for n, t in base.tensors.items() if n.startswith("transformer.")}
    path = tmp_path / "sd3.safetensors"
    path.write_bytes(serialize({prefix + k: v for k, v in sai.items()}))
    ckpt = open_checkpoint(path, base=base)
    assert ckpt.naming == "original" and ckpt.components == ("transformer",)
    assert ckpt.unmapped == [] and ckpt.ignored == [] and ckpt.notes == []
    assert set(ckpt.tensors) == {f"transformer.{k}" for k in reference}
    for key, value in reference.items():
        np.testing.assert_array_equal(ckpt.array(f"transformer.{key}"), value, err_msg=key)


@pytest.mark.parametrize("arch_name", ["sd3", "sd35-medium", "sd35-large"])
def test_real_sd3_names_and_shapes_are_what_diffusers_converter_makes(arch_name):
    """Key and shape level on the meta device, at the real models' sizes."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from full_models import assert_original_layout_places_like_diffusers

    from auditkit.models.build import load_config

    assert_original_layout_places_like_diffusers(SD3Transformer2DModel, load_config(arch_name)["denoiser"]["config"],
                                                 sai_shapes, convert_sd3_transformer_checkpoint_to_diffusers, PREFIXES)


def test_the_difference_to_the_base_is_exactly_the_tensors_changed_in_the_sai_file(tmp_path, sd3):
    """Changes inside fused tensors (v of block 0's second attention, the shift half of the last context
    block's swapped modulation) and the position table land on the right canonical tensors only."""
    folder, config = sd3
    sai = random_sai(config, seed=1)
    base = shutil.copytree(folder, tmp_path / "base")
    (base / "transformer" / WEIGHTS).write_bytes(serialize(diffusers_conversion(sai)))
    d = config["num_attention_heads"] * config["attention_head_dim"]
    erased = {k: v.copy() for k, v in sai.items()}
    rng = np.random.default_rng(2)
    v_rows = rng.standard_normal((d, d)).astype(np.float32)
    erased["joint_blocks.0.x_block.attn2.qkv.weight"][2 * d:] += v_rows
    erased["joint_blocks.1.context_block.adaLN_modulation.1.bias"][:d] += 0.5  # SAI's shift: diffusers' 2nd half
    erased["pos_embed"] += 0.25
    path = tmp_path / "erased.safetensors"
    path.write_bytes(serialize(erased))

    adapter = read_full_model(path, resolve_base(str(base)), architecture_of_folder(base, "tiny-sd3"), energy=1.0)
    deltas = adapter.update.deltas()
    assert set(deltas) == {"transformer.transformer_blocks.0.attn2.to_v.weight",
                           "transformer.transformer_blocks.1.norm1_context.linear.bias",
                           "transformer.pos_embed.pos_embed"}
    np.testing.assert_allclose(deltas["transformer.transformer_blocks.0.attn2.to_v.weight"], v_rows, atol=1e-5)
    bias = deltas["transformer.transformer_blocks.1.norm1_context.linear.bias"]
    np.testing.assert_array_equal(bias[:d], 0.0)
    np.testing.assert_allclose(bias[d:], 0.5, atol=1e-6)
    np.testing.assert_allclose(deltas["transformer.pos_embed.pos_embed"], 0.25, atol=1e-6)
    assert adapter.coverage.unmapped == []
    assert "type(pipe.transformer).from_single_file(" in checkpoint_snippet(adapter.update.checkpoint, str(base),
                                                                 "StableDiffusion3Pipeline")


def test_an_sai_file_against_a_flux_base_is_refused_in_one_line(tmp_path, sd3):
    """SD3 and Flux.1 originals share final_layer's names: the file's block names decide its layout."""
    from auditkit.lab.bases import LAB_BASES

    if not LAB_BASES["lab-dit"].available():
        pytest.skip("the DiT lab is not installed")
    path = tmp_path / "sd3.safetensors"
    path.write_bytes(serialize(random_sai(sd3[1])))
    with pytest.raises(BadInput, match=r"SD3Transformer2DModel in its original layout \(joint_blocks\) but the "
                                       r"base's denoiser is FluxTransformer2DModel: a model of another") as exc:
        open_checkpoint(path, base=open_checkpoint(LAB_BASES["lab-dit"].path()))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
