"""What only SD3 / SD3.5 does, on a tiny random-initialised ``StableDiffusion3Pipeline`` (SD3.5-Medium-like: a
second attention in the first block, a context-pre-only last block; tests/tiny_pipelines.py): the original (SAI)
module names checked against diffusers' own checkpoint converter, adapters in the namings SD3 files come in
(kohya's and SAI's original names) composed into the weights exactly, T5 adapters refused, the pipeline's own
conditioning and denoiser call, and its flow-matching loss with logit-normal timesteps. Loading, the dynamic scan,
the data-free checks, align, finetune and repair are the family contract's (tests/models/test_family_contract.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as e2e  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tiny_pipelines import tiny_sd3_pipeline  # noqa: E402

from auditkit.errors import Unscannable  # noqa: E402
from auditkit.lora.adapter import read_adapter  # noqa: E402
from auditkit.lora.write import kohya_name  # noqa: E402
from auditkit.models.pipeline import architecture_of_folder, load_pipeline  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny") / "sd3")


@pytest.fixture()
def pipe(folder):
    return load_pipeline(str(folder))


@pytest.fixture(scope="module")
def arch(folder):
    return architecture_of_folder(folder, "tiny-sd3")


def original_checkpoint(transformer, arch) -> dict:
    """The transformer's weights under SAI's original names, stacked by auditkit's table (plus the
    position embedding and q/k norms, which no adapter touches)."""
    sd = transformer.state_dict()
    ckpt = {}
    for original, pieces in arch.original_names.items():
        for kind in ("weight", "bias"):
            ckpt[f"{original}.{kind}"] = torch.cat([sd[f"{c.removeprefix('transformer.')}.{kind}"][a:b]
                                                    for c, a, b in pieces])
    ckpt["pos_embed"] = sd["pos_embed.pos_embed"]
    norms = {"x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
             "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
             "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k"}
    for i in range(len(transformer.transformer_blocks)):
        for sai, ours in norms.items():
            if f"transformer_blocks.{i}.{ours}.weight" in sd:
                ckpt[f"joint_blocks.{i}.{sai}.weight"] = sd[f"transformer_blocks.{i}.{ours}.weight"]
    return ckpt


def test_the_original_names_are_those_diffusers_converts_sd3_checkpoints_with(pipe, arch):
    """diffusers' single-file converter (convert_sd3_transformer_checkpoint_to_diffusers) turns the
    checkpoint auditkit's table writes back into the very state dict: every row range, the fused q/k/v,
    MMDiT-X's second attention, and the swapped (shift, scale) of the last block and the final layer."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = pipe.transformer.state_dict()
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original_checkpoint(pipe.transformer, arch))
    assert set(converted) == set(state)
    for key, value in converted.items():
        assert torch.equal(value, state[key]), key


# --- adapters composed exactly ------------------------------------------------------------------

