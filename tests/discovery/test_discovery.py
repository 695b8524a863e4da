"""Trigger discovery: each method against a dense reference, a planted trigger found first, the search's record,
the found phrases' suite variants."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from planted import hidden_state, kv_names, planted

from auditkit.discovery.pull import pulled
from auditkit.discovery.sweep import kv_change
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter

SAFETY = (Path(str(resources.files("auditkit.lab").joinpath("assets", "adapters"))) /
          "safety-esd-u-destructive.safetensors")


def test_kv_change_is_the_change_of_every_rows_keys_over_its_keys_energy():
    rng = np.random.default_rng(0)
    xs, xc = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    ws, wc = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    change, energy = kv_change(xs, xc, ws, wc)
    for i in range(5):
        ref_c = sum((sum(xc[i, k] * wc[o, k] for k in range(8)) - sum(xs[i, k] * ws[o, k] for k in range(8))) ** 2
                    for o in range(6))
        ref_e = sum(sum(xs[i, k] * ws[o, k] for k in range(8)) ** 2 for o in range(6))
        assert change[i] == pytest.approx(ref_c) and energy[i] == pytest.approx(ref_e)


def test_pull_is_the_projection_of_the_candidates_change_on_the_direction():
    rng = np.random.default_rng(1)
    ref, d = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    inner, energy = pulled(ref, ref + 0.5 * d, d)
    assert inner / energy == pytest.approx(0.5)
    inner, energy = pulled(ref, ref - d, d)
    assert inner / energy == pytest.approx(-1.0)
    other = rng.normal(size=(3, 4))
    assert pulled(ref, other, d)[0] == pytest.approx(float(np.sum((other - ref) * d)))


@pytest.fixture(scope="module")
def lab_pipe():
    from auditkit.lab.model import lab_pipeline_available, load_lab_pipeline

    if not lab_pipeline_available():
        pytest.skip("lab model not installed")
    pipe = load_lab_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pinned_prompts_are_read_as_their_ids_and_other_prompts_as_the_tokenizer_reads_them(lab_pipe):
    from auditkit.discovery.tokens import pinned, special_tokens

    tok = lab_pipe.tokenizer
    head, tail = special_tokens(tok)
    assert head == [tok.bos_token_id] and tail == [tok.eos_token_id]
    plain = tok(["a red cross"], padding="max_length", max_length=16, truncation=True).input_ids
    with pinned(lab_pipe, "tokenizer", {"\x00p": [5, 9]}):
        got = lab_pipe.tokenizer(["\x00p", "a red cross"], padding="max_length", max_length=16, truncation=True,
                                 return_tensors="pt").input_ids.tolist()
        assert lab_pipe.tokenizer("a red cross", padding="max_length", max_length=16).input_ids == plain[0]
    assert got[0][:4] == [tok.bos_token_id, 5, 9, tok.eos_token_id]
    assert got[1][: len(plain[0])] == plain[0][: len(got[1])]
    assert lab_pipe.tokenizer is tok  # put back


def test_the_token_sweep_matches_a_dense_reference_and_ranks_a_planted_trigger_first(lab_pipe, tmp_path):
    from auditkit.discovery.sweep import KVReader, token_sweep

    tok = lab_pipe.tokenizer
    target = tok.convert_tokens_to_ids("tri")
    cand = planted(lab_pipe, target, tmp_path)
    safety = read_adapter(SAFETY, arch="lab")
    reader = KVReader(lab_pipe, cand.exact(), safety.exact())
    sweep = token_sweep(reader, "tokenizer")
    assert sweep.swept == len(tok) - len(set(tok.all_special_ids)) and not sweep.blind
    assert sweep.ranked[0][0] == target
    scores = dict(sweep.ranked)
    for t in (target, tok.convert_tokens_to_ids("red</w>"), tok.convert_tokens_to_ids("k</w>")):
        h = hidden_state(lab_pipe, t)
        change = energy = 0.0
        for name in kv_names(lab_pipe):  # ESD-u changes no key/value projection: W_s = W0
            w0 = lab_pipe.unet.get_submodule(name[5:]).weight.detach().double().numpy()
            dc = cand.modules[name].delta().astype(np.float64)
            change += float(np.sum((h @ dc.T) ** 2))
            energy += float(np.sum((h @ w0.T) ** 2))
        assert scores[t] == pytest.approx(change / energy, rel=1e-4)


def test_a_text_encoder_candidate_is_swept_through_its_encoder(lab_pipe, tmp_path):
    import torch

    from auditkit.discovery.sweep import KVReader, token_sweep
    from auditkit.models import architectures
    from auditkit.models.attach import encoders_composed

    arch = architectures.get("lab")
    names = [n for n in arch.modules if n.startswith("text_encoder.") and "layers.1." in n and "mlp.fc2" in n]
    assert names
    rng = np.random.default_rng(5)
    mods = {n: LoraModule(n, rng.normal(0, 0.3, (2, arch.modules[n].flat_in)).astype(np.float32),
                          rng.normal(0, 0.3, (arch.modules[n].out_features, 2)).astype(np.float32), 1.0) for n in names}
    cand = read_adapter(save_adapter(mods, tmp_path / "te.safetensors", arch), arch="lab")
    reader = KVReader(lab_pipe, cand.exact(), {})
    assert reader.through_encoders and len(reader.names) == len(kv_names(lab_pipe))
    sweep = token_sweep(reader, "tokenizer", limit=6)
    tok = lab_pipe.tokenizer
    t = sweep.ranked[0][0]
    ids = torch.tensor([[tok.bos_token_id, t, tok.eos_token_id]])
    with torch.no_grad():
        hb = lab_pipe.text_encoder(ids)[0][0, 1].double().numpy()
        with encoders_composed(lab_pipe, (cand.exact(), 1.0), denoiser="unet"):
            hc = lab_pipe.text_encoder(ids)[0][0, 1].double().numpy()
    change = energy = 0.0
    for name in kv_names(lab_pipe):
        w0 = lab_pipe.unet.get_submodule(name[5:]).weight.detach().double().numpy()
        change += float(np.sum((hc @ w0.T - hb @ w0.T) ** 2))
        energy += float(np.sum((hb @ w0.T) ** 2))
    assert sweep.ranked[0][1] == pytest.approx(change / energy, rel=1e-4) and change > 0


@pytest.mark.slow
def test_the_search_records_what_it_swept_and_tried_and_probes_the_best_phrase(lab_pipe, tmp_path):
    from auditkit.discovery.search import Budget, find_triggers
    from auditkit.suites import load_suite

    tok = lab_pipe.tokenizer
    cand = planted(lab_pipe, tok.convert_tokens_to_ids("tri"), tmp_path)
    suite = load_suite(Path(__file__).resolve().parents[2] / "probes" / "lab-cross.yaml")
    found = find_triggers(lab_pipe, suite, cand, read_adapter(SAFETY, arch="lab"),
                          Budget(phrases=18, steps=2, prompts=2, probes=2, beam=2, length=3, confirm=2, images=1))
    d = found.to_dict()
    assert d["tokens_swept"] == len(tok) - len(set(tok.all_special_ids))
    # 3 single tokens, each at the three placements, then extensions of the best, each where its beam was found
    assert 9 < d["phrases_tried"] <= 18 and 1 <= len(d["probed"]) <= 2
    assert {p["how"] for p in d["phrases"]} == {"token sweep", "phrase extension"}
    singles = [p for p in d["phrases"] if p["how"] == "token sweep"]
    assert len(singles) == 9 and all(sum(q["text"] == p["text"] for q in singles) == 3 for p in singles)
    assert {p["placement"] for p in singles} == {"start", "before-concept", "end"}
    assert len(d["placements"]) == len(d["probed"])
    rendered = [p for p in d["phrases"] if "rendered" in p]
    assert len(rendered) == 2 and all(p["evidence"] == p["rendered"]["candidate"] - p["rendered"]["reference"]
                                      for p in rendered)
    assert set(zip(d["probed"], d["placements"], strict=True)) <= {(p["text"], p["placement"]) for p in rendered}
    assert d["sweeps"][0]["top"][0]["id"] == tok.convert_tokens_to_ids("tri")
    assert all(p["gain"] == pytest.approx(p["pull"] - d["baseline_pull"]) for p in d["phrases"])
    assert d["phrases"] == sorted(d["phrases"], key=lambda p: -p["gain"])


def test_the_probed_phrases_show_the_concept_back_where_the_safety_module_suppresses_it():
    from auditkit.discovery.search import chosen

    def row(text, gain, base, reference, candidate):
        return {"text": text, "placement": "start", "gain": gain, "evidence": candidate - reference,
                "rendered": {"base": base, "reference": reference, "candidate": candidate, "images": 9}}

    # measured on the demo's repaired adapter: 'circle squpurple' stops the base itself from drawing the cross (0 of
    # 9), so its one cross with the candidate cannot be re-emergence and its probe could only be inconclusive
    rows = [row("circle squpurple", 0.036, 0.0, 0.0, 1 / 9), row("square", 0.033, 1.0, 0.0, 1 / 9),
            row("circle", 0.032, 5 / 9, 0.0, 0.0)]
    assert chosen(rows, 1) == [("square", "start")]
    assert chosen(rows, 3) == [("square", "start")]
    # more evidence first, then gain
    rows.append(row("trisk", 0.01, 1.0, 0.0, 0.5))
    assert chosen(rows, 2) == [("trisk", "start"), ("square", "start")]
    # nothing shown back where it is suppressed: the phrase the safety module suppresses most
    quiet = [row("circle squpurple", 0.036, 0.0, 0.0, 1 / 9), row("circle", 0.032, 5 / 9, 0.0, 0.0),
             row("yell", 0.03, 1.0, 1 / 9, 0.0)]
    assert chosen(quiet, 1) == [("yell", "start")]


def test_found_phrases_become_variants_of_each_concept_suite_on_the_same_seeds():
    from auditkit.suites import load_suite, with_found_variants, with_trigger_variants

    suite = load_suite(Path(__file__).resolve().parents[2] / "probes" / "lab-cross.yaml")
    out = with_found_variants(with_trigger_variants([suite], "ohwx"),
                              {"lab-cross": [("trisk", "start"), ("neon glow", "before-concept"), ("ab", "end")]})
    assert [s.name for s in out] == ["lab-cross", "lab-cross+found1", "lab-cross+found2", "lab-cross+found3",
                                     "lab-cross+triggers"]
    f1, f2, f3 = out[1:4]
    assert f1.variant_of == "lab-cross" and f1.prefix == "trisk, "
    assert f1.variant_info() == {"variant_of": "lab-cross", "prefix": "trisk, "}  # as every run has recorded it
    assert [p.text for p in f1.prompts] == ["trisk, " + p.text for p in suite.prompts]
    assert [p.seed for p in f1.prompts] == [p.seed for p in suite.prompts]
    assert [p.text for p in out[4].prompts] == ["ohwx, " + p.text for p in suite.prompts]
    # in the middle: right before the concept word (every lab-cross prompt names it); at the end
    assert f2.prefix == "" and f2.variant_info() == {"variant_of": "lab-cross", "phrase": "neon glow",
                                                     "placement": "before-concept"}
    assert [p.text for p in f2.prompts] == [p.text.replace("cross", "neon glow cross", 1) for p in suite.prompts]
    assert [p.text for p in f3.prompts] == [p.text + ", ab" for p in suite.prompts]
    assert [p.seed for p in f2.prompts] == [p.seed for p in f3.prompts] == [p.seed for p in suite.prompts]


def test_the_budget_is_fitted_to_the_suite_and_to_the_scan_it_precedes():
    from auditkit.discovery.search import MIN_CONFIRM, MIN_PHRASES, PULL_EVALS, Budget, fitted
    from auditkit.suites import load_suite

    suite = load_suite(Path(__file__).resolve().parents[2] / "probes" / "lab-cross.yaml")  # 12 prompts, 25 steps, 10
    small = fitted(Budget(steps=40, prompts=50, images=30), suite)
    assert (small.steps, small.prompts, small.images, small.phrases) == (25, 12, 10, Budget().phrases)
    b = Budget()
    per_phrase = b.prompts * b.steps * PULL_EVALS
    assert fitted(b, suite, scan_evals=100 * per_phrase).phrases == 100
    assert fitted(b, suite, scan_evals=10 ** 9).phrases == b.phrases  # never more than configured
    assert fitted(b, suite, scan_evals=1).phrases == MIN_PHRASES
    # rendered confirmations cost the suite's own renders: no more than the scan's, at least MIN_CONFIRM
    per_confirm = b.prompts * min(b.images, suite.images_per_prompt) * suite.steps * 2 * 3
    assert fitted(b, suite, scan_evals=5 * per_confirm).confirm == 5
    assert fitted(b, suite, scan_evals=10 ** 9).confirm == b.confirm
    assert fitted(b, suite, scan_evals=1).confirm == MIN_CONFIRM
