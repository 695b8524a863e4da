"""Flux.1 adapters in every naming people publish, read against the real-size ``flux`` table.

Files are written by code the way each tool writes them (kohya sd-scripts' fused ``lora_unet_double_blocks_…``
with one shared down factor, ComfyUI's ``diffusion_model.`` copy of them, BFL names with ``lora_A``/``lora_B``,
XLabs' processor LoRAs, diffusers/ai-toolkit ``transformer.…``, peft, and the ``lora_transformer_`` kohya
spelling of diffusers paths), for a handful of modules at rank 2. Every file must read with full coverage
into the same per-module updates, and into the updates diffusers' own conversion
(``FluxPipeline.lora_state_dict``) gives for every module diffusers maps.

The expected split of each fused module is written out below by hand (not read from the shipped table),
so the table is checked, not trusted.
"""

import json

import numpy as np
import pytest
from conftest import factors, low_rank_error
from safetensors.numpy import save_file

from auditkit.errors import BadInput, Unscannable
from auditkit.lora import formats
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import kohya_name, save_adapter
from auditkit.models import architectures

D, MLP = 3072, 12288  # Flux.1: hidden width, MLP width
T = "transformer."

# Original (BFL) module -> the diffusers modules its output rows hold, in order, with their row ranges
# (diffusers loaders/lora_conversion_utils.py; final_layer's adaLN stores (shift, scale), diffusers' norm_out
# (scale, shift))
SPLITS = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, D), ("transformer_blocks.0.attn.to_k", 0, D),
                                     ("transformer_blocks.0.attn.to_v", 0, D)],
    "double_blocks.0.txt_attn.qkv": [("transformer_blocks.0.attn.add_q_proj", 0, D),
                                     ("transformer_blocks.0.attn.add_k_proj", 0, D),
                                     ("transformer_blocks.0.attn.add_v_proj", 0, D)],
    "double_blocks.0.img_attn.proj": [("transformer_blocks.0.attn.to_out.0", 0, D)],
    "double_blocks.0.txt_attn.proj": [("transformer_blocks.0.attn.to_add_out", 0, D)],
    "double_blocks.0.img_mlp.0": [("transformer_blocks.0.ff.net.0.proj", 0, MLP)],
    "double_blocks.0.txt_mlp.2": [("transformer_blocks.0.ff_context.net.2", 0, D)],
    "double_blocks.0.img_mod.lin": [("transformer_blocks.0.norm1.linear", 0, 6 * D)],
    "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_q", 0, D),
                                ("single_transformer_blocks.1.attn.to_k", 0, D),
                                ("single_transformer_blocks.1.attn.to_v", 0, D),
                                ("single_transformer_blocks.1.proj_mlp", 0, MLP)],
    "single_blocks.1.linear2": [("single_transformer_blocks.1.proj_out", 0, D)],
    "single_blocks.1.modulation.lin": [("single_transformer_blocks.1.norm.linear", 0, 3 * D)],
    "txt_in": [("context_embedder", 0, D)],
    "final_layer.linear": [("proj_out", 0, 64)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", D, 2 * D), ("norm_out.linear", 0, D)],
}
IN = {"double_blocks.0.img_mlp.0": D, "double_blocks.0.txt_mlp.2": MLP, "single_blocks.1.linear2": D + MLP,
      "txt_in": 4096}
RANK, ALPHA = 2, 1.0  # scale 0.5


@pytest.fixture(scope="module")
def flux():
    return architectures.get("flux")


