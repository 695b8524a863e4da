"""Adapters of the 2026 families (Qwen-Image, Z-Image, Flux.2 dev/Klein, Chroma, Flux.1 Kontext, Wan 2.1/2.2,
HunyuanVideo 1.5) read against their real-size tables: named with full key coverage in each layout their
trainers write, the same updates diffusers' own converters give, ties between architectures with the same
names and shapes broken by metadata only, and a partial read never named with certainty.

Files are written by code the way each tool writes them: diffusers/peft ``transformer.<path>.lora_A/B``,
ComfyUI ``diffusion_model.<name>``, musubi-tuner/kohya ``lora_unet_<name>`` with alphas; the original
(non-diffusers) names and the rows of fused modules are written out below by hand from diffusers'
converters (scripts/convert_*_to_diffusers.py, loaders/lora_conversion_utils.py), not read from the tables.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import low_rank_error, run_cli
from safetensors.numpy import load_file, save_file

from auditkit.lora.adapter import read_adapter
from auditkit.models import architectures

T = "transformer."

# A typical adapter per family: every linear module of its blocks (what ai-toolkit, musubi-tuner and
# diffusers' training scripts target by default or with "all linear"), as a regex over canonical names.
BLOCKS = {
    "qwen-image": r"transformer_blocks\.\d+\.(attn|img_mlp|txt_mlp|img_mod|txt_mod)\.",
    "z-image": r"(layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward)\.",
    "flux2-dev": r"(single_)?transformer_blocks\.\d+\.",
    "flux2-klein-4b": r"(single_)?transformer_blocks\.\d+\.",
    "flux2-klein-9b": r"(single_)?transformer_blocks\.\d+\.",
    "chroma": r"(single_)?transformer_blocks\.\d+\.",
    "flux-kontext": r"(single_)?transformer_blocks\.\d+\.",
    "wan21-1.3b": r"blocks\.\d+\.",
    "wan21-14b": r"blocks\.\d+\.",
    "wan22-a14b": r"blocks\.\d+\.",
    "hunyuanvideo15": r"transformer_blocks\.\d+\.",
}
# Without metadata, the architectures a typical adapter fits alike (the first is assumed). Chroma's blocks
# are Flux.1's (its modulation lives outside them), Kontext is Flux.1's transformer, and each Wan 2.2 A14B
# expert is Wan 2.1 14B's.
FITS = {
    "chroma": ["flux", "flux-kontext", "chroma"],
    "flux-kontext": ["flux", "flux-kontext"],
    "wan21-14b": ["wan21-14b", "wan22-a14b"],
    "wan22-a14b": ["wan21-14b", "wan22-a14b"],
}
# What the publishers call them, as trainers copy it into the file's metadata
CLAIMS = {"chroma": ("modelspec.architecture", "chroma/lora"),
          "flux-kontext": ("modelspec.architecture", "Flux.1-Kontext-dev/lora"),
          "wan21-14b": ("ss_base_model_version", "wan2.1_t2v_14b"),
          "wan22-a14b": ("modelspec.architecture", "Wan2.2-T2V-A14B/lora")}


def block_modules(name: str, blocks: int | None = None) -> list[str]:
    """The typical adapter's canonical modules (of the first ``blocks`` blocks of each kind, or all)."""
    arch = architectures.get(name)
    pattern = re.compile(rf"^{re.escape(T)}{BLOCKS[name]}")
    names = [n for n in arch.modules if pattern.match(n)]
    if blocks is not None:
        names = [n for n in names if int(re.search(r"\.(\d+)\.", n).group(1)) < blocks]
    return names


def random_factors(arch, names, rank=1, seed=0, dtype=np.float16) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    out = {}
    for n in names:
        s = arch.shape(n)
        out[n] = (rng.normal(0, 0.1, (rank, s.flat_in)).astype(dtype), rng.normal(0, 0.1, (s.out_features, rank))
                  .astype(dtype))
    return out


def diffusers_file(path, name, names=None, metadata=None, rank=1):
    """A diffusers/peft-layout file (``transformer.<path>.lora_A.weight``) of ``name``'s typical adapter."""
    arch = architectures.get(name)
    tensors = {}
    for module, (down, up) in random_factors(arch, names or block_modules(name), rank).items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
    save_file(tensors, str(path), metadata=metadata)
    return path


