"""Reading every published layout into one canonical form, validated against the architecture."""

import json

import numpy as np
import pytest
from conftest import random_modules, select
from safetensors.numpy import save_file

from auditkit.errors import BadInput, Unscannable
from auditkit.lora import formats
from auditkit.lora.adapter import read_adapter
from auditkit.lora.write import kohya_name, save_adapter


def assert_same_deltas(a, b):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name].delta(), b[name].delta(), rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def sd15_modules(sd15):
    names = select(sd15, ".attn1.", ".attn2.", ".ff.net.", "proj_in", "proj_out")
    mods = random_modules(sd15, names[::3], rank=4, scale=0.75)
    conv = select(sd15, "resnets.0.conv1", "downsamplers.0.conv")[:3]  # LoCon 3x3 kernels
    mods.update(random_modules(sd15, conv, rank=2, scale=2.0, seed=5))
    return mods


@pytest.mark.slow
@pytest.mark.parametrize("layout", [formats.KOHYA, formats.DIFFUSERS])
def test_layout_round_trip_gives_identical_deltas(tmp_path, sd15, sd15_modules, layout):
    path = save_adapter(sd15_modules, tmp_path / "a.safetensors", sd15, layout)
    adapter = read_adapter(path)
    assert adapter.layout == layout
    assert adapter.architecture.name == "sd15"
    assert adapter.coverage.fraction == 1.0 and not adapter.coverage.unmapped
    assert_same_deltas(adapter.modules, sd15_modules)


