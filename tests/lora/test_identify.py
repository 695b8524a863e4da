"""Files that are not adapters are named for what they are: LFS pointers, web pages, embeddings, checkpoints."""

import json

import numpy as np
import pytest

from auditkit.errors import EXIT_ERROR, BadInput
from auditkit.lab.model import lab_pipeline_available, lab_pipeline_path
from auditkit.lora import identify, io
from auditkit.lora.identify import identify_bytes, identify_keys
from auditkit.lora.io import open_safetensors, serialize

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4a3f0c2f7b6e1d9a8c5b4e3f2a1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d\n"
               b"size 151108831\n")
LFS_MESSAGE = "a Git LFS pointer, not the weights (the real file has 151,108,831 bytes): fetch them with `git lfs pull`"


# --------------------------------------------------------------------------------------------
# identify_bytes


def test_lfs_pointer_is_named_with_its_size():
    assert identify_bytes(LFS_POINTER) == LFS_MESSAGE


def test_lfs_pointer_without_a_size_line():
    head = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n"
    assert identify_bytes(head) == "a Git LFS pointer, not the weights: fetch them with `git lfs pull`"


@pytest.mark.parametrize("page", [
    b"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>Sign in - Model Hub</title>",
    b"\xef\xbb\xbf  \n<!-- saved -->\n<html>\n<head>\n<title>\n  Sign in - Model Hub\n</title>",
])
def test_html_page_is_named_without_quoting_its_title(page):
    # issue 26 H4: a file's content (here its title) is never quoted into a message
    described = identify_bytes(page)
    assert described.startswith("an HTML page, not a safetensors file") and "Sign in" not in described
    assert "download" in described


def test_html_page_without_a_title():
    assert identify_bytes(b"<html><body>Access denied</body></html>").startswith("an HTML page, not")


@pytest.mark.parametrize(("head", "expected"), [
    (b'  {"metadata": {"total_size": 10}, "weight_map": {"a": "m-00001-of-00002.safetensors"}}',
     "a sharded checkpoint's index"),
    (b'{"peft_type": "LORA", "r": 8, "lora_alpha": 8}', "a PEFT adapter_config.json"),
    (b'{"_class_name": "StableDiffusionPipeline"}', "a diffusers config"),
    (b"\n[1, 2, 3, 4, 5, 6, 7, 8]", "a JSON document, not a safetensors file"),
])
def test_json_documents_are_named(head, expected):
    assert identify_bytes(head).startswith(expected)


def test_json_error_response_is_named_without_quoting_the_error():
    # issue 26 H4: a file's content (here the error text) is never quoted into a message
    head = json.dumps({"error": "Access to model acme/x is restricted. You must be authenticated."}).encode()
    described = identify_bytes(head)
    assert described.startswith("a JSON error response, not a safetensors file") and "acme" not in described
    assert "download failed" in described


def test_a_deeply_nested_json_error_response_is_still_named():  # issue 26 M3: was a RecursionError
    head = b'{"error":' + b"[" * 1015
    assert identify_bytes(head) == ("a JSON error response, not a safetensors file: the download failed; "
                                    "fetch the file again")


@pytest.mark.parametrize("head", [b"404: Not Found", b"Entry not found", "Überschrift: kein Modell\n".encode()])
def test_other_text_is_named_and_never_quoted(head):
    # issue 26 H4: `lora/identify._plain_text` quoted the first 60 characters of any file (a key, /etc/passwd)
    assert identify_bytes(head) == "a text file, not a safetensors file"


def test_text_cut_inside_a_multibyte_character_is_still_text():
    head = ("caf\u00e9 " * 300).encode()[:1024]
    assert head[-1:] == b"\xc3"  # the buffer ends in the middle of "é"
    assert identify_bytes(head).startswith("a text file")


def test_a_text_files_description_quotes_none_of_it():
    described = identify_bytes(b"AWS_SECRET_ACCESS_KEY=wJalr\twith tab " + b"x" * 500 + b"\nline two")
    assert described == "a text file, not a safetensors file"


def test_gguf_is_named():
    assert identify_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40).startswith("a GGUF file")