def plain(text: str) -> str:
    """The CLI's output as one line, without the panel's borders and wrapping."""
    return re.sub(r"[│\s]+", " ", text)


# --- every family is named, with full coverage, from the diffusers layout -----------------------------

@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_typical_adapter_of_each_family_is_named_with_full_coverage(tmp_path, name):
    adapter = read_adapter(diffusers_file(tmp_path / f"{name}.safetensors", name))
    fits = FITS.get(name, [name])
    assert adapter.coverage.fraction == 1.0 and adapter.coverage.unmapped == []
    assert adapter.architecture.name == fits[0] and adapter.architecture_candidates == fits
    assert adapter.architecture_certainty == ("certain" if len(fits) == 1 else "ambiguous")
    assert len(adapter.modules) == len(block_modules(name))


@pytest.mark.parametrize("name", list(CLAIMS))
def test_metadata_breaks_a_tie_between_architectures_of_the_same_names_and_shapes(tmp_path, name):
    key, value = CLAIMS[name]
    adapter = read_adapter(diffusers_file(tmp_path / "a.safetensors", name, metadata={key: value}))
    assert adapter.architecture.name == name and adapter.architecture_certainty == "certain"
    assert not any("fit several architectures" in n for n in adapter.notes)


def test_metadata_never_overrides_the_structure(tmp_path):
    """A Qwen-Image file that claims Flux.1 is read as Qwen-Image: only Qwen-Image's table holds its 60 blocks."""
    adapter = read_adapter(diffusers_file(tmp_path / "a.safetensors", "qwen-image",
                                          metadata={"modelspec.architecture": "flux-1-dev/lora"}))
    assert adapter.architecture.name == "qwen-image" and adapter.architecture_certainty == "certain"


def test_a_tie_without_a_claim_is_reported_not_hidden(tmp_path):
    path = diffusers_file(tmp_path / "kontext-or-flux.safetensors", "flux-kontext")
    adapter = read_adapter(path)
    assert adapter.architecture_certainty == "ambiguous"
    assert any("fit several architectures (flux, flux-kontext)" in n and "--arch" in n for n in adapter.notes)
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "[ambiguous: fits flux, flux-kontext alike]" in plain(result.stdout)


# --- a partial read is never named with certainty (the Qwen-Image file once read as Flux.1 at 44%) --------

QWEN_IMAGE = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
              "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
              "axes_dims_rope": [16, 56, 56]}  # Qwen/Qwen-Image transformer/config.json


@pytest.fixture(scope="module")
def qwen_meta_modules():
    """Qwen-Image's linear modules -> (out, in), from diffusers' own class on the meta device (not auditkit's
    table), so this file is what a trainer of the real model writes whether or not auditkit knows the model."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = diffusers.QwenImageTransformer2DModel(**QWEN_IMAGE)
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_a_diffusers_qwen_image_lora_is_named_qwen_image_not_flux(tmp_path, qwen_meta_modules):
    """Every linear module of the 60 blocks, as ai-toolkit/diffusers write it. Blocks 0-18 have Flux.1's names
    and shapes (to_q, add_k_proj, … 3072x3072): read against the tables of an auditkit that knew no Qwen-Image
    this file was named ``flux`` at 44% key coverage and ``inspect`` exited 0."""
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (out, inp) in qwen_meta_modules.items():
        if name.startswith("transformer_blocks."):
            tensors[f"transformer.{name}.lora_A.weight"] = rng.normal(0, 0.1, (1, inp)).astype(np.float16)
            tensors[f"transformer.{name}.lora_B.weight"] = rng.normal(0, 0.1, (out, 1)).astype(np.float16)
    path = tmp_path / "qwen_image_lora.safetensors"
    save_file(tensors, str(path))
    adapter = read_adapter(path)
    assert (adapter.architecture.name, adapter.coverage.fraction) == ("qwen-image", 1.0), \
        f"read as {adapter.architecture.name} at {adapter.coverage.fraction:.0%} key coverage"
    assert adapter.architecture_certainty == "certain" and len(adapter.modules) == 60 * 14
    result = run_cli("inspect", "--json", path)
    assert result.returncode == 0, result.stderr
    assert '"architecture": "qwen-image"' in result.stdout


def test_a_partial_read_names_its_best_fit_as_uncertain_and_inspect_fails_closed(tmp_path):
    """A file of a model auditkit does not know: half its modules have Qwen-Image's names and shapes."""
    tensors = {}
    for module, (down, up) in random_factors(architectures.get("qwen-image"), block_modules("qwen-image", 2)).items():
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = down, up
        other = module.replace("transformer_blocks.", "unknown_blocks.")
        tensors[f"{other}.lora_A.weight"], tensors[f"{other}.lora_B.weight"] = down, up
    path = tmp_path / "unknown_model.safetensors"
    save_file(tensors, str(path))
    adapter = read_adapter(path)
    assert adapter.coverage.fraction == 0.5 and adapter.architecture_certainty == "partial"
    assert any("only 50% of its keys map to" in n and "uncertain" in n for n in adapter.notes)
    result = run_cli("inspect", path)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "[uncertain: only 50% of the keys map to it]" in plain(result.stdout)
    assert read_adapter(path, arch=adapter.architecture.name).architecture_certainty == "given"


