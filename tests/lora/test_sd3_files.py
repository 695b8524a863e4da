"""SD3 / SD3.5 adapters in the namings people publish, read against the real-size ``sd3``, ``sd35-medium``
and ``sd35-large`` tables: kohya sd-scripts (``lora_unet_joint_blocks_0_x_block_attn_qkv``, fused q/k/v with
one shared down factor), ComfyUI's ``diffusion_model.`` copy, SAI names with ``lora_A``/``lora_B``,
diffusers/peft ``transformer.…`` and the ``lora_transformer_`` kohya spelling, rank 2, a handful of modules.

The split of the fused and swapped modules is written out by hand here; the whole table is checked against
diffusers' own SD3 checkpoint converter in tests/models/test_sd3.py.
"""

import numpy as np
import pytest
from conftest import factors, low_rank_error
from safetensors.numpy import save_file

from auditkit.lora import formats
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import kohya_name, save_adapter
from auditkit.models import architectures

D = 1536  # SD3 Medium's width
T = "transformer."
B0, B23 = "transformer_blocks.0.", "transformer_blocks.23."
SPLITS = {  # SAI module -> (diffusers module, rows) in the order its rows are stacked
    "joint_blocks.0.x_block.attn.qkv": [(B0 + "attn.to_q", 0, D), (B0 + "attn.to_k", 0, D), (B0 + "attn.to_v", 0, D)],
    "joint_blocks.0.context_block.attn.qkv": [(B0 + "attn.add_q_proj", 0, D), (B0 + "attn.add_k_proj", 0, D),
                                              (B0 + "attn.add_v_proj", 0, D)],
    "joint_blocks.0.x_block.attn.proj": [(B0 + "attn.to_out.0", 0, D)],
    "joint_blocks.0.context_block.mlp.fc2": [(B0 + "ff_context.net.2", 0, D)],
    "joint_blocks.0.context_block.adaLN_modulation.1": [(B0 + "norm1_context.linear", 0, 6 * D)],
    # the last block is context-pre-only: its text modulation is (shift, scale), diffusers' (scale, shift)
    "joint_blocks.23.context_block.adaLN_modulation.1": [(B23 + "norm1_context.linear", D, 2 * D),
                                                         (B23 + "norm1_context.linear", 0, D)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", D, 2 * D), ("norm_out.linear", 0, D)],
    "x_embedder.proj": [("pos_embed.proj", 0, D)],  # the 2x2 patch-embedding conv
}
IN = {"joint_blocks.0.context_block.mlp.fc2": 4 * D, "x_embedder.proj": (16, 2, 2)}
RANK, ALPHA = 2, 1.0


@pytest.fixture(scope="module")
def sd3():
    return architectures.get("sd3")


@pytest.fixture(scope="module")
def originals():
    rng = np.random.default_rng(1)
    out = {}
    for name, pieces in SPLITS.items():
        rows = sum(stop - start for _, start, stop in pieces)
        width = IN.get(name, D)
        down = rng.normal(0, 0.1, (RANK, *(width if isinstance(width, tuple) else (width,))))
        up = rng.normal(0, 0.1, (rows, RANK) + ((1, 1) if isinstance(width, tuple) else ()))
        out[name] = (down.astype(np.float32), up.astype(np.float32))
    return out


@pytest.fixture(scope="module")
def expected(originals):
    rows: dict[str, dict] = {}
    downs = {}
    for name, (down, up) in originals.items():
        offset = 0
        for module, start, stop in SPLITS[name]:
            rows.setdefault(T + module, {})[(start, stop)] = up.reshape(up.shape[0], -1)[offset:offset + stop - start]
            downs[T + module] = down.reshape(RANK, -1)
            offset += stop - start
    return {m: LoraModule(m, downs[m], np.concatenate([r[k] for k in sorted(r)]), ALPHA / RANK)
            for m, r in rows.items()}


def _sai(originals, prefix, down, up, dotted):
    out = {}
    for name, (d, u) in originals.items():
        key = prefix + (name if dotted else name.replace(".", "_"))
        out.update({f"{key}.{down}.weight": d, f"{key}.{up}.weight": u, f"{key}.alpha": np.asarray(ALPHA, np.float32)})
    return out


def _kohya_paths(expected, sd3):
    out = {}
    for name, m in expected.items():
        key = kohya_name(sd3, name)
        down = m.down.reshape(RANK, 16, 2, 2) if name.endswith("pos_embed.proj") else m.down
        up = m.up.reshape(-1, RANK, 1, 1) if name.endswith("pos_embed.proj") else m.up
        out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": np.asarray(ALPHA, np.float32)})
    return out


NAMINGS = {
    "kohya": (lambda o, e, a, p: save_file(_sai(o, "lora_unet_", "lora_down", "lora_up", False), str(p),
                                           {"ss_base_model_version": "sd3"}), formats.KOHYA),
    "comfyui": (lambda o, e, a, p: save_file(_sai(o, "diffusion_model.", "lora_down", "lora_up", True), str(p)),
                formats.ORIGINAL),
    "sai": (lambda o, e, a, p: save_file(_sai(o, "", "lora_A", "lora_B", True), str(p)), formats.ORIGINAL),
    "diffusers": (lambda o, e, a, p: save_adapter(e, p, a, formats.DIFFUSERS), formats.DIFFUSERS),
    "peft": (lambda o, e, a, p: save_adapter(e, p, a, formats.PEFT), formats.PEFT),
    "kohya-diffusers-paths": (lambda o, e, a, p: save_file(_kohya_paths(e, a), str(p)), formats.KOHYA),
    "bare-transformer": (lambda o, e, a, p: save_adapter(e, p, a, formats.DIFFUSERS_TRANSFORMER),
                         formats.DIFFUSERS_TRANSFORMER),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, originals, expected, sd3):
    folder = tmp_path_factory.mktemp("sd3")
    out = {}
    for name, (write, _) in NAMINGS.items():
        (folder / name).mkdir()
        out[name] = folder / name / "adapter_model.safetensors"
        write(originals, expected, sd3, out[name])
    return out


@pytest.mark.parametrize("naming", NAMINGS)
def test_every_sd3_naming_reads_to_the_same_updates_with_full_coverage(files, expected, naming):
    adapter = read_adapter(files[naming])
    assert adapter.layout == NAMINGS[naming][1] and adapter.architecture.name == "sd3"
    assert adapter.coverage.fraction == 1.0 and not adapter.coverage.unmapped
    assert set(adapter.modules) == set(expected)
    for name, module in expected.items():
        assert low_rank_error(factors(adapter.modules[name]), factors(module)) < 1e-6, name
    conv = adapter.modules[T + "pos_embed.proj"]
    assert conv.down.shape == (RANK, 16 * 2 * 2)


def test_the_diffusers_file_reads_as_diffusers_reads_it(files):
    diffusers = pytest.importorskip("diffusers")
    state, meta = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(files["diffusers"]),
                                                                      return_lora_metadata=True)
    adapter = read_adapter(files["diffusers"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    for name, module in adapter.modules.items():
        a, b = state[f"{name}.lora_A.weight"].double().numpy(), state[f"{name}.lora_B.weight"].double().numpy()
        assert low_rank_error(factors(module), (a, b, scale)) < 1e-6, name


def test_diffusers_converts_no_kohya_sd3_file(files):
    """diffusers' SD3 loader has no kohya converter: the keys come back as they are, and load_lora_weights
    keeps only "transformer." keys, so it would load nothing of a kohya or ComfyUI SD3 file."""
    diffusers = pytest.importorskip("diffusers")
    for naming in ("kohya", "comfyui"):
        state = diffusers.StableDiffusion3Pipeline.lora_state_dict(str(files[naming]))
        assert not any(k.startswith(T) for k in state)


@pytest.mark.parametrize("name,fits", [
    ("joint_blocks.3.x_block.attn.qkv", ["sd3", "sd35-medium"]),  # the same shapes: both fit, names and shapes tie
    ("joint_blocks.3.x_block.attn2.qkv", ["sd35-medium"]),  # MMDiT-X's second attention: SD3.5 Medium only
    ("joint_blocks.30.context_block.attn.qkv", ["sd35-large"]),  # 38 blocks, 2432 wide
])
def test_the_shapes_and_names_choose_between_sd3_and_sd35(tmp_path, name, fits):
    width = 2432 if fits == ["sd35-large"] else D
    rng = np.random.default_rng(0)
    key = "lora_unet_" + name.replace(".", "_")
    save_file({f"{key}.lora_down.weight": rng.normal(size=(2, width)).astype(np.float32),
               f"{key}.lora_up.weight": rng.normal(size=(3 * width, 2)).astype(np.float32)},
              str(tmp_path / "a.safetensors"))
    adapter = read_adapter(tmp_path / "a.safetensors")
    assert adapter.architecture.name == fits[0] and adapter.architecture_candidates == fits
    save_file({f"{key}.lora_down.weight": rng.normal(size=(2, width)).astype(np.float32),
               f"{key}.lora_up.weight": rng.normal(size=(3 * width, 2)).astype(np.float32)},
              str(tmp_path / "b.safetensors"), {"modelspec.architecture": "stable-diffusion-3.5-medium/lora"})
    assert read_adapter(tmp_path / "b.safetensors").architecture.name == ("sd35-medium" if "sd35-medium" in fits
                                                                          else fits[0])


def test_the_sd3_tables_know_every_original_module():
    for name in ("sd3", "sd35-medium", "sd35-large"):
        arch = architectures.get(name)
        covered = {p[0] for pieces in arch.original_names.values() for p in pieces}
        assert covered == {n for n in arch.modules if n.startswith(T)}, name
    sd3 = architectures.get("sd3")
    assert "joint_blocks.23.context_block.mlp.fc1" not in sd3.originals  # context-pre-only: no text MLP
    assert sd3.kohya_names["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == \
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"
    assert sd3.kohya_names["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == \
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc1"
