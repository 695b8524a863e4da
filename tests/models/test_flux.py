"""What only Flux.1 does, on a tiny random-initialised ``FluxPipeline`` (tests/tiny_pipelines.py): its render
options, kohya's fused q/k/v with one shared down factor, adapters in the namings Flux files come in (kohya, BFL,
XLabs) composed into the weights exactly, T5 adapters refused, pickle weights refused, the pipeline's own
conditioning and denoiser call (packed latents, the guidance input) and its flow-matching loss. Loading, the
dynamic scan, the data-free checks, align, finetune and repair are the family contract's
(tests/models/test_family_contract.py)."""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as e2e  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tiny_pipelines import tiny_flux_pipeline  # noqa: E402

from auditkit.errors import BadInput, Unscannable  # noqa: E402
from auditkit.lora import formats  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import kohya_name, save_adapter  # noqa: E402
from auditkit.models.pipeline import architecture_of_folder, load_pipeline  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture()
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def arch(folder):
    return architecture_of_folder(folder, "tiny-flux")


# --- loading -------------------------------------------------------------------------------------

def test_flux_renders_at_the_vaes_size_and_the_tokenizers_t5_length(pipe):
    from auditkit.models.pipeline import render_options

    # the VAE's sample_size, not Flux's 1024; the T5 length its tokenizer declares (16), not 512 (the contract
    # renders at it)
    assert render_options(pipe) == {"height": 32, "width": 32, "max_sequence_length": 16}


