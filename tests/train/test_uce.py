"""UCE's closed-form edit: the math against a dense least-squares solve, and the edit of a tiny lab pipeline
written as an exact LoRA."""

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.train.uce import UCEConfig, closed_form_edit


def dense_reference(w0, c, v, p, preserve, lam):
    """argmin_W ‖W Cᵀ − Vᵀ‖² + preserve‖W Pᵀ − W0 Pᵀ‖² + lam‖W − W0‖², as one stacked least-squares problem."""
    d = w0.shape[1]
    a = np.vstack([c, np.sqrt(preserve) * p, np.sqrt(lam) * np.eye(d)])
    b = np.vstack([v, np.sqrt(preserve) * p @ w0.T, np.sqrt(lam) * w0.T])
    return np.linalg.lstsq(a, b, rcond=None)[0].T


@pytest.mark.parametrize("preserve,lam", [(1.0, 0.1), (10.0, 0.01), (0.0, 1.0), (3.0, 0.0)])
def test_closed_form_edit_matches_a_dense_least_squares_solve(preserve, lam):
    rng = np.random.default_rng(0)
    w0, c, v, p = rng.normal(size=(5, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 5)), rng.normal(size=(9, 8))
    np.testing.assert_allclose(closed_form_edit(w0, c, v, p, preserve, lam),
                               dense_reference(w0, c, v, p, preserve, lam), rtol=1e-9, atol=1e-9)


def test_closed_form_edit_moves_the_concepts_and_keeps_the_preserved_when_both_fit():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    c, p = rng.normal(size=(2, 3)) @ basis[:3], rng.normal(size=(4, 4)) @ basis[3:7]  # disjoint subspaces
    w0, v = rng.normal(size=(5, 8)), rng.normal(size=(2, 5))
    w = closed_form_edit(w0, c, v, p, preserve=1.0, lam=1e-9)
    np.testing.assert_allclose(c @ w.T, v, atol=1e-5)
    np.testing.assert_allclose(p @ w.T, p @ w0.T, atol=1e-5)


def test_closed_form_edit_without_any_concept_is_the_original():
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(4, 6))
    w = closed_form_edit(w0, np.zeros((0, 6)), np.zeros((0, 4)), rng.normal(size=(3, 6)), 1.0, 0.1)
    np.testing.assert_allclose(w, w0, atol=1e-12)


def test_uce_settings_are_refused_when_they_cannot_be_solved():
    with pytest.raises(BadInput, match="preserve must be >= 0"):
        UCEConfig(preserve=-1.0)
    with pytest.raises(BadInput, match="not determined"):
        UCEConfig(preserve=0.0, lam=0.0)


@pytest.mark.slow
def test_uce_edits_the_lab_pipelines_cross_attention_as_an_exact_lora():
    torch = pytest.importorskip("torch")
    from auditkit.lab.model import assemble_pipeline, build_components
    from auditkit.models.attach import composed
    from auditkit.train.uce import train_uce

    c = build_components(seed=0)
    pipe = assemble_pipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])
    concept, guide = ["a red cross", "a blue cross"], ["a red square", "a blue square"]
    preserved = ["a red circle", "a green tee", "a blue bar"]
    mods = train_uce(pipe, concept, guide, preserved, UCEConfig(preserve=1.0, lam=0.1))
    assert mods and all(n.endswith((".attn2.to_k", ".attn2.to_v")) for n in mods)
    from auditkit.models.pipeline import encode

    name = next(iter(mods)).removeprefix("unet.")
    layer = pipe.unet.get_submodule(name)
    w0 = layer.weight.detach().double().numpy()
    rows = lambda prompts: encode(pipe, prompts).hidden.double().numpy().reshape(-1, w0.shape[1])  # noqa: E731
    expected = closed_form_edit(w0, rows(concept), rows(guide) @ w0.T, rows(["", *preserved]), 1.0, 0.1)
    np.testing.assert_allclose(mods[f"unet.{name}"].delta(), expected - w0, atol=1e-5)  # the LoRA is exact
    with torch.no_grad():
        before = {k: layer(encode(pipe, p).hidden) for k, p in (("concept", concept), ("guide", guide),
                                                                 ("kept", preserved))}
        with composed(pipe.unet, (mods, 1.0)):
            after = {k: layer(encode(pipe, p).hidden) for k, p in (("concept", concept), ("kept", preserved))}
    moved = float((after["concept"] - before["guide"]).pow(2).mean())
    assert moved < 0.05 * float((before["concept"] - before["guide"]).pow(2).mean())  # the cross reads as a square
    assert float((after["kept"] - before["kept"]).pow(2).mean()) < 0.05 * float(before["kept"].pow(2).mean())