def _flux_blocks():
    """Every module of one Flux double and one single block, at a reduced width: a tiny architecture with
    Flux's names (the real-size modules are 3072 wide; the dense comparison would be slow)."""
    from auditkit.models import architectures
    from auditkit.models.architectures import Architecture, ModuleShape

    flux = architectures.get("flux")
    keep = ("transformer.transformer_blocks.0.", "transformer.single_transformer_blocks.0.")
    shrink = {3072: 12, 12288: 48, 18432: 72, 9216: 36, 15360: 60}
    modules = {n: ModuleShape(s.kind, shrink[s.out_features], shrink[s.in_features])
               for n, s in flux.modules.items() if n.startswith(keep)}
    originals = {}
    for name, pieces in flux.original_names.items():
        if all(c in modules for c, _, _ in pieces):
            originals[name] = tuple((c, shrink.get(a, a // 256), shrink.get(b, b // 256)) for c, a, b in pieces)
    arch = Architecture("flux-blocks", "two Flux blocks", modules, kohya_prefixes=dict(flux.kohya_prefixes),
                        original_names=originals)
    return arch, random_modules(arch, list(modules), rank=2, scale=0.75)


@pytest.mark.slow
def test_every_registered_layout_writes_files_it_detects_and_reads_back(tmp_path, sd15, sd15_modules):
    unet_only = {k: v for k, v in sd15_modules.items() if k.startswith("unet.")}
    flux, flux_modules = _flux_blocks()
    for name, layout in formats.LAYOUTS.items():  # a new layout record is covered here without a new test
        written = 0
        for arch, mods in ((sd15, unet_only), (flux, flux_modules)):  # UNet and transformer layouts
            held = {k: v for k, v in mods.items() if layout.can_hold(k)}
            if not held:
                continue
            written += 1
            assert len(held) >= 8, (name, arch.name)
            path = save_adapter(held, tmp_path / name / arch.name / "adapter_model.safetensors", arch, name)
            adapter = read_adapter(path, extra_architectures=(arch,))
            assert adapter.layout == name and adapter.coverage.fraction == 1.0, (name, arch.name)
            assert adapter.architecture is arch
            assert_same_deltas(adapter.modules, held)
        assert written, name
    with pytest.raises(ValueError, match="unknown layout"):
        save_adapter(unet_only, tmp_path / "x.safetensors", sd15, "lycoris")


@pytest.mark.slow
def test_kohya_diffusers_and_peft_files_agree(tmp_path, sd15, sd15_modules):
    unet_only = {k: v for k, v in sd15_modules.items() if k.startswith("unet.")}
    read = {lay: read_adapter(save_adapter(unet_only, tmp_path / lay / "adapter_model.safetensors", sd15, lay))
            for lay in (formats.KOHYA, formats.DIFFUSERS, formats.PEFT)}
    assert_same_deltas(read["kohya"].modules, read["diffusers"].modules)
    assert_same_deltas(read["kohya"].modules, read["peft"].modules)
    assert read["peft"].layout == "peft"


def test_conv_kernels_are_flattened_and_validated(tmp_path, sd15, sd15_modules):
    adapter = read_adapter(save_adapter(sd15_modules, tmp_path / "c.safetensors", sd15))
    conv = [m for m in adapter.modules.values() if sd15.modules[m.name].kernel == (3, 3)]
    assert conv and all(m.down.shape[1] == sd15.modules[m.name].in_features * 9 for m in conv)


def _diffusers_modules(state_dict) -> set[str]:
    """Module names of a diffusers-layout state dict, via auditkit's diffusers-layout parser."""
    parts = (formats.split_key(k, formats.DIFFUSERS) for k in state_dict)
    return {p.module for p in parts if p is not None and p.part == "down"}


def test_kohya_names_match_diffusers_own_conversion(tmp_path, sd15, sd15_modules):
    """diffusers' kohya converter (an independent implementation) maps our kohya names to the same modules."""
    diffusers = pytest.importorskip("diffusers")

    path = save_adapter(sd15_modules, tmp_path / "k.safetensors", sd15)
    state_dict, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    assert _diffusers_modules(state_dict) == set(sd15_modules)


def test_sdxl_kohya_sgm_names_match_diffusers_conversion(tmp_path, sdxl):
    diffusers = pytest.importorskip("diffusers")
    from types import SimpleNamespace

    names = select(sdxl, "attn2.to_k", "resnets.1.conv1", "resnets.0.conv2", "time_emb_proj")[::4]
    names += select(sdxl, "upsamplers.0.conv", "downsamplers.0.conv", "mid_block.resnets.1.conv2",
                    "mid_block.attentions.0.proj_in")
    mods = random_modules(sdxl, sorted(set(names)), rank=2, scale=1.0)
    path = save_adapter(mods, tmp_path / "xl.safetensors", sdxl)
    adapter = read_adapter(path)
    assert adapter.architecture.name == "sdxl" and set(adapter.modules) == set(mods)
    raw_keys = list(adapter.coverage.mapped)
    assert any("input_blocks" in k for k in raw_keys) and any("output_blocks" in k for k in raw_keys)
    layout = SimpleNamespace(layers_per_block=2)
    state_dict, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=layout)
    assert _diffusers_modules(state_dict) == set(mods)


def test_legacy_diffusers_processor_names(tmp_path, sd15):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    mods = random_modules(sd15, [name], rank=3, scale=1.0)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    save_file({f"{base}.down.weight": mods[name].down, f"{base}.up.weight": mods[name].up},
              str(tmp_path / "legacy.safetensors"))
    adapter = read_adapter(tmp_path / "legacy.safetensors")
    assert list(adapter.modules) == [name]
    assert_same_deltas(adapter.modules, mods)


def test_kohya_text_encoder_and_alpha_scale(tmp_path, sd15):
    te = select(sd15, "self_attn.q_proj", component="text_encoder.")[:2]
    mods = random_modules(sd15, te, rank=4, scale=2.5)
    adapter = read_adapter(save_adapter(mods, tmp_path / "te.safetensors", sd15))
    assert all(kohya_name(sd15, n).startswith("lora_te_text_model_encoder_layers_") for n in te)
    assert {round(m.scale, 6) for m in adapter.modules.values()} == {2.5}
    assert_same_deltas(adapter.modules, mods)


def test_missing_alpha_means_scale_one_and_is_noted(tmp_path, sd15):
    name = select(sd15, "attn2.to_k")[0]
    m = random_modules(sd15, [name])[name]
    k = kohya_name(sd15, name)
    save_file({f"{k}.lora_down.weight": m.down, f"{k}.lora_up.weight": m.up}, str(tmp_path / "n.safetensors"))
    adapter = read_adapter(tmp_path / "n.safetensors")
    assert adapter.modules[name].scale == 1.0
    assert any("scale taken as 1.0" in n for n in adapter.notes)


def test_peft_config_alpha_pattern_and_rslora(tmp_path, sd15):
    names = select(sd15, "attn2.to_k")[:2]
    mods = random_modules(sd15, names, rank=4, scale=1.0)
    path = tmp_path / "adapter_model.safetensors"
    save_adapter(mods, path, sd15, formats.PEFT)
    rel0 = names[0].split(".", 1)[1]
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {rel0: 2}}))
    adapter = read_adapter(path)
    assert adapter.modules[names[0]].scale == pytest.approx(2 / 2.0)  # alpha / sqrt(r)
    assert adapter.modules[names[1]].scale == pytest.approx(8 / 2.0)