@pytest.fixture(scope="module")
def originals():
    """Original module -> (down, up) at rank 2, as a kohya/BFL trainer holds them (one down per module)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, pieces in SPLITS.items():
        rows = sum(stop - start for _, start, stop in pieces)
        out[name] = (rng.normal(0, 0.1, (RANK, IN.get(name, D))).astype(np.float32),
                     rng.normal(0, 0.1, (rows, RANK)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def expected(originals):
    """The per-module updates the originals hold, split by hand."""
    mods: dict[str, dict] = {}
    for name, (_, up) in originals.items():
        offset = 0
        for module, start, stop in SPLITS[name]:
            rows = mods.setdefault(T + module, {})
            rows[(start, stop)] = up[offset:offset + stop - start]
            offset += stop - start
    out = {}
    for module, rows in mods.items():
        up = np.concatenate([rows[k] for k in sorted(rows)])
        down = next(d for n, (d, _) in originals.items() if any(T + m == module for m, _, _ in SPLITS[n]))
        out[module] = LoraModule(module, down, up, ALPHA / RANK)
    return out


# --- files as each tool writes them ------------------------------------------------------------

def _sd_scripts(originals, prefix="lora_unet_", down="lora_down", up="lora_up", dotted=False, alpha=True) -> dict:
    out = {}
    for name, (d, u) in originals.items():
        key = prefix + (name if dotted else name.replace(".", "_"))
        out[f"{key}.{down}.weight"], out[f"{key}.{up}.weight"] = d, u
        if alpha:
            out[f"{key}.alpha"] = np.asarray(ALPHA, np.float32)
    return out


def kohya(originals, expected, flux, path):  # sd-scripts: fused q/k/v with one shared lora_down
    save_file(_sd_scripts(originals), str(path), {"ss_base_model_version": "flux1", "ss_network_dim": "2"})


def comfyui(originals, expected, flux, path):
    save_file(_sd_scripts(originals, "diffusion_model.", dotted=True), str(path))


def bfl(originals, expected, flux, path):
    save_file(_sd_scripts(originals, "", "lora_A", "lora_B", dotted=True), str(path))


def xlabs(originals, expected, flux, path):
    """XLabs trains attention only: qkv_lora1/proj_lora1 (image), qkv_lora2/proj_lora2 (text), and in
    single blocks qkv_lora (q, k, v of linear1 only) and proj_lora (linear2); no alphas."""
    names = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
             "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
             "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
             "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
             "single_blocks.1.processor.qkv_lora": "single_blocks.1.linear1",
             "single_blocks.1.processor.proj_lora": "single_blocks.1.linear2"}
    tensors = {}
    for xname, original in names.items():
        d, u = originals[original]
        tensors[f"{xname}.down.weight"] = d
        tensors[f"{xname}.up.weight"] = (u[:3 * D] * (ALPHA / RANK)).astype(np.float32)  # scale folded in
    save_file(tensors, str(path))


def diffusers_layout(originals, expected, flux, path):
    save_adapter(expected, path, flux, formats.DIFFUSERS)


def ai_toolkit(originals, expected, flux, path):
    """transformer.… lora_A/lora_B, no alphas (scale folded into B), and metadata that claims SD1.5."""
    tensors = {}
    for name, m in expected.items():
        tensors[f"{name}.lora_A.weight"] = m.down
        tensors[f"{name}.lora_B.weight"] = (m.up * m.scale).astype(np.float32)
    save_file(tensors, str(path), {"ss_base_model_version": "sd_1.5", "software": "ai-toolkit"})


def bare_transformer(originals, expected, flux, path):
    """peft's state dict of the transformer saved as it is: no component prefix, no alphas (scale folded)."""
    save_file({f"{name.removeprefix(T)}.lora_{ab}.weight": w for name, m in expected.items()
               for ab, w in (("A", m.down), ("B", (m.up * m.scale).astype(np.float32)))}, str(path))


def peft(originals, expected, flux, path):
    save_adapter(expected, path, flux, formats.PEFT)


def kohya_diffusers_paths(originals, expected, flux, path):  # lora_transformer_transformer_blocks_0_attn_to_q
    tensors = {}
    for name, m in expected.items():
        key = kohya_name(flux, name)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = m.down, m.up
        tensors[f"{key}.alpha"] = np.asarray(ALPHA, np.float32)
    save_file(tensors, str(path))


XLABS_MODULES = {T + m for n in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
                                 "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj",
                                 "single_blocks.1.linear2") for m, _, _ in SPLITS[n]} | \
                {T + f"single_transformer_blocks.1.attn.to_{p}" for p in "qkv"}
NAMINGS = {  # name -> (writer, layout read, modules it holds: None = all)
    "kohya": (kohya, formats.KOHYA, None),
    "comfyui": (comfyui, formats.ORIGINAL, None),
    "bfl": (bfl, formats.ORIGINAL, None),
    "xlabs": (xlabs, formats.XLABS, XLABS_MODULES),
    "diffusers": (diffusers_layout, formats.DIFFUSERS, None),
    "ai-toolkit": (ai_toolkit, formats.DIFFUSERS, None),
    "peft": (peft, formats.PEFT, None),
    "bare-transformer": (bare_transformer, formats.DIFFUSERS_TRANSFORMER, None),
    "kohya-diffusers-paths": (kohya_diffusers_paths, formats.KOHYA, None),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, originals, expected, flux):
    folder = tmp_path_factory.mktemp("flux")
    out = {}
    for name, (write, _, _) in NAMINGS.items():
        (folder / name).mkdir()
        out[name] = folder / name / "adapter_model.safetensors"
        write(originals, expected, flux, out[name])
    return out