def test_a_flux_folder_with_pickle_weights_is_refused_without_unpickling(folder, tmp_path):
    one_pickle = tmp_path / "one"
    shutil.copytree(folder, one_pickle)
    for weights in (one_pickle / "transformer").glob("*.safetensors"):
        weights.unlink()
    (one_pickle / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 never opened")
    with pytest.raises(BadInput, match=r"component 'transformer' has only pickle weights") as err:
        load_pipeline(str(one_pickle))
    assert "\n" not in str(err.value)


# --- the tiny pipeline and the shipped Flux.1 table name modules the same way -------------------

def test_kohyas_fused_qkv_is_the_three_projections_rows(arch):  # (the naming scheme: the family contract)
    qkv = arch.fused[arch.originals["double_blocks.1.img_attn.qkv"]]
    assert [(c.rsplit(".", 1)[1], a, b) for c, a, b in qkv] == [("to_q", 0, 16), ("to_k", 0, 16), ("to_v", 0, 16)]


# --- adapters composed exactly: what diffusers adds to the weights is auditkit's ΔW --------------

def bfl_factors(arch, seed=0, scale_up=1.0) -> dict[str, tuple]:
    """Rank-2 (down, up) of every BFL-named module of the transformer, as a kohya or BFL trainer holds
    them: one down factor per module, fused ones included."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(n for n in arch.original_names if formats.is_bfl_name(n)):
        shape = arch.shape(arch.originals[name])
        out[name] = (rng.normal(0, 0.3, (2, shape.in_features)).astype(np.float32),
                     (scale_up * rng.normal(0, 0.3, (shape.out_features, 2))).astype(np.float32))
    return out


def text_encoder_tensors(arch, seed=0) -> dict:
    rng = np.random.default_rng(seed + 100)
    out = {}
    for name in (n for n in arch.modules if n.startswith("text_encoder.") and ".self_attn." in n):
        s, key = arch.modules[name], kohya_name(arch, name)
        out[f"{key}.lora_down.weight"] = rng.normal(0, 0.3, (2, s.in_features)).astype(np.float32)
        out[f"{key}.lora_up.weight"] = rng.normal(0, 0.3, (s.out_features, 2)).astype(np.float32)
        out[f"{key}.alpha"] = np.asarray(1.0, np.float32)
    return out


def write_kohya(arch, path, seed=0, scale_up=1.0, text_encoder=True):
    """sd-scripts' Flux file: lora_unet_<BFL name> with a shared lora_down for fused q/k/v, alpha 1 (scale
    0.5), and the CLIP text encoder under lora_te1_."""
    tensors = {}
    for name, (down, up) in bfl_factors(arch, seed, scale_up).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.asarray(1.0, np.float32)})
    if text_encoder:
        tensors.update(text_encoder_tensors(arch, seed))
    save_file(tensors, str(path), {"ss_base_model_version": "flux1"})
    return path


def write_bfl(arch, path, seed=0):
    tensors = {}
    for name, (down, up) in bfl_factors(arch, seed).items():
        tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    save_file(tensors, str(path))
    return path


def write_xlabs(arch, path, seed=0):
    mods = {n: m for n, m in read_adapter(write_bfl(arch, path, seed), extra_architectures=(arch,)).modules.items()
            if formats.LAYOUTS[formats.XLABS].can_hold(n)}
    return save_adapter(mods, path, arch, formats.XLABS)


WRITERS = {"kohya": write_kohya, "bfl": write_bfl, "xlabs": write_xlabs}  # (a diffusers file: the family contract)


@pytest.mark.parametrize("naming", WRITERS)
def test_loaded_adapters_change_the_weights_by_exactly_the_delta(arch, pipe, tmp_path, naming):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    adapter = read_adapter(WRITERS[naming](arch, tmp_path / "cand.safetensors"), extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0
    if naming in ("kohya", "bfl"):  # every transformer module (XLabs: attention only)
        assert {n for n in arch.modules if n.startswith("transformer.")} <= set(adapter.modules)
    before = e2e.lora_weights(pipe)
    coverage = load_adapters(pipe, {"candidate": adapter})["candidate"]
    assert coverage["fraction"] == 1.0 and coverage["loaded"] == len(adapter.modules)
    fused = Fused(pipe)
    fused.apply(Configuration("c@0.5", (("candidate", 0.5),)), ["candidate"])
    after = e2e.lora_weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    untouched = set(before) - set(adapter.modules)
    assert all(torch.equal(after[n], before[n]) for n in untouched)
    fused.restore()
    restored = e2e.lora_weights(pipe)
    assert all(torch.equal(restored[n], before[n]) for n in adapter.modules)


def test_a_t5_adapter_diffusers_does_not_load_fails_closed(arch, pipe, tmp_path):
    from auditkit.models.attach import load_adapters

    rng = np.random.default_rng(0)
    tensors = {}
    for name in (n for n in arch.modules if n.startswith("text_encoder_2.") and ".SelfAttention." in n):
        s, key = arch.modules[name], kohya_name(arch, name)
        tensors[f"{key}.lora_down.weight"] = rng.normal(size=(2, s.in_features)).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(size=(s.out_features, 2)).astype(np.float32)
    save_file(tensors, str(tmp_path / "t5.safetensors"))
    adapter = read_adapter(tmp_path / "t5.safetensors", extra_architectures=(arch,))
    assert adapter.coverage.fraction == 1.0 and all(n.startswith("text_encoder_2.") for n in adapter.modules)
    with pytest.raises(Unscannable, match=r"diffusers applied only 0 of \d+ modules \(0%\) \(diffusers loads none of "
                                          r"text_encoder_2's modules\)"):
        load_adapters(pipe, {"t5": adapter})


# --- the pipeline's own conditioning, denoiser call and training loss ---------------------------

def test_flux_conditioning_is_the_pipelines_own(pipe):
    from auditkit.models.pipeline import encode

    cond = encode(pipe, ["a red cross", "a blue cross"])
    with torch.no_grad():  # at the T5 length renders use: the tokenizer's 16 here (512 for Flux.1's)
        embeds, pooled, text_ids = pipe.encode_prompt(["a red cross", "a blue cross"], device="cpu",
                                                      max_sequence_length=16)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.added["pooled_projections"], pooled)
    assert set(cond[np.array([1, 0, 1])].kwargs()) == {"encoder_hidden_states", "pooled_projections"}
    (tokenizer, ids), = cond.tokens  # T5's tokens are the sequence (CLIP only pools)
    assert tokenizer is pipe.tokenizer_2 and ids.shape == embeds.shape[:2] == (2, 16)


def flux_reference(pipe, x, t, prompts, guidance=3.5):
    """The transformer called on latents x as FluxPipeline calls it and diffusers' Flux DreamBooth script
    unpacks it: packed 2×2 patches, image ids, the pipeline's text ids, timestep / 1000, the guidance."""
    b, c, h, w = x.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=16)
    out = pipe.transformer(hidden_states=pipe._pack_latents(x, b, c, h, w), timestep=t.expand(b) / 1000,
                           guidance=torch.full((b,), guidance), pooled_projections=pooled, encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
                           return_dict=False)[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def test_the_denoiser_call_is_the_pipelines(pipe):
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    assert den.latent_shape() == (4, 16, 16) and den.image_size() == 32 and den.prediction == "velocity"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    with torch.no_grad():
        ours = den.predict(x, t, encode(pipe, ["a red cross", "a blue cross"]))
        theirs = flux_reference(pipe, x, t, ["a red cross", "a blue cross"])
        other = flux_reference(pipe, x, t, ["a red cross", "a blue cross"], guidance=1.0)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, other), "the guidance input reaches the transformer"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return e2e.image_caption_folder(tmp_path_factory.mktemp("flux-data"))


def test_finetune_minimises_the_flow_matching_loss_on_packed_latents(pipe, data):
    e2e.check_first_flow_matching_loss(pipe, data, lambda gen: torch.rand((2,), generator=gen), flux_reference)
