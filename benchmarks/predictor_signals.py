"""The cheap predictors of re-emergence that ``benchmarks/predictors.py`` measures: no images, a few denoiser
evaluations. Each signal is the reverted fraction −⟨Δ_cand, Δ_safe⟩/‖Δ_safe‖² of the safety module's change to one
quantity (:data:`LABELS` names each in a line), or a zero-shot judgement of the base.

First attempt, along the safe model's trajectory: the conditional prediction ε_c on the conditional trajectory
(``cond``, the scan's signal) or the guided one (``cond_guided_path``), the guided prediction ε_u + g·(ε_c − ε_u)
(``guided``) and the guidance direction ε_c − ε_u (``direction``, ``_early`` / ``_late``: the first / second half
of the steps).

Second attempt, at the points of the safe model's guided trajectory on the concept prompts (one
:func:`reference` per safety module): ``weights`` (``_down`` / ``_mid`` / ``_up``): −Σ⟨ΔW_c X, ΔW_s X⟩/Σ‖ΔW_s X‖²
over the modules the safety update changes, X their inputs; ``concept_minus_neutral`` and ``dod`` (the reverted
fraction of the concept − neutral difference; ``dod_projected``: projected on the base's); ``block_*`` / ``dod_*``
per UNet block; ``endpoint`` / ``endpoint_vote``: each model's own final latent; ``base_judge`` /
``base_judge_ratio``: the base as a diffusion classifier of those final latents
(:mod:`auditkit.analysis.base_judge`, the library's formulas).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from auditkit.analysis.base_judge import LEVELS, relative_fraction, relative_mean

OLD_SIGNALS = ("cond", "cond_guided_path", "guided", "direction", "direction_early", "direction_late")
BLOCKS = ("down", "mid", "up")
GROUPS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}  # UNet module path head -> block
NEW_SIGNALS = ("weights", *(f"weights_{b}" for b in BLOCKS), "concept_minus_neutral", "dod", "dod_projected",
               *(f"block_{b}" for b in BLOCKS), *(f"dod_{b}" for b in BLOCKS), "endpoint", "endpoint_vote",
               "base_judge", "base_judge_ratio")
SIGNALS = OLD_SIGNALS + NEW_SIGNALS
LABELS = {
    "cond": "conditional ε, conditional trajectory (the scan's noise reversion)",
    "cond_guided_path": "conditional ε, guided trajectory",
    "guided": "guided ε (g = 5), guided trajectory",
    "direction": "guidance direction ε_c − ε_u, guided trajectory",
    "direction_early": "guidance direction, first half of the steps",
    "direction_late": "guidance direction, second half of the steps",
    "weights": "weights × concept-prompt activations, all shared modules",
    "weights_down": "weights × activations, down blocks",
    "weights_mid": "weights × activations, mid block",
    "weights_up": "weights × activations, up blocks",
    "concept_minus_neutral": "conditional ε reversion, concept prompts minus neutral prompts",
    "dod": "concept − neutral difference of ε (difference of differences), reverted fraction",
    "dod_projected": "concept − neutral difference of ε projected on the base's, (cand − safe)/(base − safe)",
    "block_down": "conditional block output reversion, down blocks",
    "block_mid": "conditional block output reversion, mid block",
    "block_up": "conditional block output reversion, up blocks",
    "dod_down": "difference of differences, down blocks' outputs",
    "dod_mid": "difference of differences, mid block's output",
    "dod_up": "difference of differences, up blocks' outputs",
    "endpoint": "final latent of each model's own guided trajectory, reverted fraction",
    "endpoint_vote": "final latents nearer the base's than the safe model's (fraction of samples)",
    "base_judge": "the base as a zero-shot judge of the final latents: mean score, (cand − safe)/(base − safe)",
    "base_judge_ratio": "the base as a zero-shot judge: latents judged concept, (cand − safe)/(base − safe)",
}
JUDGE_LEVELS = LEVELS  # noise levels (training timesteps) the base judges final latents at


def reversions(pipe, prompts, candidate, safety, steps: int, guidance: float, seed: int = 0) -> dict[str, float]:
    """Every signal of the module docstring for one candidate (adapters composed exactly)."""
    import torch

    from auditkit.models.attach import composed, encoded_by_each
    from auditkit.models.pipeline import denoiser_for

    den = denoiser_for(pipe)
    model, comp = den.model, den.component
    sampler = den.sampler(steps)
    # (text, neg) as each model reads them, through its own text encoders
    texts = dict(zip(("base", "safe", "cand"), zip(encoded_by_each(pipe, prompts, safety, candidate, comp),
                                                   encoded_by_each(pipe, [""] * len(prompts), safety, candidate, comp),
                                                   strict=True), strict=True))
    gen = torch.Generator().manual_seed(seed)
    x0 = den.noise(len(prompts), gen) * sampler.init_noise_sigma

    def run(path_guided: bool):
        """Points of the safe model's trajectory (guided or conditional) and (ε_c, ε_u) there per model."""
        x, points = x0.clone(), []
        text, neg = texts["safe"]
        with composed(model, (safety, 1.0), component=comp):
            for k, t in enumerate(sampler.timesteps):
                points.append((x, t))
                ec, eu = den.predict(x, t, text), den.predict(x, t, neg)
                eps = eu + guidance * (ec - eu) if path_guided else ec
                x = sampler.step(eps, k, x)
        out = {}
        for label, adapters in (("base", ()), ("safe", ((safety, 1.0),)), ("cand", ((safety, 1.0), (candidate, 1.0)))):
            tx, ng = texts[label]
            with composed(model, *adapters, component=comp):
                out[label] = [(den.predict(x, t, tx).double(), den.predict(x, t, ng).double()) for x, t in points]
        return out

    def frac(get, preds, ks):
        inner = energy = 0.0
        for k in ks:
            b, s, c = get(preds["base"][k]), get(preds["safe"][k]), get(preds["cand"][k])
            d_s, d_c = s - b, c - s
            inner += float((d_c * d_s).sum())
            energy += float((d_s * d_s).sum())
        return -inner / energy if energy > 0 else 0.0

    with torch.no_grad():
        cond_path, guided_path = run(False), run(True)
    all_k, half = range(steps), steps // 2

    def cond(p):
        return p[0]

    def guided(p):
        return p[1] + guidance * (p[0] - p[1])

    def direction(p):
        return p[0] - p[1]

    return {"cond": frac(cond, cond_path, all_k), "cond_guided_path": frac(cond, guided_path, all_k),
            "guided": frac(guided, guided_path, all_k), "direction": frac(direction, guided_path, all_k),
            "direction_early": frac(direction, guided_path, range(half)),
            "direction_late": frac(direction, guided_path, range(half, steps))}


