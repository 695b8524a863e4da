"""The trigger search on every family but the lab (tested in test_discovery.py), each through its own text encoders:
SDXL (two CLIP encoders of one vocabulary, features side by side, the pooled projection), SD3 (CLIP-L and CLIP-G
beside each other, T5 after them along the sequence, MMDiT), Flux (T5's sequence, CLIP pooled only, MMDiT) and the
DiT lab. SD3's and Flux's T5 read a T5-like tokenizer of their own vocabulary (:func:`tiny_pipelines.t5_tokenizer`),
so CLIP and T5 are swept apart. The sweep is checked against the keys and values computed by hand: the prompt
encoded by the family's encoders called directly, an MMDiT's text stream captured at the key/value projections'
inputs at the first step of the base's trajectory from the sweep's noise."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tiny_pipelines as tp  # noqa: E402

from auditkit.lora.adapter import LoraModule, read_adapter  # noqa: E402
from auditkit.lora.write import save_adapter  # noqa: E402

# slow: it trains, renders or builds pipelines (make test-fast leaves it out)
pytestmark = pytest.mark.slow

# sd3-one-vocab: the tiny pipeline as built, its T5 reading the CLIP vocabulary (the token in both spans);
# sd3-no-t5: SD3 loaded without its T5 encoder (zeros in T5's positions)
FAMILIES = ("sdxl", "sd3", "sd3-one-vocab", "sd3-no-t5", "flux", "lab-dit")
LIMIT = 8  # tokens swept per vocabulary
SWEPT = {"sdxl": ["tokenizer"], "sd3": ["tokenizer", "tokenizer_3"], "sd3-one-vocab": ["tokenizer"],
         "sd3-no-t5": ["tokenizer"], "flux": ["tokenizer_2"], "lab-dit": ["tokenizer_2"]}
ENCODER = {"sdxl": "text_encoder_2", "sd3": "text_encoder_3", "sd3-one-vocab": "text_encoder_2",
           "sd3-no-t5": "text_encoder", "flux": "text_encoder", "lab-dit": "text_encoder_2"}


def build(family: str):
    if family == "lab-dit":
        from auditkit.lab.bases import LAB_BASES
        from auditkit.lab.dit import load_lab_dit_pipeline

        if not LAB_BASES["lab-dit"].available():
            pytest.skip("DiT lab model not installed")
        return load_lab_dit_pipeline()
    if family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**tp.tiny_sdxl_components())
    elif family.startswith("sd3"):
        own = {"sd3": {"tokenizer_3": tp.t5_tokenizer()}, "sd3-one-vocab": {},
               "sd3-no-t5": {"text_encoder_3": None, "tokenizer_3": None}}[family]
        pipe = diffusers.StableDiffusion3Pipeline(**{**tp.tiny_sd3_components(), **own})
    else:
        pipe = diffusers.FluxPipeline(**{**tp.tiny_flux_components(), "tokenizer_2": tp.t5_tokenizer()})
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()  # as from_pretrained leaves them: no dropout (T5's)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    from auditkit.models.pipeline import architecture_of

    pipe = build(request.param)
    return request.param, pipe, architecture_of(pipe)


def lora(arch, names, seed, scale=1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: LoraModule(n, rng.normal(0, 1, (2, arch.modules[n].flat_in)).astype(np.float32),
                          rng.normal(0, scale, (arch.modules[n].out_features, 2)).astype(np.float32), 1.0)
            for n in names}


def kv_modules(pipe, arch) -> list[str]:
    from auditkit.models.pipeline import denoiser_for

    return denoiser_for(pipe).text_kv_modules(arch.modules)


def hand_ids(pipe, swept: str, tokens: list[int]) -> dict:
    """Each tokenizer's ids of the prompts made of one token each: as ids (the swept vocabulary's tokenizers: the
    token between the tokenizer's own start/end tokens) or as the token's text (the others), padded to the longest."""
    source = getattr(pipe, swept)
    out = {}
    for attr in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, attr, None)
        if tok is None:
            continue
        if tok.get_vocab() == source.get_vocab():
            full = tok("a").input_ids
            content = tok("a", add_special_tokens=False).input_ids
            k = full.index(content[0])
            out[attr] = torch.tensor([full[:k] + [t] + full[k + 1:] for t in tokens])
        else:
            texts = [source.decode([t]).strip() for t in tokens]
            out[attr] = tok(texts, padding="longest", return_tensors="pt").input_ids
    return out


def hand_conditioning(family: str, pipe, ids: dict):
    """The conditioning as the family's pipeline computes it, with the encoders called directly on ``ids``; and
    which tokenizer attribute made each position of the sequence."""
    from auditkit.models.conditioning import Conditioning

    with torch.no_grad():
        if family == "sdxl":
            one = pipe.text_encoder(ids["tokenizer"], output_hidden_states=True)
            two = pipe.text_encoder_2(ids["tokenizer_2"], output_hidden_states=True)
            hidden = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype).expand(len(hidden), 6)
            cond = Conditioning(hidden, {"text_embeds": two.text_embeds, "time_ids": time_ids})
            return cond, ["tokenizer"] * hidden.shape[1]
        if family.startswith("sd3"):
            one = pipe.text_encoder(ids["tokenizer"], output_hidden_states=True)
            two = pipe.text_encoder_2(ids["tokenizer_2"], output_hidden_states=True)
            if pipe.text_encoder_3 is None:  # the pipeline's zeros at its default T5 length
                t5 = torch.zeros(len(one.text_embeds), 256, pipe.transformer.config.joint_attention_dim)
            else:
                t5 = pipe.text_encoder_3(ids["tokenizer_3"])[0]
            clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            cond = Conditioning(torch.cat([clip, t5], dim=1),
                                {"pooled_projections": torch.cat([one.text_embeds, two.text_embeds], dim=-1)},
                                added_under=None)
            t5_by = "tokenizer_3" if pipe.text_encoder_3 is not None else None
            return cond, ["tokenizer"] * clip.shape[1] + [t5_by] * t5.shape[1]
        hidden = pipe.text_encoder_2(ids["tokenizer_2"])[0]
        pooled = pipe.text_encoder(ids["tokenizer"]).pooler_output
        return Conditioning(hidden, {"pooled_projections": pooled}, added_under=None), ["tokenizer_2"] * hidden.shape[1]


def kv_inputs(pipe, cond, names: list[str]) -> dict:
    """What each text key/value projection reads: a UNet's the prompt states; an MMDiT's its input captured at the
    first step of the base's trajectory from the sweep's noise."""
    from auditkit.discovery.sweep import SWEEP_SEED
    from auditkit.models.pipeline import denoiser_for

    den = denoiser_for(pipe)
    if den.label == "UNet":
        return {n: cond.hidden.double() for n in names}
    seen = {}

    def keep(name):
        def hook(_module, args, _out):
            seen.setdefault(name, args[0].double())  # the first step only
        return hook

    hooks = [den.model.get_submodule(n.split(".", 1)[1]).register_forward_hook(keep(n)) for n in names]
    try:
        sampler = den.sampler(1)
        x = den.noise(len(cond), torch.Generator().manual_seed(SWEEP_SEED)) * sampler.init_noise_sigma
        with torch.no_grad():
            den.predict(x, sampler.timesteps[0], cond)
    finally:
        for h in hooks:
            h.remove()
    return seen


def hand_scores(family, pipe, arch, swept, tokens, candidate, safety) -> list[float]:
    """Σ_m ‖x_c·W_cᵀ − x_s·W_sᵀ‖² / Σ_m ‖x_s·W_sᵀ‖² over the token's own positions, by hand."""
    from auditkit.models.attach import encoders_composed

    ids = hand_ids(pipe, swept, tokens)
    names = kv_modules(pipe, arch)
    cond_s, made_by = hand_conditioning(family, pipe, ids)
    with encoders_composed(pipe, (candidate, 1.0), denoiser=names[0].split(".")[0]):
        cond_c, _ = hand_conditioning(family, pipe, ids)
    x_s, x_c = kv_inputs(pipe, cond_s, names), kv_inputs(pipe, cond_c, names)
    vocab = getattr(pipe, swept).get_vocab()
    same = {a for a in set(made_by) if a and getattr(pipe, a).get_vocab() == vocab}
    full = torch.cat([ids[a] if a in same else torch.full((len(tokens), made_by.count(a)), -1)
                      for a in dict.fromkeys(made_by)], dim=1)
    out = []
    for r, t in enumerate(tokens):
        rows = [j for j in range(full.shape[1]) if full[r, j] == t]
        first = {}  # the first occurrence within each span of the swept vocabulary
        for j in rows:
            first.setdefault(made_by[j], j)
        pos = sorted(first.values())
        change = energy = 0.0
        for n in names:
            w0 = pipe.components[n.split(".")[0]].get_submodule(n.split(".", 1)[1]).weight.detach().double()
            w_s = w0 + (torch.as_tensor(safety[n].delta()).double() if n in safety else 0)
            w_c = w_s + (torch.as_tensor(candidate[n].delta()).double() if n in candidate else 0)
            ks, kc = x_s[n][r, pos] @ w_s.T, x_c[n][r, pos] @ w_c.T
            change += float(((kc - ks) ** 2).sum())
            energy += float((ks ** 2).sum())
        out.append(change / energy)
    return out


