"""diffusers' attention-processor files of before mid-2023 (``pytorch_lora_weights.safetensors``, UNet
keys with no component prefix): auditkit reads them as diffusers loads them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_modules, select

from auditkit.lora import formats
from auditkit.lora.adapter import read_adapter
from auditkit.lora.write import save_adapter

torch = pytest.importorskip("torch")


def test_prefixless_processor_files_read_and_load_into_diffusers_exactly(tmp_path):
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline
    from auditkit.models import architectures
    from auditkit.models.attach import load_adapters

    if not lab_pipeline_available():  # pragma: no cover
        pytest.skip("the lab pipeline is not installed")
    lab = architectures.get("lab")
    names = select(lab, ".attn1.to_q", ".attn1.to_out.0", ".attn2.to_k", ".attn2.to_v")
    mods = random_modules(lab, names, rank=4, scale=0.5, std=0.1)
    path = save_adapter(mods, tmp_path / "pytorch_lora_weights.safetensors", lab, formats.DIFFUSERS_UNET)
    from safetensors import safe_open

    keys = list(safe_open(str(path), "np").keys())
    assert all(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and ".processor." in k for k in keys)
    adapter = read_adapter(path, arch="lab")
    assert adapter.layout == "diffusers-unet" and adapter.coverage.fraction == 1.0
    assert set(adapter.modules) == set(names)
    for n in names:
        np.testing.assert_allclose(adapter.modules[n].delta(), mods[n].delta(), rtol=1e-5, atol=1e-8)

    pipe = load_lab_pipeline(device="cpu", dtype=torch.float32)
    base = {n: pipe.unet.get_submodule(n[len("unet."):]).weight.detach().double().numpy().copy() for n in names}
    # diffusers (0.42) itself applies none of this file's modules, silently; if that is fixed, the
    # file can be handed to diffusers as it is (auditkit.lora.write.diffusers_source)
    from auditkit.models.attach import lora_layers

    pipe.load_lora_weights(str(path), adapter_name="raw")
    assert not lora_layers(pipe, ["raw"])
    pipe.unload_lora_weights()
    # auditkit hands diffusers its exact conversion instead
    assert load_adapters(pipe, {"candidate": adapter})["candidate"]["fraction"] == 1.0
    pipe.fuse_lora(components=["unet"], adapter_names=["candidate"], lora_scale=1.0)
    for n in names:
        got = pipe.unet.get_submodule(n[len("unet."):]).weight.detach().double().numpy() - base[n]
        np.testing.assert_allclose(got, adapter.modules[n].delta(), rtol=1e-4, atol=1e-6)