@pytest.mark.parametrize("naming", NAMINGS)
def test_every_flux_naming_reads_to_the_same_updates_with_full_coverage(files, expected, naming):
    _, layout, holds = NAMINGS[naming]
    adapter = read_adapter(files[naming])
    assert adapter.layout == layout and adapter.architecture.name == "flux"
    assert adapter.coverage.fraction == 1.0 and not adapter.coverage.unmapped and not adapter.coverage.ignored
    want = {n: m for n, m in expected.items() if holds is None or n in holds}
    assert set(adapter.modules) == set(want)
    for name, module in want.items():
        assert low_rank_error(factors(adapter.modules[name]), factors(module)) < 1e-6, name


def test_the_fused_rows_land_where_diffusers_puts_them(files, originals):
    """Spelled out for two modules: to_k is rows D..2D of qkv's up factor; norm_out.linear's first half
    is the second half of final_layer's adaLN (diffusers' swap_scale_shift)."""
    adapter = read_adapter(files["kohya"])
    down, up = originals["double_blocks.0.img_attn.qkv"]
    to_k = adapter.modules[T + "transformer_blocks.0.attn.to_k"]
    np.testing.assert_array_equal(to_k.down, down)
    np.testing.assert_array_equal(to_k.up, up[D:2 * D])
    norm = adapter.modules[T + "norm_out.linear"]
    _, ada = originals["final_layer.adaLN_modulation.1"]
    np.testing.assert_array_equal(norm.up, np.concatenate([ada[D:], ada[:D]]))
    assert to_k.scale == norm.scale == ALPHA / RANK


def test_metadata_that_claims_another_model_does_not_choose_the_architecture(files):
    adapter = read_adapter(files["ai-toolkit"])
    assert adapter.metadata["ss_base_model_version"] == "sd_1.5"
    # Flux.1 Kontext is Flux.1's transformer: the file fits it alike, and the (wrong) claim settles nothing
    assert adapter.architecture.name == "flux" and adapter.architecture_candidates == ["flux", "flux-kontext"]
    assert adapter.architecture_certainty == "ambiguous"


# --- diffusers' own conversion of the same files ----------------------------------------------

def diffusers_updates(path) -> dict[str, tuple]:
    """Module -> (A, B, scale) from ``FluxPipeline.lora_state_dict``: kohya and XLabs files come back with
    the alpha baked into the factors (scale 1); diffusers/peft-backed files with their metadata's
    lora_alpha / r, or per-module alpha keys."""
    diffusers = pytest.importorskip("diffusers")
    state, alphas, meta = diffusers.FluxPipeline.lora_state_dict(str(path), return_alphas=True,
                                                                 return_lora_metadata=True)
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[:-len(".lora_A.weight")]
        b = state[module + ".lora_B.weight"]
        scale = 1.0
        if alphas and f"{module}.alpha" in alphas:
            scale = float(alphas[f"{module}.alpha"]) / a.shape[0]
        elif meta and "transformer.lora_alpha" in meta:
            scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
        out[module] = (a.double().numpy(), b.double().numpy(), scale)
    return out