# --- issue 15, second attempt: concept-specific, per-block and weight × activation signals ---------------

def block_of(path: str) -> str:
    """down / mid / up (or other) for a UNet module path."""
    return GROUPS.get(path.split(".", 1)[0], "other")


def dense(mods, model, component: str) -> dict:
    """Module path -> exact ΔW (float64 tensor shaped as the weight) of every Linear / Conv2d module an update
    changes (an adapter's modules, or a full model's weight differences; other tensors left out)."""
    import torch

    from auditkit.models.difference import TensorDeltas

    tensors, out = isinstance(mods, TensorDeltas), {}
    for name, m in mods.items():
        if not name.startswith(f"{component}."):
            continue
        path = name.removeprefix(f"{component}.")
        if tensors:
            path, _, param = path.rpartition(".")
            if param != "weight":
                continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            delta = np.asarray(m, dtype=np.float64) if tensors else m.delta()
            out[path] = torch.from_numpy(np.ascontiguousarray(delta)).reshape(module.weight.shape)
    return out


def output_change(module, delta, x):
    """ΔW applied to the module's input x (no bias): the change of its output a weight update makes."""
    import torch
    import torch.nn.functional as F

    if isinstance(module, torch.nn.Linear):
        return F.linear(x, delta)
    return F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)