def test_the_sequence_tokenizers_are_one_per_vocabulary_the_denoiser_reads_as_a_sequence(fam):
    from auditkit.discovery.tokens import sequence_tokenizers

    family, pipe, _ = fam
    assert sequence_tokenizers(pipe) == SWEPT[family]


def test_the_sweep_of_each_vocabulary_is_the_key_value_change_computed_by_hand(fam):
    from auditkit.discovery.sweep import KVReader, token_sweep
    from auditkit.discovery.tokens import sweepable_ids

    family, pipe, arch = fam
    names = kv_modules(pipe, arch)
    assert names and all(n.endswith(("attn2.to_k", "attn2.to_v", "attn.add_k_proj", "attn.add_v_proj")) for n in names)
    candidate, safety = lora(arch, names, 1), lora(arch, names[::2], 2, scale=0.1)
    reader = KVReader(pipe, candidate, safety)
    assert not reader.through_encoders and reader.names == names
    for swept in SWEPT[family]:
        sweep = token_sweep(reader, swept, limit=LIMIT)
        tokens = sweepable_ids(getattr(pipe, swept))[:LIMIT]
        assert sweep.swept == LIMIT and sorted(t for t, _ in sweep.ranked) == sorted(tokens)
        got = dict(sweep.ranked)
        want = hand_scores(family, pipe, arch, swept, tokens, candidate, safety)
        assert [got[t] for t in tokens] == pytest.approx(want, rel=1e-4)
        assert min(want) > 0