# diffusers (0.42) converts kohya's final_layer modules without their alpha (its "TODO: alphas"): those two
# come back at scale 1 instead of alpha/rank. It names kohya's modules outside the blocks (txt_in,
# final_layer) without the "transformer." prefix, and load_lora_weights keeps only "transformer." keys: it
# drops them without a word. Its converter of kohya-spelled diffusers paths (lora_transformer_…) maps only
# attention projections and the modules outside the blocks, and collapses every other block module onto the
# block's name. Everything it does map to a module agrees exactly.
FINAL_LAYER = {T + "norm_out.linear", T + "proj_out"}
OUTSIDE_BLOCKS = FINAL_LAYER | {T + "context_embedder"}
COLLAPSED = {T + "transformer_blocks.0", T + "single_transformer_blocks.1"}
MIXTURE_MAPPED = {T + f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                  "add_k_proj", "add_v_proj", "to_add_out")}
MIXTURE_MAPPED |= OUTSIDE_BLOCKS | {T + f"single_transformer_blocks.1.attn.to_{p}" for p in "qkv"}
DIFFUSERS_READS = {  # naming -> (modules diffusers names without "transformer.", modules it reads unscaled,
                     #            names it gives that are no module, the modules it maps (None: all))
    "kohya": (OUTSIDE_BLOCKS, FINAL_LAYER, set(), None), "comfyui": (OUTSIDE_BLOCKS, FINAL_LAYER, set(), None),
    "xlabs": (set(), set(), set(), None), "diffusers": (set(), set(), set(), None),
    "ai-toolkit": (set(), set(), set(), None), "kohya-diffusers-paths": (set(), set(), COLLAPSED, MIXTURE_MAPPED)}


@pytest.mark.parametrize("naming", DIFFUSERS_READS)
def test_auditkit_reads_the_updates_diffusers_converts(files, naming):
    adapter = read_adapter(files[naming])
    theirs = diffusers_updates(files[naming])
    unprefixed, unscaled, no_module, mapped = DIFFUSERS_READS[naming]
    assert {n.removeprefix(T) for n in unprefixed} <= set(theirs), "diffusers now prefixes them: update this test"
    theirs = {(T + n if T + n in unprefixed else n): v for n, v in theirs.items()}
    assert set(theirs) - set(adapter.modules) == no_module
    assert set(theirs) & set(adapter.modules) == (set(adapter.modules) if mapped is None else mapped)
    for name in set(theirs) & set(adapter.modules):
        module, (d, u, s) = adapter.modules[name], theirs[name]
        if name in unscaled:
            assert low_rank_error(factors(module), (d, u, s * ALPHA / RANK)) < 1e-6, name
            assert low_rank_error(factors(module), (d, u, s)) > 0.4, "diffusers now applies the alpha: update this test"
        else:
            assert low_rank_error(factors(module), (d, u, s)) < 1e-6, name


def test_the_bfl_lora_a_naming_reads_though_diffusers_converts_none_of_it(files):
    """diffusers converts BFL names only in full Flux Control LoRAs (with the qk-norm scales); a plain
    BFL-named file passes through unconverted, so diffusers would load none of it."""
    theirs = diffusers_updates(files["bfl"])
    assert not any(k.startswith(T) for k in theirs)
    assert read_adapter(files["bfl"]).coverage.fraction == 1.0


# --- the table and what does not read ----------------------------------------------------------

def test_the_flux_table_knows_every_original_module(flux):
    assert len([n for n in flux.originals if n.endswith(".img_attn.qkv")]) == 19
    assert len([n for n in flux.originals if n.endswith(".linear1")]) == 38
    assert flux.originals["double_blocks.7.img_mlp.2"] == T + "transformer_blocks.7.ff.net.2"
    fused = flux.originals["single_blocks.37.linear1"]
    assert flux.shape(fused).out_features == 3 * D + MLP and flux.shape(fused).in_features == D
    assert [p[0] for p in flux.fused[fused]] == [T + f"single_transformer_blocks.37.{m}"
                                                 for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert flux.kohya_names["lora_unet_double_blocks_3_txt_attn_qkv"] == T + "double_blocks.3.txt_attn.qkv"
    assert flux.kohya_names["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == \
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"
    assert flux.kohya_names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    covered = {p[0] for pieces in flux.original_names.values() for p in pieces}
    assert covered == {n for n in flux.modules if n.startswith(T)}  # every transformer module has an original name


def test_a_full_flux_checkpoint_is_named_not_read(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((6, 2), np.float32),
               "double_blocks.0.img_attn.qkv.bias": np.zeros(6, np.float32)}, str(path))
    with pytest.raises(Unscannable, match="no LoRA keys recognised.*Flux.1 transformer in the original BFL layout"):
        read_adapter(path)


def test_a_fused_module_with_other_rows_fits_no_architecture(tmp_path, originals):
    down, up = originals["double_blocks.0.img_attn.qkv"]
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up[:2 * D]}, str(tmp_path / "qk.safetensors"))
    with pytest.raises(BadInput, match=r"updates a 6144x3072 weight, but flux transformer.double_blocks.0.img_attn.qkv "
                                       r"is linear 9216x3072"):
        read_adapter(tmp_path / "qk.safetensors")