class Probe:
    """The inputs every candidate is evaluated on: concept, neutral and empty conditionings (each prompt ``seeds``
    times), starting noise, the sampler; guided steps batch the unconditional and conditional passes."""

    def __init__(self, pipe, prompts: list[str], neutral: list[str], steps: int, guidance: float, seeds: int,
                 noise_seed: int = 0):
        import torch

        from auditkit.models.pipeline import denoiser_for

        self.den = denoiser_for(pipe)
        self.rows = [p for p in prompts for _ in range(seeds)]
        self.rows_n = [p for p in neutral for _ in range(seeds)]
        self.n, self.guidance = len(self.rows), guidance
        self.encode()
        self.sampler = self.den.sampler(steps)
        self.noise_seed = noise_seed
        self.x0 = self.den.noise(self.n, torch.Generator().manual_seed(noise_seed)) * self.sampler.init_noise_sigma

    def encode(self) -> None:
        """The conditionings, through the pipeline's text encoders as they are now (see :meth:`encoded_with`)."""
        from auditkit.models.conditioning import Conditioning
        from auditkit.models.pipeline import encode

        pipe = self.den.pipe
        self.concept, self.neutral = encode(pipe, self.rows), encode(pipe, self.rows_n)
        self.uncond = encode(pipe, [""] * len(self.rows))
        self.guided_cond = Conditioning.cat([self.uncond, self.concept])
        self.pair_cond = Conditioning.cat([self.concept, self.neutral])

    @contextlib.contextmanager
    def encoded_with(self, *adapters):
        """The conditionings as the model with ``adapters`` reads them (their text-encoder parts merged), for the
        duration; nothing to do for adapters without such parts."""
        from auditkit.models.attach import encoder_parts, encoders_composed

        if not encoder_parts(self.den.pipe, *(mods for mods, _ in adapters), denoiser=self.den.component):
            yield
            return
        with encoders_composed(self.den.pipe, *adapters, denoiser=self.den.component):
            self.encode()
        try:
            yield
        finally:
            self.encode()

    def trajectory(self, on_step=None):
        """The current model's own guided trajectory on the concept prompts: its points and its final latent."""
        import torch

        x, points = self.x0.clone(), []
        for k, t in enumerate(self.sampler.timesteps):
            points.append((x, t))
            if on_step:
                on_step(k)
            eu, ec = self.den.predict(torch.cat([x, x]), t, self.guided_cond).chunk(2)
            x = self.sampler.step(eu + self.guidance * (ec - eu), k, x)
        return points, x

    def at_points(self, points) -> dict:
        """The current model's conditional ε on the concept and the neutral prompts at ``points``, and its UNet
        blocks' outputs (down / mid / up) for both."""
        import torch

        model, seen = self.den.model, {}
        heads = [(f"down_blocks.{i}", m) for i, m in enumerate(model.down_blocks)] + [("mid_block", model.mid_block)]
        heads += [(f"up_blocks.{i}", m) for i, m in enumerate(model.up_blocks)]

        def keep(name):
            def hook(_m, _a, out):
                seen[name] = (out[0] if isinstance(out, tuple) else out).double()
            return hook

        hooks = [m.register_forward_hook(keep(name)) for name, m in heads]
        out = {"concept": [], "neutral": [], **{f"{g}_{b}": [] for g in ("concept", "neutral") for b in BLOCKS}}
        try:
            for x, t in points:
                ec, en = self.den.predict(torch.cat([x, x]), t, self.pair_cond).double().chunk(2)
                out["concept"].append(ec)
                out["neutral"].append(en)
                for name, _ in heads:
                    c, n = seen[name].chunk(2)
                    out[f"concept_{block_of(name)}"].append(c)
                    out[f"neutral_{block_of(name)}"].append(n)
        finally:
            for h in hooks:
                h.remove()
        return out


def judge(probe: Probe, z):
    """Per sample, how much better the current model (the base, when called so) denoises the final latent ``z``
    noised to JUDGE_LEVELS under its concept prompt than under its neutral prompt: Σ_t ‖ε − ε(z_t, neutral)‖² −
    ‖ε − ε(z_t, concept)‖² (a diffusion classifier; fixed noise): :func:`auditkit.analysis.base_judge.judge`."""
    import torch

    from auditkit.analysis.base_judge import judge as judged_by_base

    gen = torch.Generator().manual_seed(probe.noise_seed + 1)
    noise = torch.randn(z.shape, generator=gen).to(z.device, torch.float32)
    return judged_by_base(probe.den, z, probe.concept, probe.neutral, noise, JUDGE_LEVELS, batch=len(z))


def reverted(cand: list, safe: list, base: list) -> float:
    """−⟨Δ_cand, Δ_safe⟩/‖Δ_safe‖² over lists of tensors (Δ_cand = cand − safe, Δ_safe = safe − base)."""
    inner = sum(float(((c - s) * (s - b)).sum()) for c, s, b in zip(cand, safe, base, strict=True))
    energy = sum(float(((s - b) ** 2).sum()) for s, b in zip(safe, base, strict=True))
    return -inner / energy if energy > 0 else 0.0


def reference(probe: Probe, safety, activation_steps: int) -> dict:
    """Everything of the base and the safe model a candidate is compared with, once per safety module: the safe
    model's guided trajectory (points), both models' :meth:`Probe.at_points` there and their own trajectories'
    final latents, and for every Linear / Conv2d module the safety update changes, ΔW_s X with X its inputs
    recorded while the safe model denoises the concept prompts (conditional half, ``activation_steps`` steps)."""
    import torch

    from auditkit.models.attach import composed

    den = probe.den
    model, comp = den.model, den.component
    safe_dense = dense(safety, model, comp)
    steps = len(probe.sampler.timesteps)
    record_at = set(np.linspace(0, steps - 1, activation_steps).round().astype(int).tolist())
    recording, inputs = [False], {p: [] for p in safe_dense}

    def keep(path):
        def hook(_m, args, _out):
            if recording[0]:
                inputs[path].append(args[0][probe.n:].detach().double())  # the conditional half
        return hook

    with torch.no_grad():
        with composed(model, (safety, 1.0), component=comp):
            hooks = [model.get_submodule(p).register_forward_hook(keep(p)) for p in safe_dense]
            try:
                points, end_safe = probe.trajectory(lambda k: recording.__setitem__(0, k in record_at))
            finally:
                for h in hooks:
                    h.remove()
            safe = probe.at_points(points)
        base = probe.at_points(points)
        _, end_base = probe.trajectory()
        judged = {"safe": judge(probe, end_safe), "base": judge(probe, end_base)}
        acts = {}
        for path, xs in inputs.items():
            module = model.get_submodule(path)
            acts[path] = [(x, output_change(module, safe_dense[path], x)) for x in xs]
    return {"points": points, "safe": safe, "base": base, "end_safe": end_safe.double(), "end_base": end_base.double(),
            "acts": acts, "judged": judged}