def test_unmapped_keys_are_reported_not_dropped(tmp_path, sd15):
    name = select(sd15, "attn2.to_v")[0]
    m = random_modules(sd15, [name])[name]
    k = kohya_name(sd15, name)
    save_file({f"{k}.lora_down.weight": m.down, f"{k}.lora_up.weight": m.up, f"{k}.alpha": np.array(4.0, np.float32),
               "lora_unet_not_a_module.lora_down.weight": m.down, "lora_unet_not_a_module.lora_up.weight": m.up,
               "bundle_emb.foo.string_to_param.*": np.zeros((1, 768), np.float32)},
              str(tmp_path / "u.safetensors"))
    adapter = read_adapter(tmp_path / "u.safetensors")
    cov = adapter.coverage
    assert len(cov.mapped) == 3 and len(cov.unmapped) == 2 and len(cov.ignored) == 1
    assert cov.fraction == pytest.approx(0.6)


@pytest.mark.parametrize("suffix,label", [("oft_blocks", "OFT"), ("oft_R", "OFT")])
def test_unreadable_algorithms_are_named_and_refused(tmp_path, suffix, label):
    path = tmp_path / "ly.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{suffix}": np.ones((2, 2), np.float32)}, str(path))
    with pytest.raises(Unscannable, match=label):
        read_adapter(path)


@pytest.mark.parametrize("suffix,lacking", [("hada_w1_a", "hada_w1_b"), ("lokr_w1", "lokr_w2"),
                                            ("lora_down.weight", "up factor"), ("diff_b", "weight difference")])
def test_a_file_of_incomplete_modules_says_what_they_lack(tmp_path, suffix, lacking):
    path = tmp_path / "ly.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{suffix}": np.ones((2, 2), np.float32)}, str(path))
    with pytest.raises(Unscannable, match=f"no complete adapter module.*{lacking}"):
        read_adapter(path)


def test_file_mapping_no_module_fails_closed(tmp_path):
    path = tmp_path / "none.safetensors"
    save_file({"lora_unet_nowhere.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_unet_nowhere.lora_up.weight": np.ones((4, 2), np.float32)}, str(path))
    with pytest.raises(Unscannable, match="no module name maps"):
        read_adapter(path)


def test_shapes_fitting_no_architecture_are_refused(tmp_path, sd15):
    name = select(sd15, "attn2.to_k")[0]
    k = kohya_name(sd15, name)
    save_file({f"{k}.lora_down.weight": np.ones((4, 1024), np.float32),  # 1024: SD2's text width...
               f"{k}.lora_up.weight": np.ones((321, 4), np.float32)},  # ...but 321 outputs fit nothing
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(BadInput, match="shapes fit no known architecture"):
        read_adapter(tmp_path / "bad.safetensors")


def test_shapes_choose_between_architectures(tmp_path, sd15):
    """attn2.to_k reads 768-d text in SD1.5 and 1024-d in SD2: the shapes decide."""
    from auditkit.models import architectures

    sd2 = architectures.get("sd2")
    name = select(sd2, "attn2.to_k")[0]
    mods = random_modules(sd2, [name])
    assert read_adapter(save_adapter(mods, tmp_path / "sd2.safetensors", sd2)).architecture.name == "sd2"
    mods15 = random_modules(sd15, [name])
    assert read_adapter(save_adapter(mods15, tmp_path / "sd15.safetensors", sd15)).architecture.name == "sd15"


def test_kohya_files_get_one_alpha_and_keep_every_update(tmp_path, sd15):
    """Differing alphas are folded into the up factors (diffusers mis-scales per-module kohya alphas)."""
    from conftest import random_modules, select

    from auditkit.lora.io import open_safetensors

    names = select(sd15, ".attn1.to_q")[:6]
    mods = {}
    for i, n in enumerate(names):
        mods.update(random_modules(sd15, [n], rank=(2, 4)[i % 2], scale=(1.0, 0.5, 0.25)[i % 3], seed=i))
    path = save_adapter(mods, tmp_path / "mixed.safetensors", sd15)
    st = open_safetensors(path)
    alphas = {float(st.array(k).reshape(-1)[0]) for k in st.tensors if k.endswith(".alpha")}
    assert len(alphas) == 1
    back = read_adapter(path)
    for n, m in mods.items():
        np.testing.assert_allclose(back.modules[n].delta(), m.delta(), rtol=1e-5, atol=1e-7)


def test_a_textual_inversion_embedding_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": np.ones((2, 768), np.float32)}, str(path))
    with pytest.raises(Unscannable, match="no LoRA keys recognised.*textual-inversion embedding"):
        read_adapter(path)


def test_a_git_lfs_pointer_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 151108831\n")
    with pytest.raises(BadInput, match="Git LFS pointer.*git lfs pull"):
        read_adapter(path)


@pytest.mark.parametrize("config", [{"peft_type": "LOKR", "r": "4", "alpha": 2},
                                    {"peft_type": "LOHA", "r": 4, "rank_pattern": {"to_q": 0}}])
def test_a_peft_config_with_a_bad_rank_is_named(tmp_path, config):
    name = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.hada_w{i}_{ab}": np.ones((320, 4) if ab == "a" else (4, 320), np.float32)
               for i in (1, 2) for ab in "ab"}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="adapter_config.json.*must be a positive integer"):
        read_adapter(tmp_path / "adapter_model.safetensors")