def test_a_module_updated_twice_is_refused(tmp_path, originals, expected, flux):
    tensors = _sd_scripts({"double_blocks.0.img_attn.qkv": originals["double_blocks.0.img_attn.qkv"]})
    to_q = expected[T + "transformer_blocks.0.attn.to_q"]
    key = kohya_name(flux, to_q.name)
    tensors.update({f"{key}.lora_down.weight": to_q.down, f"{key}.lora_up.weight": to_q.up})
    save_file(tensors, str(tmp_path / "twice.safetensors"))
    with pytest.raises(BadInput, match="two modules of the file update transformer.transformer_blocks.0.attn.to_q"):
        read_adapter(tmp_path / "twice.safetensors")


def test_unknown_original_names_count_against_coverage(tmp_path, originals):
    tensors = _sd_scripts({"single_blocks.1.linear2": originals["single_blocks.1.linear2"]})
    tensors.update({"lora_unet_single_blocks_1_norm_key_norm.lora_down.weight": np.ones((2, 128), np.float32),
                    "lora_unet_single_blocks_1_norm_key_norm.lora_up.weight": np.ones((128, 2), np.float32)})
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    adapter = read_adapter(tmp_path / "partial.safetensors")
    assert adapter.coverage.fraction == pytest.approx(3 / 5)
    assert adapter.coverage.unmapped == sorted(k for k in tensors if "norm_key_norm" in k)


def test_writing_a_fused_module_in_part_is_refused(tmp_path, expected, flux):
    only_q = {n: m for n, m in expected.items() if n == T + "transformer_blocks.0.attn.to_q"}
    with pytest.raises(ValueError, match="img_attn.qkv fuses .*only some of them"):
        save_adapter(only_q, tmp_path / "q.safetensors", flux, formats.KOHYA)
    read = read_adapter(save_adapter(only_q, tmp_path / "q.safetensors", flux, formats.DIFFUSERS))
    assert set(read.modules) == set(only_q)


def test_the_kohya_writer_fuses_as_sd_scripts_does(tmp_path, expected, flux):
    path = save_adapter(expected, tmp_path / "k.safetensors", flux, formats.KOHYA)
    from auditkit.lora.io import open_safetensors

    keys = set(open_safetensors(path).tensors)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
    back = read_adapter(path)
    assert back.coverage.fraction == 1.0 and set(back.modules) == set(expected)
    for name, module in expected.items():
        assert low_rank_error(factors(back.modules[name]), factors(module)) < 1e-6, name
    # the fused file holds q, k, v in separate columns (rank 6, as sd-scripts' split_qkv writes it); each
    # module reads back at its own rank 2, the other modules' zero columns dropped
    assert {back.modules[n].rank for n in expected} == {2}
    meta = json.dumps(back.summary())  # the summary serialises (reports)
    assert '"architecture": "flux"' in meta


def test_a_lycoris_lokr_fused_module_splits_exactly(tmp_path):
    """LoKr on kohya's fused qkv: ΔW = kron(w1, w2_a @ w2_b) (9216 x 3072); each of q, k, v gets its rows,
    held as plain factors (the rows of a Kronecker product do not split along its halves)."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    w2_a, w2_b = rng.normal(size=(3 * D // 4, 2)).astype(np.float32), rng.normal(size=(2, D // 4)).astype(np.float32)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b,
               f"{key}.alpha": np.asarray(2.0, np.float32)}, str(tmp_path / "lokr.safetensors"))
    adapter = read_adapter(tmp_path / "lokr.safetensors")
    assert adapter.coverage.fraction == 1.0 and len(adapter.modules) == 3
    up, down = np.kron(w1, w2_a), np.kron(np.eye(4), w2_b)  # kron(w1, w2_a w2_b) = kron(w1, w2_a) kron(I, w2_b)
    for k, proj in enumerate(("to_q", "to_k", "to_v")):
        m = adapter.modules[T + f"transformer_blocks.0.attn.{proj}"]
        assert m.algorithm == "lokr" and m.form != "kronecker"
        assert low_rank_error(factors(m), (down, up[k * D:(k + 1) * D], 1.0)) < 1e-6, proj