def test_a_text_encoder_candidate_is_read_through_the_familys_encoders(fam):
    from auditkit.discovery.sweep import KVReader, token_sweep
    from auditkit.discovery.tokens import sweepable_ids

    family, pipe, arch = fam
    encoder = ENCODER[family]
    layers = [n for n in arch.modules if n.startswith(f"{encoder}.") and n.endswith(("fc2", "wo", "mlp.fc1", ".o"))]
    assert layers, sorted(arch.modules)[:20]
    candidate = lora(arch, layers, 3, scale=0.3)
    reader = KVReader(pipe, candidate, {})
    assert reader.through_encoders and reader.names == kv_modules(pipe, arch)
    swept = SWEPT[family][-1]
    sweep = token_sweep(reader, swept, limit=LIMIT)
    tokens = sweepable_ids(getattr(pipe, swept))[:LIMIT]
    got = dict(sweep.ranked)
    want = hand_scores(family, pipe, arch, swept, tokens, candidate, {})
    assert [got[t] for t in tokens] == pytest.approx(want, rel=1e-4, abs=1e-12)
    assert sweep.ranked[0][1] > 0


def test_the_search_runs_on_the_family_and_records_every_vocabulary_it_swept(fam, tmp_path):
    from auditkit.discovery.search import Budget, find_triggers
    from auditkit.discovery.tokens import sweepable_ids
    from auditkit.models.families import family_of_pipeline
    from auditkit.suites import load_suite

    family, pipe, arch = fam
    path = save_adapter(lora(arch, kv_modules(pipe, arch), 4), tmp_path / "cand.safetensors", arch,
                        family_of_pipeline(pipe).written_layout)
    candidate = read_adapter(path, extra_architectures=(arch,))
    (tmp_path / "cross.yaml").write_text(tp.CROSS_SUITE)
    found = find_triggers(pipe, load_suite(tmp_path / "cross.yaml"), candidate, None,
                          Budget(tokens=LIMIT, phrases=4, steps=1, prompts=1, length=2, beam=1, probes=1))
    d = found.to_dict()
    assert [s["tokenizer"] for s in d["sweeps"]] == SWEPT[family]
    assert d["tokens_swept"] == sum(min(LIMIT, len(sweepable_ids(getattr(pipe, s)))) for s in SWEPT[family])
    assert d["phrases_tried"] >= 1 and d["probed"] and all(np.isfinite(p["pull"]) for p in d["phrases"])


