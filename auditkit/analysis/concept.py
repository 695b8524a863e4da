"""Data-free concept check: does the candidate revert the safety module's change to the keys and values
the image reads from the concept prompts' tokens?

Each text token enters attention through key/value projections: a UNet's cross-attention
``attn2.to_k``/``to_v`` read the prompt's hidden states E (tokens × d) themselves; an MMDiT (SD3,
Flux) joint attention's ``attn.add_k_proj``/``add_v_proj`` read the text stream X of their block (E
embedded, normalised and modulated by the timestep and pooled prompt, and after the first block also
attended to the image), captured along the base model's own trajectory (a few steps, no image:
:mod:`auditkit.models.denoising`). A safety update ΔW_s changes the keys/values of the concept prompts
by ΔS = X·ΔW_sᵀ; a candidate changes them by ΔC = X·ΔW_cᵀ. The reverted fraction is
−⟨ΔC, ΔS⟩ / ‖ΔS‖² (1 = the candidate restores the concept's original keys and values), summed over
modules. It needs the base model and the suite's concept prompts, and no image: seconds on a CPU.

Only safety modules among those projections take part; for a safety module elsewhere (ESD-u) the
check does not apply and says so. When the candidate or the safety module also changes a text encoder, each
model reads the prompts through its own encoders: ΔS = X_s·(W+ΔW_s)ᵀ − X·Wᵀ and ΔC = X_c·(W+ΔW_s+ΔW_c)ᵀ −
X_s·(W+ΔW_s)ᵀ, compared densely (a candidate acting through the text encoder alone is seen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from auditkit.lora.adapter import LoraModule

KV = (".attn2.to_k", ".attn2.to_v")  # a UNet's; a family's own: Denoising.text_kv


@dataclass
class ConceptCheck:
    applicable: bool
    reverted: float | None  # over all tokens of the concept prompts
    reverted_concept_tokens: float | None  # over the concept word's own tokens only
    modules: list[dict]
    tokens: int
    concept_tokens: int
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _projected(e: np.ndarray, m: LoraModule) -> np.ndarray:
    """E·ΔWᵀ = scale·(E·Aᵀ)·Bᵀ, never forming ΔW."""
    return m.scale * (e @ m.down.astype(np.float64).T) @ m.up.astype(np.float64).T


class KVSums:
    """The sums behind the reverted fractions, accumulated over chunks of the projections' inputs:
    per module ⟨ΔC, ΔS⟩ and ‖ΔS‖² over all token rows and over the concept word's rows."""

    def __init__(self, candidate: dict[str, LoraModule], safety: dict[str, LoraModule], kv: tuple[str, ...] = KV):
        self.candidate, self.safety, self.kv = candidate, safety, kv
        self.names = sorted(n for n in safety if n.endswith(kv))
        self.sums = {n: np.zeros(4) for n in self.names}  # inner, energy (all rows), inner, energy (concept)
        self.rows = self.concept_rows = 0  # as one module saw them (every module sees the same rows)
        self._counting: str | None = None

    def add(self, name: str, e: np.ndarray, mask: np.ndarray) -> None:
        """Rows ``e`` (rows × d) read by module ``name``; ``mask`` flags the concept word's rows."""
        e = np.asarray(e, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        ds = _projected(e, self.safety[name])
        dc = _projected(e, self.candidate[name]) if name in self.candidate else np.zeros_like(ds)
        self._accumulate(name, ds, dc, mask)

    def add_through_encoders(self, name: str, weight: np.ndarray, xs: tuple[np.ndarray, np.ndarray, np.ndarray],
                             mask: np.ndarray) -> None:
        """Rows read by module ``name`` under the base's, the safe model's and the candidate's own text encoders
        (``xs``: x_b, x_s, x_c, rows × d each), ``weight`` its base weight (out × d): ΔS = x_s·(W+ΔW_s)ᵀ − x_b·Wᵀ,
        ΔC = x_c·(W+ΔW_s+ΔW_c)ᵀ − x_s·(W+ΔW_s)ᵀ (with equal rows, exactly :meth:`add`'s ΔS and ΔC)."""
        xb, xs_, xc = (np.asarray(x, dtype=np.float64) for x in xs)
        mask = np.asarray(mask, dtype=bool)
        w = np.asarray(weight, dtype=np.float64)
        w_s = w + self.safety[name].delta()
        w_c = w_s + (self.candidate[name].delta() if name in self.candidate else 0.0)
        ks = xs_ @ w_s.T
        ds, dc = ks - xb @ w.T, xc @ w_c.T - ks
        self._accumulate(name, ds, dc, mask)

    def _accumulate(self, name: str, ds: np.ndarray, dc: np.ndarray, mask: np.ndarray) -> None:
        self.sums[name] += (float(np.sum(dc * ds)), float(np.sum(ds * ds)),
                            float(np.sum(dc[mask] * ds[mask])), float(np.sum(ds[mask] * ds[mask])))
        self._counting = self._counting or name
        if name == self._counting:
            self.rows += len(mask)
            self.concept_rows += int(mask.sum())

    def result(self) -> ConceptCheck:
        if not self.names:
            return ConceptCheck(False, None, None, [], self.rows, self.concept_rows,
                                "the safety adapter changes no cross-attention key/value projection "
                                f"({', '.join(s.lstrip('.') for s in self.kv)})")
        rows, total = [], np.zeros(4)
        for name in self.names:
            inner, energy, inner_c, energy_c = self.sums[name]
            total += self.sums[name]
            rows.append({"name": name, "reverted": -inner / energy if energy > 0 else 0.0,
                         "reverted_concept_tokens": -inner_c / energy_c if energy_c > 0 else None})
        return ConceptCheck(
            applicable=True,
            reverted=-total[0] / total[1] if total[1] > 0 else 0.0,
            reverted_concept_tokens=-total[2] / total[3] if total[3] > 0 else None,
            modules=rows, tokens=self.rows, concept_tokens=self.concept_rows,
        )


def kv_reversion(embeddings, concept_mask: np.ndarray, candidate: dict[str, LoraModule],
                 safety: dict[str, LoraModule], kv: tuple[str, ...] = KV) -> ConceptCheck:
    """The reverted fraction for the inputs of the text key/value projections (names ending in ``kv``).

    Args:
        embeddings: tokens × d, what every projection reads (a UNet's cross-attention: the prompts' hidden
            states), or module name -> tokens × d, each projection's own inputs.
        concept_mask: one flag per token row, True on the concept word's tokens.
    """
    mask = np.asarray(concept_mask, dtype=bool)
    sums = KVSums(candidate, safety, kv)
    for name in sums.names:
        sums.add(name, embeddings[name] if isinstance(embeddings, dict) else embeddings, mask)
    if not sums.names:
        sums.rows, sums.concept_rows = len(mask), int(mask.sum())
    return sums.result()


def word_ids(tokenizer, word: str) -> list[list[int]]:
    """The id sequences ``tokenizer`` may read ``word`` as inside a prompt: alone (the prompt's first word) and
    after a space. They differ for byte-level BPE tokenizers (GPT-2's, Qwen2's and Qwen3's: "cross" alone is one
    token, " cross" another, "Ġcross"); CLIP's and T5's give the same ids both ways."""
    if tokenizer is None:
        return []
    seqs = (tokenizer(text, add_special_tokens=False).input_ids for text in (word, " " + word))
    return [list(s) for s in dict.fromkeys(tuple(s) for s in seqs if s)]


def concept_mask(cond, concept_word: str):
    """batch × tokens flags of the concept word's tokens in a conditioning's sequence (each span searched
    with the ids its own tokenizer gives the word: :func:`word_ids`)."""
    spans = []
    for tokenizer, ids in cond.tokens:
        ids = np.asarray(ids)
        found = np.zeros(ids.shape, dtype=bool)
        for word in word_ids(tokenizer, concept_word):
            n = len(word)
            for i, row in enumerate(ids):
                for j in range(len(row) - n + 1):
                    if list(row[j: j + n]) == word:
                        found[i, j: j + n] = True
        spans.append(found)
    mask = np.concatenate(spans, axis=1)
    if mask.shape != tuple(cond.hidden.shape[:2]):
        raise ValueError(f"token spans cover {mask.shape[1]} positions; the conditioning has {cond.hidden.shape[1]}")
    return mask


def concept_reversion(pipe, prompts: list[str], concept_word: str, candidate: dict[str, LoraModule],
                      safety: dict[str, LoraModule], steps: int = 4, seed: int = 0, batch: int = 64,
                      encoders: tuple = ()) -> ConceptCheck:
    """The concept check on ``pipe``'s family: the inputs of its text key/value projections
    (:mod:`auditkit.models.denoising`; an MMDiT's text streams along ``steps`` points of the base model's
    own trajectory from seeded noise) folded into the sums as they are computed, ``batch`` prompts at a time.

    ``encoders``: (the candidate's, the safety module's) whole updates (modules or TensorDeltas); when either
    changes a text encoder of the pipeline, each model reads the prompts through its own encoders and the
    projections' outputs are compared densely (:meth:`KVSums.add_through_encoders`): a candidate that acts
    through the text encoder alone is seen too."""
    import torch

    from auditkit.models.attach import encoder_parts
    from auditkit.models.pipeline import denoiser_for, encode

    den = denoiser_for(pipe)
    sums = KVSums(candidate, safety, den.record.text_kv)
    paths = {n.split(".", 1)[1]: n for n in den.text_kv_modules(sums.names)}
    if sums.names and encoders and encoder_parts(pipe, *encoders, denoiser=den.component):
        return _through_encoders(pipe, den, prompts, concept_word, sums, paths, encoders, steps, seed, batch)
    generator = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        cond = encode(pipe, prompts[i: i + batch])
        mask = concept_mask(cond, concept_word).reshape(-1)
        if not sums.names:
            sums.rows, sums.concept_rows = sums.rows + len(mask), sums.concept_rows + int(mask.sum())
            continue

        def visit(path, x, mask=mask):
            sums.add(paths[path], x.float().cpu().numpy().reshape(-1, x.shape[-1]), mask)

        den.text_states(cond, list(paths), visit, steps, generator)
    return sums.result()


def _through_encoders(pipe, den, prompts, concept_word, sums: KVSums, paths: dict, encoders: tuple, steps: int,
                      seed: int, batch: int) -> ConceptCheck:
    """:func:`concept_reversion` when a text encoder changes: each prompt batch encoded by the base's, the safe
    model's and the candidate's own encoders, the projections' inputs of each gathered along the same seeded
    trajectory, compared densely with the base weights."""
    import torch

    from auditkit.models.attach import encoded_by_each, weight_of

    cand_all, safe_all = encoders
    weights = {}
    for path, name in paths.items():
        w = weight_of(den.model, name, den.component).detach()
        weights[path] = w.double().cpu().numpy().reshape(w.shape[0], -1)
    for i in range(0, len(prompts), batch):
        conds = encoded_by_each(pipe, prompts[i: i + batch], safe_all, cand_all, den.component)
        mask = concept_mask(conds[0], concept_word).reshape(-1)
        seen = []
        for cond in conds:
            got: dict[str, list] = {p: [] for p in paths}

            def visit(path, x, got=got):
                got[path].append(x.float().cpu().numpy().reshape(-1, x.shape[-1]))

            den.text_states(cond, list(paths), visit, steps, torch.Generator().manual_seed(seed + i))
            seen.append(got)
        for path, name in paths.items():
            for xs in zip(*(g[path] for g in seen), strict=True):
                sums.add_through_encoders(name, weights[path], xs, mask)
    return sums.result()