# --- the trainers' own layouts -----------------------------------------------------------------------------

RANK, ALPHA = 2, 1.0  # scale 0.5


def factor_pair(rng, rows: int, cols: int) -> tuple:
    return (rng.normal(0, 0.1, (RANK, cols)).astype(np.float32), rng.normal(0, 0.1, (rows, RANK)).astype(np.float32))


def write(path, modules: dict[str, tuple], key, down="lora_down.weight", up="lora_up.weight", alpha=True):
    """modules: file module name -> (down, up); ``key(name)`` spells the name as the file does."""
    tensors = {}
    for name, (d, u) in modules.items():
        tensors[f"{key(name)}.{down}"], tensors[f"{key(name)}.{up}"] = d, u
        if alpha:
            tensors[f"{key(name)}.alpha"] = np.asarray(ALPHA, np.float32)
    save_file(tensors, str(path))
    return path


def kohya(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def comfyui(name: str) -> str:
    return "diffusion_model." + name


def diffusers_updates(pipeline: str, path) -> dict[str, tuple]:
    """Module -> (A, B, scale) as diffusers' pipeline ``lora_state_dict`` converts the file (its converters
    bake kohya/musubi alphas into the factors: scale 1)."""
    diffusers = pytest.importorskip("diffusers")
    state = getattr(diffusers, pipeline).lora_state_dict(str(path))
    state = state[0] if isinstance(state, tuple) else state
    return {k[:-len(".lora_A.weight")]: (a.double().numpy(), state[k.replace("lora_A", "lora_B")].double().numpy(), 1.0)
            for k, a in state.items() if k.endswith(".lora_A.weight")}


def assert_same_updates(adapter, theirs: dict[str, tuple]) -> None:
    assert set(theirs) == set(adapter.modules)
    for name, (d, u, s) in theirs.items():
        m = adapter.modules[name]
        assert low_rank_error((m.down, m.up, m.scale), (d, u, s)) < 1e-6, name


# Qwen-Image and Z-Image name their original modules as diffusers does: musubi-tuner writes
# lora_unet_<path>, ComfyUI diffusion_model.<path> (diffusers: _convert_non_diffusers_qwen_lora_to_diffusers,
# _convert_non_diffusers_z_image_lora_to_diffusers)
SAME_NAMES = {"qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline"}


@pytest.mark.parametrize("name", list(SAME_NAMES))
@pytest.mark.parametrize("spelling", ["musubi", "comfyui"])
def test_musubi_and_comfyui_files_of_diffusers_named_families_read_as_diffusers_converts_them(tmp_path, name,
                                                                                             spelling):
    arch = architectures.get(name)
    rng = np.random.default_rng(1)
    modules = {n.removeprefix(T): factor_pair(rng, arch.shape(n).out_features, arch.shape(n).flat_in)
               for n in block_modules(name, blocks=2)}
    path = write(tmp_path / "a.safetensors", modules, kohya if spelling == "musubi" else comfyui)
    adapter = read_adapter(path)
    assert adapter.coverage.fraction == 1.0 and adapter.architecture.name == name
    assert adapter.layout == ("kohya" if spelling == "musubi" else "original")
    assert_same_updates(adapter, diffusers_updates(SAME_NAMES[name], path))


# Wan's original names (the Wan-AI repository's, which musubi-tuner and ComfyUI files use) -> diffusers paths,
# written out from diffusers' scripts/convert_wan_to_diffusers.py and _convert_musubi_wan_lora_to_diffusers
_QKVO = dict(zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True))
WAN_ORIGINAL = {**{f"self_attn.{o}": f"attn1.{c}" for o, c in _QKVO.items()},
                **{f"cross_attn.{o}": f"attn2.{c}" for o, c in _QKVO.items()},
                "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
WAN_WIDTH = {"wan21-1.3b": (1536, 8960), "wan21-14b": (5120, 13824)}


def wan_originals(name: str, blocks: int = 2) -> dict[str, tuple]:
    rng = np.random.default_rng(2)
    dim, ffn = WAN_WIDTH[name]
    shapes = {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    return {f"blocks.{i}.{o}": factor_pair(rng, *shapes.get(o, (dim, dim)))
            for i in range(blocks) for o in WAN_ORIGINAL}


@pytest.mark.parametrize("name", list(WAN_WIDTH))
@pytest.mark.parametrize("spelling", ["musubi", "comfyui"])
def test_wan_files_in_original_names_read_as_diffusers_converts_them(tmp_path, name, spelling):
    originals = wan_originals(name)
    path = write(tmp_path / "wan.safetensors", originals, kohya if spelling == "musubi" else comfyui)
    adapter = read_adapter(path)
    assert adapter.coverage.fraction == 1.0 and adapter.architecture.name == name
    for original, (d, _) in originals.items():
        block, _, module = original.partition(".")[2].partition(".")
        m = adapter.modules[f"{T}blocks.{block}.{WAN_ORIGINAL[module]}"]
        np.testing.assert_array_equal(m.down, d)
        assert m.scale == ALPHA / RANK
    theirs = diffusers_updates("WanPipeline", path)
    assert_same_updates(adapter, theirs)


def test_a_wan_2_2_expert_file_is_named_by_its_metadata(tmp_path):
    path = tmp_path / "high_noise.safetensors"
    write(path, wan_originals("wan21-14b"), kohya)
    assert read_adapter(path).architecture_certainty == "ambiguous"
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"ss_base_model_version": "wan2.2_t2v_a14b_high_noise"})
    adapter = read_adapter(path)
    assert adapter.architecture.name == "wan22-a14b" and adapter.architecture_certainty == "certain"