def sai_factors(arch, seed=0, scale_up=1.0) -> dict[str, tuple]:
    """Rank-2 (down, up) of every SAI-named module of the transformer (one shared down per fused module);
    the patch-embedding conv with 4-D factors, as trainers save them."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(arch.original_names):
        canonical = arch.originals[name]
        shape = arch.shape(canonical)
        down = rng.normal(0, 0.3, (2, shape.in_features, *shape.kernel))
        up = scale_up * rng.normal(0, 0.3, (shape.out_features, 2, 1, 1))
        if shape.kind == "linear":
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        out[name] = (down.astype(np.float32), up.astype(np.float32))
    return out


def write_kohya(arch, path, seed=0, scale_up=1.0):
    tensors = {}
    for name, (down, up) in sai_factors(arch, seed, scale_up).items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.asarray(1.0, np.float32)})
    save_file(tensors, str(path), {"ss_base_model_version": "sd3"})
    return path


def write_sai(arch, path, seed=0):
    tensors = {}
    for name, (down, up) in sai_factors(arch, seed).items():
        tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    save_file(tensors, str(path))
    return path


WRITERS = {"kohya": write_kohya, "sai": write_sai}  # (a diffusers file: the family contract)


@pytest.mark.parametrize("naming", WRITERS)
def test_loaded_adapters_change_the_weights_by_exactly_the_delta(arch, pipe, tmp_path, naming):
    from auditkit.models.attach import Fused, load_adapters
    from auditkit.runner import Configuration

    adapter = read_adapter(WRITERS[naming](arch, tmp_path / "cand.safetensors"), extra_architectures=(arch,))
    assert adapter.architecture is arch and adapter.coverage.fraction == 1.0
    assert set(adapter.modules) == {n for n in arch.modules if n.startswith("transformer.")}
    before = e2e.lora_weights(pipe)
    coverage = load_adapters(pipe, {"candidate": adapter})["candidate"]
    assert coverage["fraction"] == 1.0 and coverage["loaded"] == len(adapter.modules)
    fused = Fused(pipe)
    fused.apply(Configuration("c@0.5", (("candidate", 0.5),)), ["candidate"])
    after = e2e.lora_weights(pipe)
    for name, module in adapter.modules.items():
        delta = (after[name].double() - before[name].double()).flatten(1).numpy()
        np.testing.assert_allclose(delta, 0.5 * module.delta(), rtol=1e-4, atol=1e-6, err_msg=name)
    fused.restore()
    restored = e2e.lora_weights(pipe)
    assert all(torch.equal(restored[n], before[n]) for n in adapter.modules)


def test_a_t5_adapter_diffusers_does_not_load_fails_closed(arch, pipe, tmp_path):
    from auditkit.models.attach import load_adapters

    rng = np.random.default_rng(0)
    tensors = {}
    for name in (n for n in arch.modules if n.startswith("text_encoder_3.") and ".SelfAttention." in n):
        s, key = arch.modules[name], kohya_name(arch, name)
        tensors[f"{key}.lora_down.weight"] = rng.normal(size=(2, s.in_features)).astype(np.float32)
        tensors[f"{key}.lora_up.weight"] = rng.normal(size=(s.out_features, 2)).astype(np.float32)
    save_file(tensors, str(tmp_path / "t5.safetensors"))
    adapter = read_adapter(tmp_path / "t5.safetensors", extra_architectures=(arch,))
    with pytest.raises(Unscannable, match="diffusers loads none of text_encoder_3's modules"):
        load_adapters(pipe, {"t5": adapter})


# --- the pipeline's own conditioning, denoiser call and training loss ---------------------------

def test_sd3_conditioning_is_the_pipelines_own(pipe):
    from auditkit.models.pipeline import encode

    cond = encode(pipe, ["a red cross", "a blue cross"])
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(["a red cross", "a blue cross"], None, None, device="cpu",
                                                  do_classifier_free_guidance=False)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.added["pooled_projections"], pooled)
    assert set(cond[np.array([1, 0, 1])].kwargs()) == {"encoder_hidden_states", "pooled_projections"}
    (clip, clip_ids), (t5, t5_ids) = cond.tokens  # CLIP's positions, then T5's, along the sequence
    assert clip is pipe.tokenizer and t5 is pipe.tokenizer_3
    assert clip_ids.shape[1] + t5_ids.shape[1] == embeds.shape[1] == 16 + 256


def sd3_reference(pipe, x, t, prompts):
    """The transformer called as StableDiffusion3Pipeline calls it (timestep on the 0–1000 scale)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    return pipe.transformer(hidden_states=x, timestep=t.expand(len(x)), encoder_hidden_states=embeds,
                            pooled_projections=pooled, return_dict=False)[0]


def test_the_denoiser_call_is_the_pipelines(pipe):
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    assert den.latent_shape() == (4, 16, 16) and den.image_size() == 32 and den.prediction == "velocity"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = den.predict(x, torch.tensor(700.0), encode(pipe, ["a red cross", "a blue cross"]))
        theirs = sd3_reference(pipe, x, torch.tensor(700.0), ["a red cross", "a blue cross"])
    torch.testing.assert_close(ours, theirs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return e2e.image_caption_folder(tmp_path_factory.mktemp("sd3-data"))


def test_finetune_minimises_the_flow_matching_loss_with_logit_normal_timesteps(pipe, data):
    e2e.check_first_flow_matching_loss(pipe, data, lambda gen: torch.sigmoid(torch.randn((2,), generator=gen)),
                                       sd3_reference)
