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
from conftest import run_cli
from safetensors.numpy import save_file

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
