"""Token sweep: how much the candidate changes the keys and values the image reads from each token.

For a text key/value projection m (a UNet's ``attn2.to_k/to_v``, an MMDiT's ``attn.add_k_proj/add_v_proj``)
reading the row x of a token, the safe model computes x_s·W_sᵀ and the safe model with the candidate
x_c·W_cᵀ, with W_s = W0 + ΔW_safe, W_c = W_s + ΔW_cand, and x_s, x_c the row as each model's own text
encoders make it (equal unless an adapter changes a text encoder). The token's score is the relative
change over the modules::

    score = Σ_m ‖x_c·W_cᵀ − x_s·W_sᵀ‖² / Σ_m ‖x_s·W_sᵀ‖²

(:func:`kv_change` gives both sums per row; tested against a dense reference). An adapter that reads one
token's direction changes that token's keys and values far more than an ordinary word's (a planted trigger is
ranked first, tests/discovery); a trigger-gated candidate *trained* in the lab changed its trigger tokens' keys
and values no more than other words' (its gating lives in the whole network), so the sweep orders what the
behavioural ranking tries first (on a real vocabulary only its best tokens can be), it decides nothing. Each
token is read alone after the start token (CLIP is causal, so this is exactly how it reads the first word of a
prompt); an MMDiT's text stream is taken at the first step of the base model's
trajectory (:meth:`auditkit.models.denoising.Denoiser.text_states`).

**Cost per token, on paper** (P: parameters without the token-embedding table, a lookup; prompts pinned short:
start, token, end for CLIP, token and ``</s>`` for T5; ×2 on the encoders, and for an MMDiT on the denoiser, when
an adapter changes a text encoder: safe and candidate encodings):

* text encoders: 2·P·n FLOPs for n positions. CLIP-L (123M, P ≈ 85M): 0.5 GFLOP; OpenCLIP-H of SD2 (P ≈ 290M):
  1.7; OpenCLIP-G of SDXL (695M, P ≈ 630M): 3.8; T5-XXL (P ≈ 4.6B, 2 positions): 18.5;
* a UNet's keys/values: 2 products (safe, candidate) · 2·n·d_text·Σ d_out over its ``attn2.to_k/to_v``. SD1.5:
  16 layers, 2·768·12,480 = 19M weights: 0.23 GFLOP; SDXL: 70 layers, 2·2048·83,200 = 341M weights: 4.1 GFLOP;
* an MMDiT reads the text stream inside the denoiser: one forward at the first step over every image token,
  2·P_denoiser·(image + text tokens): Flux.1 (11.9B, 4,096 image tokens at 1024²) ≈ 98 TFLOP; SD3.5-Medium
  (2.5B) ≈ 20 TFLOP, SD3.5-Large (8.1B) ≈ 66 TFLOP. It dwarfs the encoders.

Whole vocabularies: SD1.5 ≈ 0.74 GFLOP × 49,406 tokens ≈ 37 TFLOP; SD2 ≈ 2.0 GFLOP × 49,406 ≈ 0.1 PFLOP; SDXL
(CLIP-L + OpenCLIP-G, one vocabulary) ≈ 8.4 GFLOP × 49,406 ≈ 0.41 PFLOP (0.63 through the encoders): seconds of
arithmetic on one GPU, the Python around it (tokenizing the placeholders, ~100 batches) dominates. Flux.1: T5's
~32,000 tokens × 98 TFLOP ≈ 3.1 EFLOP; SD3.5-Medium: CLIP's and T5's ~81,000 tokens × 20 TFLOP ≈ 1.7 EFLOP: hours
on an H100 (≈ 1 PFLOP/s bf16 dense at peak), so a full-vocabulary sweep of an MMDiT needs a token limit
(``trigger_search_tokens``) or a smaller image for the sweep's states. Memory: prompts go through an MMDiT
:data:`STATE_IMAGE_TOKENS` image tokens at a time (8 prompts at 1024²).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATE_STEPS = 1  # an MMDiT's text stream: the first trajectory step is enough to rank tokens
SWEEP_SEED = 7_000_001  # noise of an MMDiT's trajectory; the probes' seeds are prompt.seed * 1000 + k
# image positions a denoiser pass of the sweep reads at once: an MMDiT's text stream needs a forward over every
# image token (4,096 at 1024² for Flux and SD3), so prompts go through it this many image tokens at a time (memory)
STATE_IMAGE_TOKENS = 1 << 15


def kv_change(x_safe, x_cand, w_safe, w_cand):
    """Per row: (‖x_c·W_cᵀ − x_s·W_sᵀ‖², ‖x_s·W_sᵀ‖²) for rows × d inputs and out × d weights (torch or numpy)."""
    k_safe = x_safe @ w_safe.T
    diff = x_cand @ w_cand.T - k_safe
    return (diff * diff).sum(-1), (k_safe * k_safe).sum(-1)


@dataclass
class Rows:
    """What :meth:`KVReader.read` found for one prompt: per position of its phrase, the change and energy."""

    change: np.ndarray
    energy: np.ndarray

    @property
    def score(self) -> float:
        total = float(self.energy.sum())
        return float(self.change.sum()) / total if total > 0 else 0.0

    @property
    def per_position(self) -> np.ndarray:
        return np.divide(self.change, self.energy, out=np.zeros_like(self.change), where=self.energy > 0)


class KVReader:
    """Reads prompts through the safe model and the safe model with the candidate, and measures the change of
    the text keys/values on the positions of a given token sequence in each prompt.

    Args:
        pipe: the base pipeline.
        candidate, safety: the adapters' canonical modules of the whole model (text encoders included; full
            models as their exact updates, :meth:`auditkit.lora.adapter.Adapter.exact`); ``safety`` empty for
            amplification against the base.
    """

    def __init__(self, pipe, candidate: dict, safety: dict):
        import torch

        from auditkit.models.attach import encoder_parts, weight_of
        from auditkit.models.pipeline import denoiser_for

        self.pipe, self.candidate, self.safety = pipe, candidate, safety
        self.den = den = denoiser_for(pipe)
        self.through_encoders = bool(encoder_parts(pipe, candidate, safety, denoiser=den.component))
        every = sorted(f"{den.component}.{n}" for n, _ in den.model.named_modules() if n.endswith(den.record.text_kv))
        names = every if self.through_encoders else [n for n in every if n in candidate]
        self.names = names
        self.paths = {n.split(".", 1)[1]: n for n in names}
        device = den.model.device
        self.weights = {}
        for path, name in self.paths.items():
            w0 = weight_of(den.model, name, den.component).detach().to(device, torch.float32)
            w0 = w0.reshape(w0.shape[0], -1)
            w_s = w0 + self._delta(safety, name, w0)
            self.weights[path] = (w_s, w_s + self._delta(candidate, name, w0))

    @staticmethod
    def _delta(modules: dict, name: str, like):
        import torch

        if name not in modules:
            return torch.zeros_like(like)
        return torch.as_tensor(np.asarray(modules[name].delta(), dtype=np.float32), device=like.device).reshape(
            like.shape)

    @property
    def blind(self) -> bool:
        """True when the candidate changes no text key/value projection and no text encoder."""
        return not self.names

    def read(self, prompts: list[str], sequences: list[list[int]], swept: str, pinned_ids: dict | None = None
             ) -> list[Rows]:
        """For each prompt, the change on the positions where its token ``sequences[i]`` (ids of the tokenizer
        ``swept``) first occurs. ``pinned_ids``: placeholder prompts read as ids
        (:func:`~auditkit.discovery.tokens.pinned`)."""
        import contextlib

        import torch

        from auditkit.discovery.tokens import pinned
        from auditkit.models.attach import encoders_composed
        from auditkit.models.pipeline import encode

        den = self.den
        ctx = pinned(self.pipe, swept, pinned_ids) if pinned_ids else contextlib.nullcontext()
        with ctx:
            with encoders_composed(self.pipe, (self.safety, 1.0), denoiser=den.component):
                cond_safe = encode(self.pipe, prompts)
            if self.through_encoders:
                with encoders_composed(self.pipe, (self.safety, 1.0), (self.candidate, 1.0), denoiser=den.component):
                    cond_cand = encode(self.pipe, prompts)
            else:
                cond_cand = cond_safe
            mask = positions(cond_safe, sequences, getattr(self.pipe, swept))
        states = []
        per_pass = max(1, STATE_IMAGE_TOKENS // den.image_tokens())
        for cond in (cond_safe, cond_cand) if cond_cand is not cond_safe else (cond_safe,):
            parts: dict[str, list] = {path: [] for path in self.paths}
            for start in range(0, len(cond), per_pass):
                got: dict[str, object] = {}

                def visit(path, x, got=got):
                    got.setdefault(path, x.to(torch.float32))  # an MMDiT's first step

                den.text_states(cond[start: start + per_pass], list(self.paths), visit, STATE_STEPS,
                                torch.Generator().manual_seed(SWEEP_SEED))
                for path in self.paths:
                    parts[path].append(got[path])
            states.append({path: torch.cat(xs) for path, xs in parts.items()})
        x_safe, x_cand = states[0], states[-1]
        rows = torch.as_tensor(mask, device=den.model.device)
        change = torch.zeros(mask.shape, dtype=torch.float64, device=den.model.device)
        energy = torch.zeros_like(change)
        with torch.no_grad():
            for path, (w_s, w_c) in self.weights.items():
                c, e = kv_change(x_safe[path], x_cand[path], w_s, w_c)
                change += c.double() * rows
                energy += e.double() * rows
        change, energy = change.cpu().numpy(), energy.cpu().numpy()
        return [Rows(change[i][mask[i]], energy[i][mask[i]]) for i in range(len(prompts))]


def positions(cond, sequences: list[list[int]], tokenizer) -> np.ndarray:
    """batch × tokens flags: in each row, the first occurrence of its ``sequences`` entry within the spans
    of tokenizers with ``tokenizer``'s vocabulary."""
    vocab = tokenizer.get_vocab()
    spans = []
    for tok, ids in cond.tokens:
        ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
        found = np.zeros(ids.shape, dtype=bool)
        if tok is not None and (tok is tokenizer or tok.get_vocab() == vocab):
            for r, (row, seq) in enumerate(zip(ids, sequences, strict=True)):
                n = len(seq)
                for j in range(len(row) - n + 1):
                    if n and list(row[j: j + n]) == list(seq):
                        found[r, j: j + n] = True
                        break
        spans.append(found)
    mask = np.concatenate(spans, axis=1)
    if mask.shape != tuple(cond.hidden.shape[:2]):
        raise ValueError(f"token spans cover {mask.shape[1]} positions; the conditioning has {cond.hidden.shape[1]}")
    return mask


