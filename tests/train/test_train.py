"""Training loops (ESD safety LoRA, fine-tuning modes) on a tiny untrained pipeline built from config."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from auditkit.lab.model import assemble_pipeline, build_components  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402
from auditkit.models import architectures  # noqa: E402
from auditkit.models.attach import apply_updates, composed  # noqa: E402
from auditkit.train.esd import ESDConfig, train_esd, train_esd_full  # noqa: E402
from auditkit.train.finetune import FinetuneConfig, finetune  # noqa: E402
from auditkit.train.lora import lora_from_delta, target_modules  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe():
    c = build_components(seed=0)
    return assemble_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])


def unet_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def assert_unchanged(pipe, before):
    after = pipe.unet.state_dict()
    assert set(after) == set(before), "adapter layers left behind"
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)


def test_esd_x_trains_cross_attention_lora_and_leaves_the_pipeline_unchanged(pipe, tmp_path):
    before = unet_state(pipe)
    seen = []
    mods = train_esd(pipe, ["a red cross", "a blue cross"],
                     ESDConfig(method="esd-x", rank=2, steps=3, batch=2, ddim_steps=4),
                     progress=lambda s, n, loss: seen.append((s, n, loss)))
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(np.isfinite(loss) for _, _, loss in seen)
    assert mods and all(".attn2." in n for n in mods)
    assert any(np.abs(m.up).sum() > 0 for m in mods.values()), "B moved away from its zero init"
    assert_unchanged(pipe, before)
    path = save_adapter(mods, tmp_path / "safety.safetensors", architectures.get("lab"))
    adapter = read_adapter(path)
    assert adapter.architecture.name == "lab" and set(adapter.modules) == set(mods)


def test_esd_u_targets_the_non_cross_attention_layers(pipe):
    names = target_modules(pipe.unet, "esd-u")
    assert names and not any(".attn2." in n for n in names)
    assert any(".attn1." in n for n in names) and any("ff.net" in n for n in names)


def test_esd_lowers_its_own_objective(pipe):
    """A few steps at a high learning rate must reduce the ESD loss (the loop really optimises)."""
    losses = []
    train_esd(pipe, ["a red cross"], ESDConfig(method="esd-x", rank=4, steps=25, batch=4, ddim_steps=2, lr=3e-2,
                                                seed=1), progress=lambda s, n, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_esd_full_changes_the_target_weights_only_and_leaves_the_pipeline_unchanged(pipe):
    before = unet_state(pipe)
    losses = []
    deltas = train_esd_full(pipe, ["a red cross"], ESDConfig(method="esd-u", steps=25, batch=4, ddim_steps=2,
                                                             lr=3e-3, seed=1),
                            progress=lambda s, n, loss: losses.append(loss))
    assert_unchanged(pipe, before)
    targets = {f"unet.{n}.weight" for n in target_modules(pipe.unet, "esd-u")}
    assert deltas and set(deltas) <= targets and len(deltas) > len(targets) // 2
    for name, d in deltas.items():
        assert d.shape == tuple(before[name.removeprefix("unet.")].shape) and np.isfinite(d).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the full-weight loop optimises too
    # the frozen target is the original model: the first step's loss equals the LoRA run's first step
    # (a LoRA starts as the original model too), with the same seed and batch
    lora_losses = []
    train_esd(pipe, ["a red cross"], ESDConfig(method="esd-u", rank=2, steps=1, batch=4, ddim_steps=2, lr=3e-3,
                                               seed=1), progress=lambda s, n, loss: lora_losses.append(loss))
    assert losses[0] == pytest.approx(lora_losses[0], rel=1e-5)


def test_esd_full_written_as_a_component_folder_reads_back_as_an_erased_model(pipe, tmp_path):
    from auditkit.errors import BadInput
    from auditkit.models.saving import save_component

    deltas = train_esd_full(pipe, ["a red cross"], ESDConfig(method="esd-x", steps=2, batch=2, ddim_steps=2,
                                                             lr=1e-2))
    before = unet_state(pipe)
    folder = save_component(pipe, "unet", deltas, tmp_path / "erased" / "unet")
    assert_unchanged(pipe, before)
    from auditkit.lora.io import open_safetensors

    st = open_safetensors(folder / "diffusion_pytorch_model.safetensors")
    for name, d in deltas.items():
        key = name.removeprefix("unet.")
        np.testing.assert_allclose(st.array(key), before[key].numpy() + d, atol=1e-6)
    assert not list(tmp_path.glob("erased/.*tmp"))  # nothing half-written left beside it
    with pytest.raises(BadInput, match="already exists"):
        save_component(pipe, "unet", deltas, folder)


def test_finetune_modes(pipe):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    captions = ["a neon bar", "a neon dash", "a neon tee"] * 2
    before = unet_state(pipe)
    safety = train_esd(pipe, ["a red cross"], ESDConfig(rank=2, steps=2, batch=2, ddim_steps=2))
    with pytest.raises(ValueError, match="needs the safety adapter"):
        finetune(pipe, images, captions, FinetuneConfig(mode="on-top", steps=1))
    for mode in ("on-top", "modular"):
        res = finetune(pipe, images, captions, FinetuneConfig(mode=mode, rank=2, steps=3, batch=4), safety=safety)
        assert res.modules and len(res.losses) == 3
        assert_unchanged(pipe, before)
    full = finetune(pipe, images, captions, FinetuneConfig(mode="full", targets="cross-kv", steps=2, batch=4,
                                                            lr=1e-2, extract_rank=64), safety=safety)
    assert full.dense and set(full.dense) == set(full.modules)
    for name, d in full.dense.items():
        np.testing.assert_allclose(full.modules[name].delta(), d, atol=1e-6)
    assert_unchanged(pipe, before)


def test_lora_from_delta_is_exact_at_full_rank_and_best_below():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(12, 5)) @ rng.normal(size=(5, 9))
    np.testing.assert_allclose(lora_from_delta("m", d, 8).delta(), d, atol=1e-5)
    m2 = lora_from_delta("m", d, 2)
    s = np.linalg.svd(d, compute_uv=False)
    assert np.linalg.norm(d - m2.delta()) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-4)


def test_composition_fuses_exactly_and_restores(pipe):
    from conftest import random_modules

    arch = architectures.get("lab")
    mods = random_modules(arch, [n for n in arch.modules if n.startswith("unet.") and ".attn2.to_k" in n])
    before = unet_state(pipe)
    name = next(iter(mods))
    key = name[len("unet."):] + ".weight"
    with composed(pipe.unet, (mods, 0.5)):
        diff = (pipe.unet.state_dict()[key] - before[key]).double().numpy()
        np.testing.assert_allclose(diff, 0.5 * mods[name].delta(), atol=1e-6)
    assert_unchanged(pipe, before)
    apply_updates(pipe.unet, mods, 1.0)
    apply_updates(pipe.unet, mods, -1.0)
    torch.testing.assert_close(pipe.unet.state_dict()[key], before[key], atol=1e-6, rtol=0)


def test_interrupted_finetune_resumes_from_its_checkpoint_to_the_same_adapter(pipe, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    captions = ["a red bar", "a blue tee"] * 3
    cfg = FinetuneConfig(mode="modular", targets="cross-kv", rank=2, steps=6, batch=2, lr=1e-2)
    straight = finetune(pipe, images, captions, cfg)

    ckpt = tmp_path / "ft.ckpt.safetensors"

    def stop_at_4(step, total, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pipe, images, captions, cfg, progress=stop_at_4, checkpoint=ckpt, checkpoint_every=3)
    seen = []
    resumed = finetune(pipe, images, captions, cfg, checkpoint=ckpt, checkpoint_every=3,
                       progress=lambda s, n, loss: seen.append(s))
    assert seen == [3, 4, 5, 6]  # continued after the checkpoint at step 3
    assert resumed.losses[:3] == straight.losses[:3] and len(resumed.losses) == 6
    for name, m in straight.modules.items():
        np.testing.assert_allclose(resumed.modules[name].up, m.up, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(resumed.modules[name].down, m.down, rtol=1e-5, atol=1e-7)
    # finished: a third run trains nothing and returns the same adapter
    again = finetune(pipe, images, captions, cfg, checkpoint=ckpt, progress=lambda s, n, loss: seen.append(s))
    assert seen[-1] == 6 and len(seen) == 5
    np.testing.assert_allclose(again.modules[name].up, m.up, rtol=1e-5, atol=1e-7)
    # other settings or data: refused, not silently mixed
    from auditkit.errors import BadInput

    before = unet_state(pipe)
    with pytest.raises(BadInput, match="other settings"):
        finetune(pipe, images, captions, FinetuneConfig(**{**cfg.__dict__, "lr": 1e-3}), checkpoint=ckpt)
    assert_unchanged(pipe, before)  # the refused run left no adapter behind


def test_anchored_finetune_keeps_the_safe_prediction_on_anchor_prompts(pipe):
    from auditkit.train.esd import encode

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    captions = ["a red cross", "a blue cross"] * 4  # training data that teaches the anchored concept itself
    names = target_modules(pipe.unet, "cross-kv")
    safety = {f"unet.{n}": lora_from_delta(f"unet.{n}", rng.normal(0, 0.05, tuple(
        pipe.unet.get_submodule(n).weight.shape)), 2) for n in names}
    cfg = FinetuneConfig(mode="on-top", targets="transformer", rank=4, steps=12, batch=4, lr=3e-2, anchor_weight=20.0)
    anchor = ["a red cross", "a blue cross"]
    free = finetune(pipe, images, captions, cfg, safety=safety)
    pinned = finetune(pipe, images, captions, cfg, safety=safety, anchor_prompts=anchor)
    x = torch.randn((2, pipe.unet.config.in_channels, 4, 4), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    text = encode(pipe, anchor)

    def drift(mods):
        with torch.no_grad(), composed(pipe.unet, (safety, 1.0)):
            safe = pipe.unet(x, t, encoder_hidden_states=text).sample
            with composed(pipe.unet, (mods, 1.0)):
                tuned = pipe.unet(x, t, encoder_hidden_states=text).sample
        return float((tuned - safe).pow(2).mean())

    assert drift(pinned.modules) < 0.5 * drift(free.modules)
    with pytest.raises(ValueError, match="on-top"):
        finetune(pipe, images, captions, FinetuneConfig(mode="modular", steps=1), anchor_prompts=anchor)


def test_training_runs_on_a_bf16_pipeline_with_float32_adapters():
    """A GPU loads the frozen model in bf16 (auditkit.dynamic.load_base): encoding the data, noising it, the trained
    LoRA (float32, mixed precision) and the correction's trajectories all run in the model's dtype. bf16 runs on the
    CPU too, so this is tested without a GPU; before the fix every training path failed on a bf16 VAE/UNet."""
    from auditkit.repair.correction import train_correction
    from auditkit.repair.retrain import RetrainSettings
    from auditkit.train.lora import add_lora, lora_parameters, remove_lora

    c = build_components(seed=0)
    pipe = assemble_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"]).to(dtype=torch.bfloat16)
    names = target_modules(pipe.unet, "cross-kv")
    add_lora(pipe.unet, names, 2)
    assert {p.dtype for p in lora_parameters(pipe.unet)} == {torch.float32}
    remove_lora(pipe.unet, "auditkit")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    captions = ["a neon bar", "a neon dash"] * 2
    before = unet_state(pipe)
    safety = train_esd(pipe, ["a red cross"], ESDConfig(rank=2, steps=2, batch=2, ddim_steps=2))
    res = finetune(pipe, images, captions, FinetuneConfig(mode="on-top", rank=2, steps=2, batch=2), safety=safety,
                   anchor_prompts=["a red cross"])
    assert len(res.losses) == 2 and all(np.isfinite(res.losses))
    assert_unchanged(pipe, before)
    cfg = RetrainSettings(r".*attn2\.to_k", 1, rank=2, alpha=2.0, steps=2, batch=2)
    out = train_correction(pipe, images, captions, res.modules, safety, ["a red cross"], cfg)
    assert out.correction and all(np.isfinite(m.delta()).all() for m in out.correction.values())
    assert_unchanged(pipe, before)


def test_text_encoder_modules_compose_and_extract_under_their_published_names(pipe):
    """transformers 5's CLIPTextModel has no ``text_model`` level; canonical names keep it (as files spell them).
    Composing a text-encoder update by its canonical name must find the module, and restore it exactly; a LoRA
    trained on the encoder is extracted under the canonical name."""
    from peft import LoraConfig, inject_adapter_in_model

    from auditkit.lora.adapter import LoraModule
    from auditkit.train.lora import extract_lora

    te = pipe.text_encoder
    path = next(n for n, _ in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    name = "text_encoder." + ("" if path.startswith("text_model.") else "text_model.") + path
    w = te.get_submodule(path).weight
    before = w.detach().clone()
    rng = np.random.default_rng(0)
    mod = LoraModule(name, rng.normal(size=(2, w.shape[1])).astype(np.float32),
                     rng.normal(size=(w.shape[0], 2)).astype(np.float32), 0.5)
    with composed(te, ({name: mod}, 1.0), component="text_encoder"):
        torch.testing.assert_close(w.detach() - before, torch.from_numpy(mod.delta()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
    import copy

    enc = copy.deepcopy(te)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=[path]), enc, adapter_name="t")
    assert list(extract_lora(enc, "t", prefix="text_encoder")) == [name]


def test_esd_preservation_term_keeps_the_anchor_prompts_predictions(pipe):
    """The same ESD-u run with the preservation term moves the anchors' predictions far less than without it (at the
    first step of their trajectories, where training drew them: pure noise)."""
    from auditkit.models.pipeline import denoiser_for
    from auditkit.train.esd import encode

    cfg = dict(method="esd-u", rank=4, steps=25, batch=4, ddim_steps=1, lr=3e-2, seed=1)
    anchors = ["a red circle", "a blue square"]
    free = train_esd(pipe, ["a red cross"], ESDConfig(**cfg))
    kept = train_esd(pipe, ["a red cross"], ESDConfig(**cfg, preserve=10.0), anchor_prompts=anchors)
    den = denoiser_for(pipe)
    x = den.noise(2, torch.Generator().manual_seed(0))
    t = den.sampler(1).timesteps[0]
    text = encode(pipe, anchors)

    def drift(mods):
        with torch.no_grad():
            base = pipe.unet(x, t, encoder_hidden_states=text).sample
            with composed(pipe.unet, (mods, 1.0)):
                erased = pipe.unet(x, t, encoder_hidden_states=text).sample
        return float((erased - base).pow(2).mean())

    assert drift(kept) < 0.5 * drift(free)


def test_esd_anchor_settings_are_refused_before_training(pipe):
    from auditkit.errors import BadInput

    with pytest.raises(BadInput, match="needs anchor prompts"):
        train_esd(pipe, ["a red cross"], ESDConfig(preserve=1.0))
    with pytest.raises(BadInput, match="need preserve > 0"):
        train_esd(pipe, ["a red cross"], ESDConfig(), anchor_prompts=["a red square"])
    with pytest.raises(BadInput, match="also concept prompts"):
        train_esd(pipe, ["a red cross"], ESDConfig(preserve=1.0), anchor_prompts=["A red cross!"])
    with pytest.raises(BadInput, match="preserve must be >= 0"):
        ESDConfig(preserve=-1.0)
