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
    ("transformer.blocks.7.attn2.to_k", "dit", "cross_attention"),  # Wan
    ("transformer.blocks.7.ffn.net.0.proj", "dit", "feed_forward"),
    ("transformer.transformer_blocks.59.img_mlp.net.2", "joint", "feed_forward"),  # Qwen-Image
    ("transformer.transformer_blocks.0.img_mod.1", "joint", "other"),
    ("transformer.layers.3.attention.to_q", "single", "joint_attention"),  # Z-Image
    ("transformer.noise_refiner.0.attention.to_k", "transformer_other", "self_attention"),
    ("transformer.layers.3.feed_forward.w3", "single", "feed_forward"),
    ("transformer.transformer_blocks.2.ff_context.linear_out", "joint", "feed_forward"),  # Flux.2
    ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single", "joint_attention"),
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


# --- the 2026 families ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "same_as"), [("flux-kontext", "flux"), ("wan22-a14b", "wan21-14b")])
def test_an_architecture_of_another_ones_transformer_has_its_modules_under_its_own_name(name, same_as):
    arch, other = architectures.get(name), architectures.get(same_as)
    assert arch.name == name and arch.label != other.label
    assert arch.modules == other.modules and arch.original_names == other.original_names


# Published sizes, written out by hand from the sources the configs cite (blocks, width, and one telling module)
SIZES = {
    "qwen-image": ("transformer.transformer_blocks.59.txt_mlp.net.0.proj", (12288, 3072),
                   "transformer.txt_in", (3072, 3584)),
    "z-image": ("transformer.layers.29.feed_forward.w1", (10240, 3840), "transformer.cap_embedder.1", (3840, 2560)),
    "flux2-dev": ("transformer.single_transformer_blocks.47.attn.to_qkv_mlp_proj", (3 * 6144 + 2 * 18432, 6144),
                  "transformer.context_embedder", (6144, 15360)),
    "flux2-klein-4b": ("transformer.transformer_blocks.4.ff.linear_in", (18432, 3072),
                       "transformer.context_embedder", (3072, 7680)),
    "flux2-klein-9b": ("transformer.single_transformer_blocks.23.attn.to_out", (4096, 4096 + 12288),
                       "transformer.context_embedder", (4096, 12288)),
    "chroma": ("transformer.single_transformer_blocks.37.proj_out", (3072, 3072 + 12288),
               "transformer.distilled_guidance_layer.layers.4.linear_2", (5120, 5120)),
    "wan21-1.3b": ("transformer.blocks.29.ffn.net.0.proj", (8960, 1536),
                   "transformer.condition_embedder.text_embedder.linear_1", (1536, 4096)),
    "wan21-14b": ("transformer.blocks.39.attn2.to_k", (5120, 5120), "transformer.blocks.39.ffn.net.2", (5120, 13824)),
    "hunyuanvideo15": ("transformer.transformer_blocks.53.norm1.linear", (6 * 2048, 2048),
                       "transformer.context_embedder_2.linear_1", (2048, 1472)),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_the_2026_tables_have_the_published_sizes(name):
    arch = architectures.get(name)
    for module, shape in (SIZES[name][:2], SIZES[name][2:]):
        assert (arch.modules[module].out_features, arch.modules[module].in_features) == shape, module
    last = SIZES[name][0].split(".")
    assert f"transformer.{last[1]}.{int(last[2]) + 1}.{'.'.join(last[3:])}" not in arch.modules  # the last block


@pytest.mark.parametrize(("name", "original", "pieces"), [
    ("flux2-dev", "double_blocks.7.txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("flux2-klein-4b", "single_blocks.19.linear1", ["attn.to_qkv_mlp_proj"]),
    ("wan21-14b", "blocks.39.cross_attn.o", ["attn2.to_out.0"]),
    ("hunyuanvideo15", "double_blocks.53.txt_attn_k", ["attn.add_k_proj"]),
    ("z-image", "context_refiner.1.attention.qkv", ["attention.to_q", "attention.to_k", "attention.to_v"]),
    # diffusers' single-file converter: x_embedder -> all_x_embedder.2-1, final_layer -> all_final_layer.2-1
    ("z-image", "x_embedder", ["all_x_embedder.2-1"]),
    ("z-image", "final_layer.adaLN_modulation.1", ["all_final_layer.2-1.adaLN_modulation.1"]),
    ("chroma", "distilled_guidance_layer.layers.0.in_layer", ["linear_1"]),
])
def test_original_names_of_the_2026_families(name, original, pieces):
    arch = architectures.get(name)
    target = arch.originals[original]
    got = [c for c, _, _ in arch.fused[target]] if target in arch.fused else [target]
    assert len(got) == len(pieces) and all(g.endswith("." + p) for g, p in zip(got, pieces, strict=True)), got


def test_chroma_has_flux_blocks_but_no_modulation_linears():
    chroma, flux = architectures.get("chroma"), architectures.get("flux")
    blocks = {n: s for n, s in chroma.modules.items() if "transformer_blocks." in n}
    assert blocks and all(flux.modules[n] == s for n, s in blocks.items())
    assert not any(".norm1.linear" in n or ".norm.linear" in n for n in chroma.modules)


@pytest.mark.parametrize(("claim", "arch"), [
    ("FLUX.1-Kontext-dev", "flux-kontext"), ("Flux.1-kontext/lora", "flux-kontext"), ("lodestones/Chroma", "chroma"),
    ("black-forest-labs/FLUX.2-dev", "flux2-dev"), ("FLUX.2-klein-4B", "flux2-klein-4b"),
    ("flux.2-klein-9b", "flux2-klein-9b"), ("Qwen/Qwen-Image-Edit-2509", "qwen-image"), ("qwen_image", "qwen-image"),
    ("Tongyi-MAI/Z-Image-Turbo", "z-image"), ("Wan2.1-T2V-1.3B", "wan21-1.3b"), ("wan2.1_t2v_14b", "wan21-14b"),
    ("Wan-AI/Wan2.2-T2V-A14B", "wan22-a14b"), ("tencent/HunyuanVideo-1.5", "hunyuanvideo15"),
    ("flux-1-dev", "flux"), ("flux.1_dev", "flux"), ("sdxl_base_v1-0", "sdxl"), ("sd3.5 large", "sd35-large"),
    ("resize image", None),
])
def test_model_names_of_the_2026_families(claim, arch):
    assert architectures.named_hint(claim) == arch