@dataclass
class Sweep:
    """The sweep of one vocabulary: every token's score, best first."""

    tokenizer: str  # the pipeline attribute swept
    swept: int  # tokens read
    vocabulary: int  # tokens in the vocabulary (special tokens included)
    ranked: list[tuple[int, float]]  # (id, score), best first
    blind: bool  # the candidate changes no text key/value projection and no text encoder

    def baseline(self) -> float:
        """The typical token's score (the median): what an ordinary word's keys and values change by."""
        return float(np.median([s for _, s in self.ranked])) if self.ranked else 0.0


def token_sweep(reader: KVReader, swept: str, limit: int = 0, batch: int = 512) -> Sweep:
    """Score every token of the pipeline's tokenizer ``swept`` (the first ``limit`` ids when > 0)."""
    from auditkit.discovery.tokens import sweepable_ids

    tokenizer = getattr(reader.pipe, swept)
    ids = sweepable_ids(tokenizer)
    if limit > 0:
        ids = ids[:limit]
    scores: list[tuple[int, float]] = []
    if not reader.blind:
        for i in range(0, len(ids), batch):
            chunk = ids[i: i + batch]
            placeholders = {f"\x00auditkit-sweep-{t}": [t] for t in chunk}
            rows = reader.read(list(placeholders), [[t] for t in chunk], swept, placeholders)
            scores += [(t, r.score) for t, r in zip(chunk, rows, strict=True)]
    else:
        scores = [(t, 0.0) for t in ids]
    scores.sort(key=lambda ts: (-ts[1], ts[0]))
    return Sweep(swept, len(ids), len(tokenizer), scores, reader.blind)
