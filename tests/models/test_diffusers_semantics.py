"""auditkit's ΔW = scale·B·A is what diffusers actually adds to the weights when it loads the file.

A tiny UNet built from config (real diffusers classes, no weights downloaded) loads a kohya file
written by auditkit through diffusers' own kohya conversion and peft injection; fusing the LoRA
into the weights must change each weight by exactly auditkit's canonical ΔW.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from conftest import random_modules  # noqa: E402

from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402
from auditkit.models.build import architecture_from_models  # noqa: E402


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


@pytest.mark.parametrize("layout", [formats.KOHYA, formats.DIFFUSERS])
def test_fused_weights_change_by_the_canonical_delta(tmp_path, layout):
    unet = tiny_unet()
    arch = architecture_from_models("tiny", unet)
    names = [n for n in arch.modules if any(k in n for k in (".attn1.to_q", ".attn2.to_k", ".attn2.to_out.0",
                                                               ".ff.net.2", "proj_in"))]
    mods = random_modules(arch, names, rank=4, scale=0.25, std=0.2)
    path = save_adapter(mods, tmp_path / "tiny.safetensors", arch, layout)
    adapter = read_adapter(path, arch=arch)
    assert set(adapter.modules) == set(names)

    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    state_dict, alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(
        str(path), return_lora_metadata=True)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(
        state_dict, alphas, unet=unet, adapter_name="cand", metadata=metadata)
    loaded = {n for n, _ in unet.named_modules() if n.endswith("lora_A.cand")}
    assert len(loaded) == len(names), "diffusers must load every module (no silent partial load)"
    unet.fuse_lora(lora_scale=1.0)
    after = dict(unet.named_parameters())
    for name, module in adapter.modules.items():
        key = name[len("unet."):] + ".weight"
        key = key if key in after else key.replace(".weight", ".base_layer.weight")
        delta = (after[key].detach() - before[name[len("unet."):] + ".weight"]).double().numpy()
        np.testing.assert_allclose(delta.reshape(delta.shape[0], -1), module.delta(), rtol=1e-4, atol=1e-6)