def test_real_safetensors_heads_are_never_identified(tmp_path):
    text_meta = {"ss_tag_frequency": json.dumps({"data": {"404: Not Found": 3}}),
                 "readme": "<!DOCTYPE html><html><title>x</title>" * 40}
    blobs = [serialize({"a": np.ones((2, 3), np.float32)}),
             serialize({"a": np.ones(2, np.float16)}, text_meta),
             serialize({"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32)}, {"k": "v" * 5000})]
    for blob in blobs:
        assert identify_bytes(blob[:1024]) is None
        assert identify_bytes(blob) is None
    if lab_pipeline_available():
        for path in sorted(lab_pipeline_path().glob("*/*.safetensors")):
            assert identify_bytes(path.read_bytes()[:1024]) is None, path


@pytest.mark.parametrize("head", [b"", b"\x00" * 64, bytes(range(256)) * 4, b"\x01\x02"])
def test_binary_or_empty_input_is_not_identified(head):
    assert identify_bytes(head) is None


def test_identify_uses_the_same_header_limit_as_the_reader():
    assert identify.MAX_HEADER_BYTES == io.MAX_HEADER_BYTES


# --------------------------------------------------------------------------------------------
# open_safetensors says what the file is


def test_open_safetensors_on_an_lfs_pointer_names_it(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(LFS_POINTER)
    with pytest.raises(BadInput) as info:
        open_safetensors(path)
    message = str(info.value)
    assert "Git LFS pointer" in message and path.name in message and "git lfs pull" in message
    assert message == f"{path}: {LFS_MESSAGE}" and info.value.exit_code == EXIT_ERROR
    assert "absurd" not in message


def test_open_safetensors_on_a_saved_login_page_names_it(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<!doctype html><html><head><title>Log in</title></head><body>" + b"x" * 2000)
    with pytest.raises(BadInput, match="an HTML page, not a safetensors file") as info:
        open_safetensors(path)
    assert "Log in" not in str(info.value)  # issue 26 H4


def test_open_safetensors_keeps_the_precise_message_for_unrecognised_garbage(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(b"\x00\x00\x00\x00\x00\x00\x00\x01" + bytes(range(256)))
    with pytest.raises(BadInput, match="header length 72057594037927936 is absurd"):
        open_safetensors(path)


# --------------------------------------------------------------------------------------------
# identify_keys, on files written by code


def described(tmp_path, shapes: dict, metadata: dict | None = None, dtype=np.float16) -> str | None:
    """Write a safetensors file with zero tensors of these shapes, read it back, identify its keys."""
    path = tmp_path / "file.safetensors"
    path.write_bytes(serialize({k: np.zeros(s, dtype) for k, s in shapes.items()}, metadata))
    st = open_safetensors(path)
    return identify_keys(list(st.tensors), st.metadata, {k: t.shape for k, t in st.tensors.items()})


TI = "textual-inversion embedding"
HINT = ("a full model (an erased checkpoint or a fine-tune) is scanned with --base, its update being its "
        "difference to the base, or extracted as an adapter with `auditkit extract`")

CASES = {
    "kohya embedding sd1": ({"emb_params": (2, 768)},
                            f"a {TI} for SD1.x (kohya/A1111 format, key 'emb_params'), not an adapter"),
    "kohya embedding sd2": ({"emb_params": (1, 1024)}, f"a {TI} for SD2.x (kohya/A1111"),
    "a1111 embedding": ({"string_to_param.*": (4, 768)}, f"a {TI} for SD1.x (A1111 format, 'string_to_param')"),
    "sdxl embedding": ({"clip_l": (2, 768), "clip_g": (2, 1280)},
                       f"a {TI} for SDXL (SDXL format, keys 'clip_l'/'clip_g'), not an adapter"),
    "diffusers embedding": ({"<s1>": (768,)}, f'a {TI} for SD1.x (diffusers format, token "<s1>"), not an adapter'),
    "diffusers plain token": ({"sks-style": (1024,)}, f'a {TI} for SD2.x (diffusers format, token "sks-style")'),
    "sd1 checkpoint": ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
                        "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
                        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
                       "a full SD1.x checkpoint in the original (LDM/SGM) layout, not an adapter; " + HINT),
    "sd2 checkpoint": ({"model.diffusion_model.out.2.weight": (4, 8, 3, 3),
                        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (12, 4)},
                       "a full SD2.x checkpoint"),
    "sdxl checkpoint": ({"model.diffusion_model.out.2.weight": (4, 8, 3, 3),
                         "conditioner.embedders.1.model.ln_final.weight": (4,)}, "a full SDXL checkpoint"),
    "sdxl unet in ldm layout": ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                                 (8, 2048)}, "a full SDXL checkpoint"),
    "sd2 unet in ldm layout": ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                                (8, 1024)}, "a full SD2.x checkpoint"),
    "flux in comfy layout": ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (12, 4)},
                             "a full Flux.1 checkpoint"),
    "sd3 checkpoint": ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (12, 4),
                        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (4,)},
                       "a full SD3 checkpoint"),
    "flux original": ({"double_blocks.0.img_attn.qkv.weight": (12, 4), "single_blocks.0.linear1.weight": (20, 4)},
                      "a Flux.1 transformer in the original BFL layout (full weights), not an adapter; " + HINT),
    "sd3 original": ({"joint_blocks.0.context_block.attn.qkv.weight": (12, 4)}, "an SD3 MMDiT in the original"),
    "diffusers sd1 unet": ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 768)},
                           "a diffusers SD1.x UNet (full weights), not an adapter; " + HINT),
    "diffusers sdxl unet": ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                             "add_embedding.linear_1.weight": (8, 2816)}, "a diffusers SDXL UNet"),
    "diffusers flux transformer": ({"transformer_blocks.0.attn.to_q.weight": (4, 4),
                                    "single_transformer_blocks.0.attn.to_q.weight": (4, 4)},
                                   "a diffusers Flux transformer (full weights), not an adapter; " + HINT),
    "diffusers sd3 transformer": ({"transformer_blocks.0.attn.to_q.weight": (4, 4), "pos_embed.proj.weight": (4, 16)},
                                  "a diffusers SD3 transformer"),
    "diffusers flux.2 transformer": ({"single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight": (4, 4),
                                      "transformer_blocks.0.attn.to_q.weight": (4, 4)},
                                     "a diffusers Flux.2 transformer"),
    "diffusers qwen-image transformer": ({"transformer_blocks.0.attn.to_q.weight": (4, 4),
                                          "transformer_blocks.0.img_mlp.net.2.weight": (4, 4)},
                                         "a diffusers Qwen-Image transformer"),
    "diffusers chroma transformer": ({"transformer_blocks.0.attn.to_q.weight": (4, 4),
                                      "single_transformer_blocks.0.attn.to_q.weight": (4, 4),
                                      "distilled_guidance_layer.in_proj.weight": (4, 4)},
                                     "a diffusers Chroma transformer"),
    "diffusers wan transformer": ({"blocks.0.attn1.to_q.weight": (4, 4)}, "a diffusers Wan transformer (full weights)"),
    "diffusers z-image transformer": ({"layers.0.attention.to_q.weight": (4, 4)}, "a diffusers Z-Image transformer"),
    "diffusers hunyuanvideo 1.5 transformer": ({"transformer_blocks.0.attn.to_q.weight": (4, 4),
                                                "context_embedder_2.linear_1.weight": (4, 4)},
                                               "a diffusers HunyuanVideo 1.5 transformer"),
    "wan original": ({"blocks.0.self_attn.q.weight": (4, 4), "head.head.weight": (4, 4)},
                     "a Wan transformer in the original layout (full weights), not an adapter; " + HINT),
    "diffusers vae": ({"encoder.down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3), "decoder.conv_out.bias": (3,)},
                      "a VAE (autoencoder weights), not an adapter"),
    "ldm vae": ({"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3)}, "a VAE (autoencoder weights), not an adapter"),
    "clip text encoder": ({"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768)},
                          ("a CLIP text encoder (full weights; ViT-L/14, as in SD1.x and SDXL's first text encoder), "
                           "not an adapter")),
    "openclip bigG, transformers 5 names": ({"encoder.layers.0.self_attn.q_proj.weight": (1280, 1280)},
                                            ("a CLIP text encoder (full weights; OpenCLIP ViT-bigG/14, "
                                             "as in SDXL's second text encoder), not")),
    "t5 encoder": ({"encoder.block.0.layer.0.SelfAttention.q.weight": (8, 8), "shared.weight": (10, 8)},
                   "a T5 text encoder (full weights), not an adapter"),
    # issue 26 L9: part of a model's weights (the changed ones only) was "the weights of an ordinary model"
    "changed tensors only": ({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (8, 768),
                              "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (8, 768)},
                             "full weights of part of a model (SD1.x): 2 tensors such as "),
    # issue 26 L9: a UNet saved with LoRA keys beside it was "no module name maps to a known architecture"
    "unet bundled with lora keys": ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3),
                                     **{f"down_blocks.0.attentions.0.proj_in.{i}.weight": (8, 8) for i in range(15)},
                                     "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
                                     "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4)},
                                    "a diffusers UNet (full weights: 16 tensors) bundled with 2 LoRA keys (such as "),
    "ordinary model": ({"fc1.weight": (4, 4), "fc1.bias": (4,)},
                       'the weights of an ordinary model (2 tensors such as "fc1.bias") with no LoRA or PEFT adapter '
                       "layers, not an adapter"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_files_without_lora_keys_are_named(tmp_path, case):
    shapes, expected = CASES[case]
    text = described(tmp_path, shapes)
    assert text is not None and text.startswith(expected), text
    assert "\n" not in text


@pytest.mark.parametrize("case", ["kohya embedding sd1", "sdxl embedding", "diffusers vae", "t5 encoder",
                                  "ordinary model"])
def test_only_full_models_that_can_be_fine_tuned_get_the_extract_hint(tmp_path, case):
    assert HINT not in described(tmp_path, CASES[case][0])


def test_family_needs_the_shapes_when_the_keys_do_not_tell_it(tmp_path):
    shapes = CASES["diffusers sd1 unet"][0]
    assert identify_keys(list(shapes), {}).startswith("a diffusers UNet (full weights)")
    assert identify_keys(list(shapes), {}, {k: v for k, v in shapes.items()}).startswith("a diffusers SD1.x UNet")


def test_declared_architecture_is_quoted_only_when_the_keys_do_not_tell_the_family(tmp_path):
    shapes = {"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}
    text = described(tmp_path, shapes, {"modelspec.architecture": "stable-diffusion-v1"})
    assert text.startswith("a diffusers UNet (full weights), not an adapter (its metadata declares "
                           'modelspec.architecture "stable-diffusion-v1")')
    text = described(tmp_path, CASES["sdxl checkpoint"][0], {"modelspec.architecture": "stable-diffusion-v1"})
    assert "SDXL" in text and "declares" not in text


@pytest.mark.skipif(not lab_pipeline_available(), reason="the lab pipeline is not installed (scripts/train_lab.py)")
@pytest.mark.parametrize(("component", "expected"), [
    ("unet/diffusion_pytorch_model.safetensors", "a diffusers UNet (full weights), not an adapter; " + HINT),
    ("vae/diffusion_pytorch_model.safetensors", "a VAE (autoencoder weights), not an adapter"),
    ("text_encoder/model.safetensors", "a CLIP text encoder (full weights), not an adapter; " + HINT),
])
def test_lab_pipeline_components_are_named(component, expected):
    st = open_safetensors(lab_pipeline_path() / component)
    assert identify_keys(list(st.tensors), st.metadata, {k: t.shape for k, t in st.tensors.items()}) == expected


@pytest.mark.parametrize("shapes", [
    {"double_blocks.0.processor.proj_lora1.down.weight": (4, 8)},  # an XLabs Flux LoRA
    {"lora_unet_x.hada_w1_a": (8, 4), "lora_unet_x.alpha": ()},  # LyCORIS LoHa
    {"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3), "down_blocks.0.x.lora_A.weight": (4, 8)},
    {"mystery": (2, 3, 4)},  # dot-free but 3-D: not an embedding
    {"weight": (2, 768)},  # a bare parameter name is no token
    {"a.weight": (2, 2), "a.position_ids": (1, 4)},  # not only weights and biases
])
def test_unsure_or_adapter_like_files_get_no_description(tmp_path, shapes):
    assert described(tmp_path, shapes) is None


def test_dot_free_keys_are_an_embedding_only_with_shapes():
    assert identify_keys(["sks-style"], {}) is None
    assert identify_keys([], {}) is None


def test_untrusted_key_names_cannot_fill_placeholders(tmp_path):
    text = described(tmp_path, {"<{family}{n}>": (768,)})
    assert text.startswith(f'a {TI} for SD1.x (diffusers format, token "<{{family}}{{n}}>")')


def test_recognisers_are_a_data_table():
    assert isinstance(identify.KEY_KINDS, tuple) and len(identify.KEY_KINDS) >= 10
    assert all(isinstance(k, identify.KeyKind) and hasattr(k.pattern, "match") for k in identify.KEY_KINDS)