def test_pinned_t5_prompts_stay_short_with_no_start_token():
    from auditkit.discovery.tokens import PinnedTokens, special_tokens

    tok = tp.t5_tokenizer()
    assert special_tokens(tok) == ([], [tok.eos_token_id])
    pinned = PinnedTokens(tok, {"\x00a": [5], "\x00b": [5, 6, 7]})
    got = pinned(["\x00a", "\x00b"], padding="max_length", max_length=512, truncation=True, return_length=False,
                 return_overflowing_tokens=False, add_special_tokens=True, return_tensors="pt")
    assert got.input_ids.tolist() == [[5, 1, 0, 0], [5, 6, 7, 1]]
    assert got.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert pinned.tokenize("\x00b") == tok.convert_ids_to_tokens([5, 6, 7])
    assert PinnedTokens(tok, {"\x00a": [5]}, short=False)(["\x00a"], padding="max_length", max_length=512,
                                                          truncation=True).input_ids[0][:3] == [5, 1, 0]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_mmdits_prompts_go_through_the_denoiser_a_few_image_tokens_at_a_time(family, monkeypatch):
    from auditkit.discovery import sweep as sweep_module
    from auditkit.discovery.tokens import sweepable_ids
    from auditkit.models.pipeline import architecture_of, denoiser_for

    pipe = build(family)
    arch = architecture_of(pipe)
    names = kv_modules(pipe, arch)
    candidate = lora(arch, names, 5)
    reader = sweep_module.KVReader(pipe, candidate, {})
    swept = SWEPT[family][0]
    tokens = sweepable_ids(getattr(pipe, swept))[:LIMIT]
    monkeypatch.setattr(sweep_module, "STATE_IMAGE_TOKENS", 3 * denoiser_for(pipe).image_tokens())
    got = dict(sweep_module.token_sweep(reader, swept, limit=LIMIT).ranked)
    want = [s for i in range(0, LIMIT, 3)
            for s in hand_scores(family, pipe, arch, swept, tokens[i: i + 3], candidate, {})]
    assert [got[t] for t in tokens] == pytest.approx(want, rel=1e-4)  # passes of 3 prompts, each on the sweep's noise


def test_a_candidate_that_changes_no_text_key_value_is_searched_blind(tmp_path):
    from auditkit.discovery.search import Budget, find_triggers
    from auditkit.models.families import family_of_pipeline
    from auditkit.models.pipeline import architecture_of
    from auditkit.suites import load_suite

    pipe = build("flux")
    arch = architecture_of(pipe)
    image = [n for n in arch.modules if n.startswith("transformer.") and n.endswith("attn.to_q")]
    layout = family_of_pipeline(pipe).written_layout
    path = save_adapter(lora(arch, image, 6), tmp_path / "cand.safetensors", arch, layout)
    (tmp_path / "cross.yaml").write_text(tp.CROSS_SUITE)
    budget = Budget(tokens=LIMIT, phrases=4, steps=1, prompts=1, length=2, beam=1, probes=1)
    found = find_triggers(pipe, load_suite(tmp_path / "cross.yaml"), read_adapter(path, extra_architectures=(arch,)),
                          None, budget).to_dict()
    assert [s["blind"] for s in found["sweeps"]] == [True] and found["tokens_swept"] == LIMIT
    assert all(t["score"] == 0 for t in found["sweeps"][0]["top"]) and "sees nothing" in found["notes"][0]
    assert found["phrases_tried"] >= 1 and found["probed"]