# Flux.2's original (BFL) names, which ai-toolkit and ComfyUI files use: fused q, k, v in double blocks (rows
# q | k | v), one fused qkv+MLP linear1 in single blocks (diffusers keeps it fused: to_qkv_mlp_proj)
# (diffusers scripts/convert_flux2_to_diffusers.py, _convert_non_diffusers_flux2_lora_to_diffusers)
FLUX2 = {"flux2-dev": 6144, "flux2-klein-4b": 3072, "flux2-klein-9b": 4096}


@pytest.mark.parametrize("name", list(FLUX2))
def test_flux2_files_in_bfl_names_split_their_fused_modules_as_diffusers_does(tmp_path, name):
    d = FLUX2[name]
    rng = np.random.default_rng(3)
    originals = {"double_blocks.0.img_attn.qkv": factor_pair(rng, 3 * d, d),
                 "double_blocks.0.txt_attn.qkv": factor_pair(rng, 3 * d, d),
                 "double_blocks.0.img_attn.proj": factor_pair(rng, d, d),
                 "double_blocks.0.img_mlp.0": factor_pair(rng, 6 * d, d),
                 "double_blocks.0.img_mlp.2": factor_pair(rng, d, 3 * d),
                 "single_blocks.1.linear1": factor_pair(rng, 3 * d + 6 * d, d),
                 "single_blocks.1.linear2": factor_pair(rng, d, d + 3 * d)}
    path = write(tmp_path / "flux2.safetensors", originals, comfyui, "lora_A.weight", "lora_B.weight", alpha=False)
    adapter = read_adapter(path)
    assert adapter.coverage.fraction == 1.0 and adapter.architecture.name == name
    down, up = originals["double_blocks.0.img_attn.qkv"]
    for k, module in enumerate(("to_q", "to_k", "to_v")):
        m = adapter.modules[f"{T}transformer_blocks.0.attn.{module}"]
        assert low_rank_error((m.down, m.up, m.scale), (down, up[k * d:(k + 1) * d], 1.0)) < 1e-6
    assert adapter.modules[f"{T}single_transformer_blocks.1.attn.to_qkv_mlp_proj"].up.shape == (9 * d, RANK)
    assert_same_updates(adapter, diffusers_updates("Flux2Pipeline", path))


