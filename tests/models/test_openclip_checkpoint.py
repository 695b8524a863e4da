"""OpenCLIP text encoders of full checkpoints in their original single-file layout: SD 2.x's under
``cond_stage_model.model.`` (``transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, …) and
SDXL's second encoder under ``conditioner.embedders.1.model.`` (the refiner's under ``conditioner.embedders.0.model.``),
read by canonical name with ``in_proj_weight``/``in_proj_bias`` split into q, k, v by rows and SDXL's
``text_projection`` transposed, checked against diffusers' own ``convert_open_clip_checkpoint`` on tiny encoders
(values) and, names and shapes, at SD 2.1's and SDXL's real sizes on the meta device.

The original file's names and shapes are written here from open_clip's ``TextTransformer`` (not from auditkit's
mapping). diffusers' converter is the reference for what each canonical tensor holds, and for what it leaves out:
it reads no ``logit_scale`` and, for SD 2.x (which conditions on the penultimate layer: a diffusers text encoder of
23 layers from a file of 24 resblocks), ignores the last resblock and ``text_projection`` by a list that names
``resblocks.23`` (``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``); the tiny test sets that one index to the tiny file's last."""

import json
import shutil

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.lora.io import serialize
from auditkit.models import architectures
from auditkit.models.architectures import canonical_name
from auditkit.models.base import resolve_base
from auditkit.models.checkpoint import open_checkpoint
from auditkit.models.difference import read_full_model
from auditkit.models.original_layout import openclip_ignored, openclip_tensor_map

torch = pytest.importorskip("torch")

SD2, SDXL, REFINER = "cond_stage_model.model.", "conditioner.embedders.1.model.", "conditioner.embedders.0.model."


def openclip_shapes(width: int, layers: int, mlp: int, vocab: int, positions: int, embed: int
                    ) -> dict[str, tuple[int, ...]]:
    """Every tensor of open_clip's text tower (TextTransformer, as SD 2.x and SDXL checkpoints store it)."""
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (positions, width),
              "ln_final.weight": (width,), "ln_final.bias": (width,), "text_projection": (width, embed),
              "logit_scale": ()}
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        shapes.update({f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                       f"{b}.attn.in_proj_weight": (3 * width, width), f"{b}.attn.in_proj_bias": (3 * width,),
                       f"{b}.attn.out_proj.weight": (width, width), f"{b}.attn.out_proj.bias": (width,),
                       f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
                       f"{b}.mlp.c_fc.weight": (mlp, width), f"{b}.mlp.c_fc.bias": (mlp,),
                       f"{b}.mlp.c_proj.weight": (width, mlp), f"{b}.mlp.c_proj.bias": (width,)})
    return shapes


def shapes_for(config: dict, layers: int, embed: int | None = None) -> dict[str, tuple[int, ...]]:
    """open_clip's text tower of a transformers CLIP text config (``embed``: text_projection's width, by default
    the config's projection_dim; SD 2.x's diffusers config says 512 where ViT-H/14's projection is 1024 wide)."""
    return openclip_shapes(config["hidden_size"], layers, config["intermediate_size"], config["vocab_size"],
                           config["max_position_embeddings"], embed or config["projection_dim"])


