"""Architectures known without weights: shipped tables, block classification, SGM names."""

import json
from importlib import resources

import pytest

from auditkit.models import architectures
from auditkit.models.architectures import block_of, metadata_hint, module_kind, sgm_name


@pytest.mark.parametrize("name", architectures.BUILTIN)
def test_shipped_table_equals_a_fresh_meta_device_build(name):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from auditkit.models.build import build_table, config_for

    shipped = json.loads(resources.files("auditkit.models").joinpath("tables", f"{name}.json").read_text())
    assert build_table(config_for(name)) == shipped


def test_sd15_has_the_known_transformer_modules(sd15):
    blocks = [n for n in sd15.modules if n.endswith("attn2.to_k")]
    assert len(blocks) == 16  # SD1.5: 16 transformer blocks
    assert sd15.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 768
    assert sd15.modules["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv"  # 1x1 conv in SD1.x
    assert sd15.modules["text_encoder.text_model.encoder.layers.11.mlp.fc2"].out_features == 768


def test_sdxl_shapes(sdxl):
    assert len([n for n in sdxl.modules if n.endswith("attn2.to_k")]) == 70  # down 2*2 + 2*10, mid 10, up 3*10 + 3*2
    assert sdxl.modules["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 2048
    assert sdxl.modules["text_encoder_2.text_model.encoder.layers.31.mlp.fc1"].out_features == 5120
    assert "text_encoder_2.text_projection" in sdxl.modules


@pytest.mark.parametrize("name,block,kind", [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down", "self_attention"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "mid", "cross_attention"),
    ("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj", "up", "feed_forward"),
    ("unet.up_blocks.0.resnets.1.conv1", "up", "other"),
    ("unet.conv_in", "unet_other", "other"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_encoder", "self_attention"),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "text_encoder", "feed_forward"),
    ("transformer.transformer_blocks.3.attn.add_k_proj", "joint", "joint_attention"),
    ("transformer.transformer_blocks.3.ff_context.net.2", "joint", "feed_forward"),
    ("transformer.single_transformer_blocks.0.proj_mlp", "single", "feed_forward"),
    ("transformer.single_transformer_blocks.0.norm.linear", "single", "other"),
    ("transformer.context_embedder", "transformer_other", "other"),
    ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", "text_encoder", "self_attention"),
    ("text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0", "text_encoder", "feed_forward"),
])
def test_block_and_kind(name, block, kind):
    assert (block_of(name), module_kind(name)) == (block, kind)


@pytest.mark.parametrize("path,expected", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
    ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "output_blocks.2.1.transformer_blocks.9.ff.net.2"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("time_embedding.linear_1", "time_embed.0"),
])
def test_sgm_names_of_sdxl(sdxl, path, expected):
    assert sgm_name(path, sdxl.unet_layout) == expected


def test_t5_module_paths_keep_their_names_and_clip_paths_get_text_model():
    from auditkit.models.architectures import canonical_name

    assert canonical_name("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") == \
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"
    assert canonical_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def test_metadata_hint():
    assert metadata_hint({"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert metadata_hint({"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd15"
    assert metadata_hint({"ss_v2": "True"}) == "sd2"
    assert metadata_hint({"ss_base_model_version": "flux1"}) == "flux"
    assert metadata_hint({}) is None