def test_a_text_encoder_only_adapter_that_fits_several_models_says_so(tmp_path, sd15, sdxl):
    names = [n for n in sd15.modules if n.startswith("text_encoder.") and n.endswith("self_attn.q_proj")][:4]
    assert all(n in sdxl.modules and sdxl.modules[n] == sd15.modules[n] for n in names)  # CLIP-L in both
    path = save_adapter(random_modules(sd15, names), tmp_path / "te.safetensors", sd15, formats.DIFFUSERS)
    adapter = read_adapter(path)
    assert {"sd15", "sdxl"} <= set(adapter.architecture_candidates)
    assert any("fit several architectures" in n and "--arch" in n for n in adapter.notes)
    assert not any("several" in n for n in read_adapter(path, arch="sdxl").notes)


@pytest.mark.parametrize("content,message", [
    (None, "adapter_config.json is not a regular file"),  # a FIFO: refused, never waited on
    ("x" * ((1 << 20) + 1), "adapter_config.json is larger than 1 MiB"),
    ("[" * 100_000 + "]" * 100_000, "adapter_config.json is not valid JSON"),
])
def test_a_hostile_peft_config_is_refused_in_one_line(tmp_path, content, message):
    import os

    name = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.lora_A.weight": np.ones((4, 320), np.float32),
               f"{name}.lora_B.weight": np.ones((320, 4), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    cfg = tmp_path / "adapter_config.json"
    if content is None:
        os.mkfifo(cfg)
    else:
        cfg.write_text(content)
    with pytest.raises(BadInput, match=message) as err:
        read_adapter(tmp_path / "adapter_model.safetensors")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("meta, message", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),  # issue 26 M3: was a RecursionError
    ('{"r": 4, "r": 8}', "duplicate key 'r'"),
])
def test_hostile_lora_adapter_metadata_is_refused_in_one_line(tmp_path, sd15, meta, message):
    from conftest import assert_one_line_error

    names = [n for n in sd15.modules if n.endswith("attn2.to_k")][:1]
    path = save_adapter(random_modules(sd15, names), tmp_path / "d.safetensors", sd15, formats.DIFFUSERS,
                        metadata={"lora_adapter_metadata": meta})
    assert_one_line_error(lambda: read_adapter(path), path, message)


@pytest.mark.parametrize("base_model, expected", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("runwayml/stable-diffusion-v1-5", "sd15"),
])
def test_a_peft_text_encoder_adapter_is_read_for_the_base_its_config_names(tmp_path, sd15, base_model, expected):
    # issue 26 (real files): SDXL's first text encoder has SD1.x's shapes; adapter_config.json says which it was
    names = [n for n in sd15.modules if n.startswith("text_encoder.") and n.endswith("self_attn.q_proj")][:2]
    path = save_adapter(random_modules(sd15, names), tmp_path / "adapter_model.safetensors", sd15, formats.PEFT)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_model}))
    adapter = read_adapter(path)
    assert adapter.architecture.name == expected and {"sd15", "sdxl"} <= set(adapter.architecture_candidates)
    assert not any("several" in n for n in adapter.notes)


def test_the_exact_conversion_handed_to_diffusers_warns_of_nothing(tmp_path, sd15):
    # issue 26 L15: factors read from a memory map are read-only; torch.from_numpy warned of them
    import warnings

    pytest.importorskip("torch")
    from auditkit.lora.write import diffusers_source

    names = [n for n in sd15.modules if n.endswith("attn2.to_k")][:2]
    adapter = read_adapter(save_adapter(random_modules(sd15, names), tmp_path / "a.safetensors", sd15))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = diffusers_source(adapter, ())
    assert len(state) == 2 * len(names) and all(t.numpy().flags.writeable for t in state.values())


def test_cloneofsimos_lora_diffusion_format_is_named_and_refused(tmp_path):
    # issue 26 (real files): positional keys gave "no LoRA keys recognised"; their module order is not reproduced
    from conftest import assert_one_line_error

    tensors = {f"{c}:{i}:{p}": np.ones((4, 320) if p == "down" else (320, 4), np.float32)
               for c, n in (("unet", 3), ("text_encoder", 2)) for i in range(n) for p in ("up", "down")}
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata={"unet": '["CrossAttention", "Attention", "GEGLU"]',
                                            "text_encoder": '["CLIPAttention"]'})
    assert_one_line_error(lambda: read_adapter(path), path, "cloneofsimo's lora_diffusion format")
    assert_one_line_error(lambda: read_adapter(path), path, "not supported")