def random_openclip(shapes: dict, prefix: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


class Recording(dict):
    """A checkpoint dict that records which keys the converter reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def diffusers_conversion(model, state: dict, prefix: str, last_sd2_block: int = 23) -> tuple[dict, set]:
    """diffusers' ``convert_open_clip_checkpoint`` on ``state`` (its SD 2.x ignore list's resblock 23 set to
    ``last_sd2_block``), as ``create_diffusers_clip_model_from_ldm`` hands it to the model (no ``text_model.``
    level for a ``CLIPTextModel`` of transformers 5): the converted tensors and the keys of ``state`` it
    leaves out (never read, or on its ignore list: SD 2.x's ``text_projection`` is read for its row count
    only, the width it splits ``in_proj_weight`` by)."""
    from diffusers.loaders import single_file_utils

    ignore = single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
    assert len(ignore) == 13 and sum(".resblocks.23." in k for k in ignore) == 12  # the converter changed: look again
    assert ignore[-1] == "cond_stage_model.model.text_projection"
    patched = [k.replace(".resblocks.23.", f".resblocks.{last_sd2_block}.") for k in ignore]
    recording = Recording(state)
    original = single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE
    try:
        single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE = patched
        converted = single_file_utils.convert_open_clip_checkpoint(model, recording, prefix=prefix)
    finally:
        single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE = original
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted, (set(state) - recording.read) | (set(state) & set(patched))


def as_torch(tensors: dict[str, np.ndarray]) -> dict:
    return {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}


def write(path, tensors: dict[str, np.ndarray]):
    path.write_bytes(serialize(tensors))
    return path


# --------------------------------------------------------------------------------------------
# SD 2.x: the lab pipeline with an OpenCLIP-shaped text encoder (gelu), the file one resblock longer


def sd2_config() -> dict:
    config = json.loads((resolve_base("lab").folder / "text_encoder" / "config.json").read_text())
    return {**config, "hidden_act": "gelu"}


def sd2_base(tmp_path, text_encoder: dict[str, np.ndarray]):
    """A copy of the lab pipeline whose text encoder is an OpenCLIP-shaped CLIPTextModel holding ``text_encoder``."""
    folder = shutil.copytree(resolve_base("lab").folder, tmp_path / "sd2-base")
    (folder / "text_encoder" / "config.json").write_text(json.dumps(sd2_config()))
    write(folder / "text_encoder" / "model.safetensors", text_encoder)
    return folder


@pytest.fixture
def sd2(tmp_path):
    """(original file tensors, diffusers' conversion, keys the converter left out, base folder, layers)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = sd2_config()
    layers = config["num_hidden_layers"]
    original = random_openclip(shapes_for(config, layers + 1), SD2)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    converted, skipped = diffusers_conversion(model, as_torch(original), SD2, last_sd2_block=layers)
    reference = {k: v.numpy() for k, v in converted.items()}
    assert {k: tuple(v.shape) for k, v in reference.items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return original, reference, skipped, sd2_base(tmp_path, reference), layers


def test_every_sd2_canonical_tensor_is_what_diffusers_converter_makes_of_the_openclip_file(tmp_path, sd2):
    original, reference, skipped, folder, layers = sd2
    ckpt = open_checkpoint(write(tmp_path / "sd2.safetensors", original), base=open_checkpoint(folder))
    assert ckpt.naming == "original" and ckpt.components == ("text_encoder",)
    assert ckpt.unmapped == [] and ckpt.notes == []
    # left out: what diffusers' converter leaves out (the last resblock, text_projection, logit_scale)
    assert ckpt.ignored == sorted(skipped)
    assert ckpt.ignored == sorted([f"{SD2}logit_scale", f"{SD2}text_projection",
                                   *(k for k in original if k.startswith(f"{SD2}transformer.resblocks.{layers}."))])
    assert set(ckpt.tensors) == {canonical_name("text_encoder", k) for k in reference}
    for key, value in reference.items():
        name = canonical_name("text_encoder", key)
        assert ckpt.tensors[name].shape == value.shape, key
        np.testing.assert_array_equal(ckpt.array(name), value, err_msg=key)
    v = ckpt.tensors["text_encoder.text_model.encoder.layers.1.self_attn.v_proj.weight"]
    assert v.key == f"{SD2}transformer.resblocks.1.attn.in_proj_weight" and v.rows is not None  # a share, not a copy


def test_the_difference_to_the_sd2_base_is_exactly_the_q_rows_changed_in_in_proj_weight(tmp_path, sd2):
    """An erased SD 2.x model in the original layout (UNet in LDM names, OpenCLIP text encoder): a change to the q
    rows of one resblock's in_proj_weight is that layer's q_proj and nothing else; the last resblock, which the
    diffusers model does not have, changes nothing it compares."""
    from full_models import lab_tensors, original_names

    original, reference, _, folder, layers = sd2
    width = sd2_config()["hidden_size"]
    erased = {k: v.copy() for k, v in original.items()}
    rng = np.random.default_rng(5)
    q_rows = rng.standard_normal((width, width)).astype(np.float32)
    erased[f"{SD2}transformer.resblocks.1.attn.in_proj_weight"][:width] += q_rows
    erased[f"{SD2}transformer.resblocks.{layers}.mlp.c_fc.weight"] += 1.0  # ignored, as diffusers ignores it
    names = original_names()
    erased.update({names[canonical_name("unet", k)]: v for k, v in lab_tensors("unet").items()})
    path = write(tmp_path / "erased-sd2.safetensors", erased)

    adapter = read_full_model(path, resolve_base(str(folder)), architectures.get("lab"), energy=1.0)
    deltas = adapter.update.deltas()
    assert set(deltas) == {"text_encoder.text_model.encoder.layers.1.self_attn.q_proj.weight"}
    np.testing.assert_allclose(deltas["text_encoder.text_model.encoder.layers.1.self_attn.q_proj.weight"], q_rows,
                               atol=1e-5)
    assert set(adapter.modules) == {"text_encoder.text_model.encoder.layers.1.self_attn.q_proj"}
    assert adapter.update.outside == []
    assert adapter.coverage.fraction == 1.0 and adapter.coverage.unmapped == []
    assert f"{SD2}transformer.resblocks.{layers}.mlp.c_fc.weight" in adapter.coverage.ignored


def test_an_openclip_file_of_another_width_is_refused_naming_its_in_proj(tmp_path, sd2):
    _, _, _, folder, layers = sd2
    wider = random_openclip(shapes_for({**sd2_config(), "hidden_size": 2 * sd2_config()["hidden_size"]},
                                       layers + 1), SD2)
    with pytest.raises(BadInput, match=r"in_proj_(weight|bias) is \[384.*\] here but .* have 192 rows"):
        open_checkpoint(write(tmp_path / "wide.safetensors", wider), base=open_checkpoint(folder))


def test_an_sdxl_openclip_file_against_an_sd_base_is_unmapped_with_a_note(tmp_path, sd2):
    """The lab (SD 1.x-like) has no text_encoder_2: SDXL's second encoder fits nothing, never dropped."""
    original, _, _, folder, _ = sd2
    sdxl = {SDXL + k.removeprefix(SD2): v for k, v in original.items()}
    mixed = {**original, **sdxl}  # SD2's encoder too, so something is placed
    ckpt = open_checkpoint(write(tmp_path / "mixed.safetensors", mixed), base=open_checkpoint(folder))
    assert ckpt.unmapped == sorted(sdxl)
    assert any("OpenCLIP" in n and SDXL in n for n in ckpt.notes)


# --------------------------------------------------------------------------------------------
# SDXL: the tiny SDXL pipeline's text_encoder_2 (CLIPTextModelWithProjection), a non-square projection


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from tiny_pipelines import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.mark.parametrize("prefix", [SDXL, REFINER])
def test_every_sdxl_canonical_tensor_is_what_diffusers_converter_makes_of_the_openclip_file(tmp_path, sdxl_folder,
                                                                                             prefix):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = {**json.loads((sdxl_folder / "text_encoder_2" / "config.json").read_text()), "projection_dim": 16}
    assert config["hidden_size"] != 16  # a projection of another width than the encoder: transposition shows
    original = random_openclip(shapes_for(config, config["num_hidden_layers"]), prefix, seed=7)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    converted, skipped = diffusers_conversion(model, as_torch(original), prefix)
    reference = {k: v.numpy() for k, v in converted.items()}
    assert {k: tuple(v.shape) for k, v in reference.items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    folder = shutil.copytree(sdxl_folder, tmp_path / "base")
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    write(folder / "text_encoder_2" / "model.safetensors", reference)

    ckpt = open_checkpoint(write(tmp_path / "sdxl.safetensors", original), base=open_checkpoint(folder))
    assert ckpt.naming == "original" and ckpt.components == ("text_encoder_2",)
    assert ckpt.unmapped == [] and ckpt.notes == []
    assert ckpt.ignored == sorted(skipped) == [f"{prefix}logit_scale"]
    assert set(ckpt.tensors) == {f"text_encoder_2.{k}" for k in reference}
    for key, value in reference.items():
        name = f"text_encoder_2.{key}"
        assert ckpt.tensors[name].shape == value.shape, key
        np.testing.assert_array_equal(ckpt.array(name), value, err_msg=key)
    projection = ckpt.array("text_encoder_2.text_projection.weight")
    assert projection.shape == (16, config["hidden_size"]) and projection.flags.c_contiguous
    np.testing.assert_array_equal(projection, original[f"{prefix}text_projection"].T)


# --------------------------------------------------------------------------------------------
# real sizes, names and shapes (meta device), the converter as it is


@pytest.mark.parametrize("arch_name, component, prefix, extra", [("sd2", "text_encoder", SD2, 1),
                                                                 ("sdxl", "text_encoder_2", SDXL, 0)])
def test_real_openclip_names_and_shapes_are_what_diffusers_unmodified_converter_makes(arch_name, component, prefix,
                                                                                      extra):
    """SD 2.1's ViT-H text tower (24 resblocks, 23 in diffusers) and SDXL's ViT-bigG (32): every original tensor
    placed or left out as the converter leaves it out, each canonical tensor of its shape, nothing else."""
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from auditkit.models.build import load_config

    config = dict(load_config(arch_name)["text_encoders"][component])
    config.pop("kohya_prefix", None)
    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**config))
    shapes = {canonical_name(component, k): tuple(v.shape) for k, v in model.state_dict().items()}
    layers = config["num_hidden_layers"]
    assert (arch_name, layers) in (("sd2", 23), ("sdxl", 32))
    embed = 1024 if arch_name == "sd2" else None  # open_clip ViT-H/14's embed dim; bigG's is its projection_dim
    original = {prefix + k: s for k, s in shapes_for(config, layers + extra, embed).items()}
    state = Recording({k: torch.empty(s, device="meta") for k, s in original.items()})
    converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    skipped = (set(original) - state.read) | (set(original) & set(SD_2_TEXT_ENCODER_KEYS_TO_IGNORE))
    assert {canonical_name(component, k): tuple(v.shape) for k, v in converted.items()} == shapes

    names, ignored = openclip_tensor_map(shapes), openclip_ignored(shapes)
    left_out = {k for k in original if k in ignored or k.startswith(tuple(p for p in ignored if p.endswith(".")))}
    assert left_out == skipped
    placed = {}
    for key, stored in original.items():
        if key in left_out:
            continue
        for canonical, rows, transpose in names[key]:
            assert canonical not in placed
            shape = (sum(b - a for a, b in rows), *stored[1:]) if rows else stored
            placed[canonical] = tuple(reversed(shape)) if transpose else shape
    assert placed == shapes