def weight_signals(probe: Probe, ref: dict, candidate) -> dict[str, float]:
    """−Σ⟨ΔW_c X, ΔW_s X⟩ / Σ‖ΔW_s X‖² over the safety update's modules (all, and per block): the fraction of
    the safety update's output change on the concept prompts' activations that the candidate's weights cancel.
    A module the candidate leaves alone counts in the denominator only."""
    model = probe.den.model
    cand = dense(candidate, model, probe.den.component)
    inner = {g: 0.0 for g in (*BLOCKS, "other")}
    energy = dict(inner)
    for path, pairs in ref["acts"].items():
        g, module = block_of(path), model.get_submodule(path)
        for x, s in pairs:
            energy[g] += float((s * s).sum())
            if path in cand:
                inner[g] += float((output_change(module, cand[path], x) * s).sum())
    out = {"weights": -sum(inner.values()) / sum(energy.values()) if sum(energy.values()) > 0 else 0.0}
    for b in BLOCKS:
        out[f"weights_{b}"] = -inner[b] / energy[b] if energy[b] > 0 else 0.0
    return out


def pass_signals(probe: Probe, ref: dict, candidate, safety) -> dict[str, float]:
    """The signals of the candidate's own forward passes (safety and candidate composed): at the safe model's
    trajectory points, and its own trajectory's final latent."""
    import torch

    from auditkit.models.attach import composed

    den = probe.den
    with torch.no_grad(), composed(den.model, (safety, 1.0), (candidate, 1.0), component=den.component), \
            probe.encoded_with((safety, 1.0), (candidate, 1.0)):  # its own text encoders (text-encoder parts)
        cand = probe.at_points(ref["points"])
        _, end = probe.trajectory()
    with torch.no_grad():
        judged = judge(probe, end)
    end = end.double()
    safe, base = ref["safe"], ref["base"]

    def diff(preds, key=""):
        suffix = f"_{key}" if key else ""
        return [c - n for c, n in zip(preds[f"concept{suffix}"], preds[f"neutral{suffix}"], strict=True)]

    d_c, d_s, d_b = diff(cand), diff(safe), diff(base)
    proj = [sum(float((d * b).sum()) for d, b in zip(ds, d_b, strict=True)) for ds in (d_c, d_s, d_b)]
    out = {"concept_minus_neutral": reverted(cand["concept"], safe["concept"], base["concept"])
           - reverted(cand["neutral"], safe["neutral"], base["neutral"]),
           "dod": reverted(d_c, d_s, d_b),
           "dod_projected": (proj[0] - proj[1]) / (proj[2] - proj[1]) if proj[2] != proj[1] else 0.0}
    for b in BLOCKS:
        out[f"block_{b}"] = reverted(cand[f"concept_{b}"], safe[f"concept_{b}"], base[f"concept_{b}"])
        out[f"dod_{b}"] = reverted(diff(cand, b), diff(safe, b), diff(base, b))
    z_s, z_b = ref["end_safe"], ref["end_base"]
    out["endpoint"] = reverted([end], [z_s], [z_b])
    near_base = (end - z_b).flatten(1).norm(dim=1) < (end - z_s).flatten(1).norm(dim=1)
    out["endpoint_vote"] = float(near_base.double().mean())
    j_s, j_b = ref["judged"]["safe"], ref["judged"]["base"]
    out["base_judge"] = relative_mean(judged, j_s, j_b)  # the library's formulas (auditkit.analysis.base_judge)
    out["base_judge_ratio"] = relative_fraction(judged, j_s, j_b)
    return out


def load(path: Path, lab, erased=None):
    """Exact updates: an adapter's modules, or a full model's differences (a fine-tune's to the erased model)."""
    from auditkit.inputs import input_kind
    from auditkit.lora.adapter import read_adapter
    from auditkit.models.base import resolve_base
    from auditkit.models.difference import TensorDeltas, read_full_model

    if input_kind(path) == "adapter":
        return read_adapter(path, arch="lab").modules
    deltas = read_full_model(path, resolve_base("lab"), lab, energy=1.0).exact()
    if erased is None:
        return deltas
    return TensorDeltas({k: d for k, v in deltas.items() if (d := v - erased.get(k, 0)).any()})