# HunyuanVideo 1.5's original names (Tencent's repository; diffusers scripts/convert_hunyuan_video1_5_to_diffusers.py).
# diffusers 0.42 has no LoRA loader for HunyuanVideo 1.5: nothing to compare with.
HUNYUAN15 = {"img_attn_q": "attn.to_q", "img_attn_k": "attn.to_k", "img_attn_v": "attn.to_v",
             "img_attn_proj": "attn.to_out.0", "txt_attn_q": "attn.add_q_proj", "txt_attn_proj": "attn.to_add_out",
             "img_mlp.fc1": "ff.net.0.proj", "txt_mlp.fc2": "ff_context.net.2", "img_mod.linear": "norm1.linear"}


def test_hunyuanvideo15_files_in_original_names_read_into_diffusers_modules(tmp_path):
    rng = np.random.default_rng(4)
    shapes = {"img_mlp.fc1": (8192, 2048), "txt_mlp.fc2": (2048, 8192), "img_mod.linear": (12288, 2048)}
    originals = {f"double_blocks.{i}.{o}": factor_pair(rng, *shapes.get(o, (2048, 2048)))
                 for i in (0, 53) for o in HUNYUAN15}
    path = write(tmp_path / "hv15.safetensors", originals, comfyui)
    adapter = read_adapter(path)
    assert adapter.coverage.fraction == 1.0 and adapter.architecture.name == "hunyuanvideo15"
    assert adapter.architecture_certainty == "certain"
    for original, (_, u) in originals.items():
        _, i, module = original.split(".", 2)
        np.testing.assert_array_equal(adapter.modules[f"{T}transformer_blocks.{i}.{HUNYUAN15[module]}"].up, u)


def test_chroma_files_in_bfl_names_with_the_approximator_are_chroma(tmp_path):
    """Chroma's blocks have Flux.1's BFL names and shapes; its distilled guidance approximator is its own."""
    rng = np.random.default_rng(5)
    originals = {"double_blocks.0.img_attn.qkv": factor_pair(rng, 3 * 3072, 3072),
                 "single_blocks.3.linear2": factor_pair(rng, 3072, 3072 + 12288),
                 "distilled_guidance_layer.layers.4.in_layer": factor_pair(rng, 5120, 5120),
                 "distilled_guidance_layer.out_proj": factor_pair(rng, 3072, 5120)}
    adapter = read_adapter(write(tmp_path / "chroma.safetensors", originals, comfyui))
    assert adapter.coverage.fraction == 1.0
    assert adapter.architecture.name == "chroma" and adapter.architecture_certainty == "certain"
    assert f"{T}distilled_guidance_layer.layers.4.linear_1" in adapter.modules
    blocks_only = {k: v for k, v in originals.items() if "distilled" not in k}
    assert read_adapter(write(tmp_path / "blocks.safetensors", blocks_only, kohya)).architecture_candidates == [
        "flux", "flux-kontext", "chroma"]


def test_z_image_fused_qkv_files_split_into_q_k_v(tmp_path):
    """kohya-style trainers wrapping Z-Image's original tree write attention.qkv (rows q | k | v) and
    attention.out (diffusers: the qkv branch of _convert_non_diffusers_z_image_lora_to_diffusers)."""
    rng = np.random.default_rng(6)
    qkv, out = factor_pair(rng, 3 * 3840, 3840), factor_pair(rng, 3840, 3840)
    adapter = read_adapter(write(tmp_path / "z.safetensors", {"layers.29.attention.qkv": qkv,
                                                              "noise_refiner.1.attention.out": out}, kohya))
    assert adapter.coverage.fraction == 1.0 and adapter.architecture.name == "z-image"
    for k, module in enumerate(("to_q", "to_k", "to_v")):
        m = adapter.modules[f"{T}layers.29.attention.{module}"]
        np.testing.assert_array_equal(m.up, qkv[1][k * 3840:(k + 1) * 3840])
    np.testing.assert_array_equal(adapter.modules[f"{T}noise_refiner.1.attention.to_out.0"].up, out[1])
