"""Text encoders bundled in an all-in-one single file (ComfyUI's Flux.1 and SD3/SD3.5 checkpoints:
``text_encoders.clip_l.transformer.…``, ``text_encoders.clip_g.transformer.…``, ``text_encoders.t5xxl.transformer.…``),
read by canonical name and checked against what diffusers' own loaders make of the file
(``create_diffusers_clip_model_from_ldm``, ``create_diffusers_t5_model_from_checkpoint``, the functions
``from_single_file`` calls for a pipeline's text encoders) on the tiny Flux and SD3 pipelines.

The file's names are the components' state-dict names (transformers 4 spelling, ``text_model.…``) under the prefixes,
as ComfyUI saves them, with random values; clip_l also carries a ``text_projection.weight``, which diffusers replaces
with the identity."""

import numpy as np
import pytest

from auditkit.lora.io import open_safetensors, serialize
from auditkit.models import architectures
from auditkit.models.architectures import canonical_name
from auditkit.models.base import resolve_base
from auditkit.models.checkpoint import open_checkpoint
from auditkit.models.difference import read_full_model
from auditkit.models.pipeline import architecture_of_folder

torch = pytest.importorskip("torch")

CLIP_L, CLIP_G, T5 = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                      "text_encoders.t5xxl.transformer.")
BUNDLES = {"flux": {CLIP_L: "text_encoder", T5: "text_encoder_2"},
           "sd3": {CLIP_L: "text_encoder", CLIP_G: "text_encoder_2", T5: "text_encoder_3"}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny Flux pipeline, and the tiny SD3 one with a wider second CLIP: diffusers' loader takes clip_l or
    clip_g for a CLIP component by its width (clip_l first), as at real size (CLIP-L 768, bigG 1280); the tiny
    pipeline's two CLIPs are of one width, so diffusers would load clip_l into both."""
    from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline
    from transformers import CLIPTextModelWithProjection

    from auditkit.models.build import load_config

    for name in ("sd3", "sd35-medium", "sd35-large"):
        encoders = load_config(name)["text_encoders"]
        assert encoders["text_encoder"]["hidden_size"] == 768 != encoders["text_encoder_2"]["hidden_size"] == 1280
    root = tmp_path_factory.mktemp("bundled")
    sd3 = tiny_sd3_pipeline(root / "sd3")
    wide = CLIPTextModelWithProjection.from_pretrained(sd3 / "text_encoder_2").config.to_dict()
    wide.update(hidden_size=2 * wide["hidden_size"], intermediate_size=2 * wide["intermediate_size"],
                projection_dim=2 * wide["projection_dim"])
    torch.manual_seed(0)
    config = CLIPTextModelWithProjection.config_class.from_dict(wide)
    CLIPTextModelWithProjection(config).save_pretrained(sd3 / "text_encoder_2")
    return {"flux": tiny_flux_pipeline(root / "flux"), "sd3": sd3}


def component_shapes(folder, component: str) -> dict[str, tuple[int, ...]]:
    """The component's tensors as its save names them, in transformers 4's spelling (``text_model.…``)."""
    (weights,) = (folder / component).glob("*.safetensors")
    tensors = open_safetensors(weights).tensors
    return {canonical_name(component, k).split(".", 1)[1]: t.shape for k, t in tensors.items()}


def bundled_file(folder, family: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, component in BUNDLES[family].items():
        shapes = component_shapes(folder, component)
        if prefix == CLIP_L and "text_projection.weight" not in shapes:  # Flux's CLIPTextModel has none
            width = shapes["text_model.final_layer_norm.weight"][0]
            shapes["text_projection.weight"] = (width, width)
        out.update({prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()})
    return out


def diffusers_loaded(folder, family: str, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Each bundled component as diffusers' single-file loaders build it from ``tensors`` (config from ``folder``)."""
    import transformers
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )

    from auditkit.models.families import read_model_index

    index = read_model_index(folder)
    state = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    out = {}
    for component in BUNDLES[family].values():
        cls = getattr(transformers, index[component][1])
        make = create_diffusers_t5_model_from_checkpoint if cls.__name__ == "T5EncoderModel" else \
            create_diffusers_clip_model_from_ldm
        model = make(cls, state, subfolder=component, config=str(folder), local_files_only=True)
        out[component] = {canonical_name(component, k): v.detach().numpy() for k, v in model.state_dict().items()
                          if not v.is_meta}  # T5's encoder.embed_tokens (shared.weight tied) stays on meta here
    return out


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_bundled_text_encoder_tensor_is_what_diffusers_loads_from_the_file(tmp_path, bases, family):
    folder = bases[family]
    tensors = bundled_file(folder, family)
    path = tmp_path / f"{family}-aio.safetensors"
    path.write_bytes(serialize(tensors))
    base = open_checkpoint(folder)
    ckpt = open_checkpoint(path, base=base)
    loaded = diffusers_loaded(folder, family, tensors)
    assert ckpt.naming == "original" and ckpt.components == tuple(sorted(BUNDLES[family].values()))
    assert ckpt.unmapped == [] and ckpt.notes == []
    assert ckpt.ignored == [f"{CLIP_L}text_projection.weight"]  # diffusers puts the identity in its place
    for component, reference in loaded.items():
        mine = {n for n in ckpt.tensors if n.startswith(component + ".")}
        theirs = {n for n in base.tensors if n.startswith(component + ".")}
        projection = f"{component}.text_projection.weight"
        if projection in reference and component == "text_encoder":  # clip_l: the identity, whatever the file holds
            np.testing.assert_array_equal(reference[projection], np.eye(reference[projection].shape[0]))
            theirs.discard(projection)
        assert mine == theirs, component
        for name in mine:
            np.testing.assert_array_equal(ckpt.array(name), reference[name], err_msg=name)


def test_the_difference_sees_the_one_bundled_t5_tensor_changed(tmp_path, bases):
    """A Flux all-in-one file whose CLIP and T5 are the base's but for one T5 attention projection."""
    folder = bases["flux"]
    tensors = {}
    for prefix, component in BUNDLES["flux"].items():
        (weights,) = (folder / component).glob("*.safetensors")
        st = open_safetensors(weights)
        tensors.update({prefix + canonical_name(component, k).split(".", 1)[1]: st.array(k) for k in st.tensors})
    key = f"{T5}encoder.block.1.layer.0.SelfAttention.q.weight"
    change = np.random.default_rng(3).standard_normal(tensors[key].shape).astype(np.float32)
    tensors[key] = tensors[key] + change
    path = tmp_path / "flux-aio.safetensors"
    path.write_bytes(serialize(tensors))
    adapter = read_full_model(path, resolve_base(str(folder)), architecture_of_folder(folder), energy=1.0)
    deltas = adapter.update.deltas()
    assert set(deltas) == {"text_encoder_2.encoder.block.1.layer.0.SelfAttention.q.weight"}
    np.testing.assert_allclose(deltas["text_encoder_2.encoder.block.1.layer.0.SelfAttention.q.weight"], change,
                               atol=1e-5)
    assert adapter.coverage.unmapped == []


def test_bundled_text_encoders_against_a_base_of_another_model_are_unmapped_with_a_note(tmp_path, bases):
    """The lab (SD 1.x-like) bundles no text_encoders.…: a Flux file's are unmapped, never dropped."""
    from full_models import lab_tensors, original_names


    names = original_names()
    tensors = {names[canonical_name("unet", k)]: v for k, v in lab_tensors("unet").items()}
    bundled = bundled_file(bases["flux"], "flux")
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(serialize({**tensors, **bundled}))
    ckpt = open_checkpoint(path, base=open_checkpoint(resolve_base("lab").folder), arch=architectures.get("lab"))
    assert ckpt.unmapped == sorted(bundled) and ckpt.components == ("unet",)
    assert any("text_encoders." in n and "Flux.1 or SD3" in n for n in ckpt.notes)
