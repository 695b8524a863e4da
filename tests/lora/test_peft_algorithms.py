"""peft's own LoHa, LoKr and DoRA adapters (``save_pretrained``), read by auditkit: every module's
update equals what peft's layer applies (``get_delta_weight``; DoRA: the merged weight minus W₀)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402

if not lab_pipeline_available():  # pragma: no cover
    pytest.skip("the lab pipeline is not installed", allow_module_level=True)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _adapted(config):
    unet = load_lab_pipeline(device="cpu", dtype=torch.float32).unet
    model = peft.get_peft_model(unet, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.copy_(0.2 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


def _layers(model):
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) and hasattr(m, "get_base_layer")}


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_loha_and_lokr_files_read_as_peft_applies_them(tmp_path, kind):
    cls = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[kind]
    model = _adapted(cls(r=4, alpha=2, target_modules=TARGETS))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == kind.upper()
    adapter = read_adapter(tmp_path / "adapter_model.safetensors", arch="lab")
    assert adapter.layout == "peft" and adapter.coverage.fraction == 1.0
    layers = _layers(model)
    assert len(adapter.modules) == len(layers) > 10
    for name, layer in layers.items():
        with torch.no_grad():
            ref = layer.get_delta_weight("default").double()
        got = adapter.modules[f"unet.{name}"]
        assert got.algorithm == kind
        np.testing.assert_allclose(got.delta(), ref.reshape(ref.shape[0], -1).numpy(), rtol=1e-5, atol=1e-7)


def test_peft_dora_files_are_exact_given_the_base_weights(tmp_path):
    model = _adapted(peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    model.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path / "adapter_model.safetensors", arch="lab")
    assert all(m.needs_base for m in adapter.modules.values())
    layers = _layers(model)

    class Weights:
        def get(self, name):
            return layers[name.removeprefix("unet.")].get_base_layer().weight.detach().double().numpy()

    exact = adapter.with_base(Weights())
    for name, layer in layers.items():
        w0 = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=["default"])
        ref = (layer.get_base_layer().weight.detach() - w0).double().numpy()
        layer.unmerge()
        np.testing.assert_allclose(exact.modules[f"unet.{name}"].delta(), ref, rtol=1e-4, atol=1e-6)


def test_files_saved_by_diffusers_save_lora_weights_read_exactly(tmp_path):
    """The training scripts' way: a peft LoRA on the UNet and text encoder, saved with the pipeline's
    ``save_lora_weights`` (diffusers layout)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = load_lab_pipeline(device="cpu", dtype=torch.float32)
    # alpha = r: the adapter-metadata arguments that carry other scales need peft >= 0.22
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS + ["proj_in"]))
    # (transformers 5's add_adapter wants a peft newer than the registry has: inject directly)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
                                 pipe.text_encoder)
    torch.manual_seed(1)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.2 * torch.randn_like(p))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    adapter = read_adapter(tmp_path / "pytorch_lora_weights.safetensors", arch="lab")
    assert adapter.layout == "diffusers" and adapter.coverage.fraction == 1.0
    checked = 0
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for name, layer in model.named_modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                with torch.no_grad():
                    ref = layer.get_delta_weight("default").double()
                canonical = adapter.architecture.aliases.get(f"{component}.{name}", f"{component}.{name}")
                np.testing.assert_allclose(adapter.modules[canonical].delta(), ref.reshape(ref.shape[0], -1).numpy(),
                                           rtol=1e-5, atol=1e-7)
                checked += 1
    assert checked == len(adapter.modules) > 20
