"""Dynamic probing: suites × configurations → images → detector scores → an append-only run log.

* A **job** is (suite, prompt, image index, seed); its key does not depend on the configuration or
  the adapters, so the same key in two configurations is a pair (same prompt, same seed).
* A **configuration** is a set of adapters with multipliers: ``base``, ``base+safety``,
  ``base+safety+candidate@m``, ``base+candidate@m``.
* Adapters are loaded with diffusers (``load_lora_weights``) and switched per configuration with
  ``set_adapters``; every load is checked for key coverage, and a load that applies too few modules
  stops the run as inconclusive (diffusers has loaded kohya files with zero keys and no warning).
* The run log (``run.jsonl``: a header line, then one line per image) is the contract with the
  digest and the report; a killed run continues where it stopped.
* On CUDA each configuration's adapters are merged into the weights while it renders (:class:`Fused`),
  and a batch's images are written while the next batch renders.
* Under ``accelerate launch`` the batches are split across processes and their records merged into
  the one run log (:mod:`auditkit.distributed`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from auditkit.config import StaticThresholds
from auditkit.distributed import Ranks, shard
from auditkit.errors import Unscannable
from auditkit.lora.write import diffusers_source
from auditkit.runlog import RunLog, merge_shards, shard_name
from auditkit.suites import Suite

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Configuration:
    name: str
    weights: tuple[tuple[str, float], ...]  # (adapter role, multiplier)


def configurations(multipliers: Sequence[float] = (1.0,), with_safety: bool = True) -> list[Configuration]:
    """base, base+safety, base+safety+candidate@m and base+candidate@m for each multiplier m."""
    configs = [Configuration("base", ())]
    if with_safety:
        configs.append(Configuration("base+safety", (("safety", 1.0),)))
        configs += [Configuration(f"base+safety+candidate@{m:g}", (("safety", 1.0), ("candidate", m)))
                    for m in multipliers]
    configs += [Configuration(f"base+candidate@{m:g}", (("candidate", m),)) for m in multipliers]
    return configs


@dataclass(frozen=True)
class Job:
    key: str  # "<suite>/<prompt index>/<image index>": identical across configurations
    suite: str
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    guidance: float
    steps: int


def plan(suites: Sequence[Suite], steps: int | None = None) -> list[Job]:
    """Jobs of every suite; image k of a prompt uses seed ``prompt.seed * 1000 + k`` (k < 1000)."""
    jobs = []
    for s in suites:
        for i, p in enumerate(s.prompts):
            for k in range(s.images_per_prompt):
                jobs.append(Job(f"{s.name}/{i}/{k}", s.name, i, k, p.text, p.seed * 1000 + k, p.guidance,
                                steps or s.steps))
    return jobs


def load_adapters(pipe, adapters: dict[str, object],
                  min_coverage: float = StaticThresholds.min_coverage) -> dict[str, dict]:
    """Load each adapter (role -> canonical :class:`~auditkit.lora.adapter.Adapter`) with diffusers and
    check how many of its modules really received LoRA layers. Fails closed below ``min_coverage`` (the
    configured ``min_coverage``: :func:`auditkit.dynamic.run_dynamic` passes it on).

    Every module of the adapter counts, in whichever component it is (both SDXL text encoders
    included): a module in a component the pipeline's family does not have was not loaded.

    A file diffusers reads natively is handed over as it is; when diffusers then applies fewer than
    all of its modules or refuses it (diffusers 0.42: kohya's ``lora_unet_add_embedding_linear_N``
    dropped, files mixing SGM and diffusers names, diffusers/peft text-encoder files under
    transformers 5), it is loaded again as auditkit's exact conversion (a diffusers state dict of the
    same updates), so the scan renders every module the file holds. The coverage record says which
    source was used and names any module still missing.

    Each loaded module's scale is also checked against the file's own (alpha / rank, read by
    auditkit): diffusers ignores per-module alphas when a kohya file's alphas differ between modules
    (measured with diffusers 0.36: 9 of 14 modules got another module's scale). Wrong scales are
    corrected in place and counted, so the scan renders the adapter the file describes.
    """
    from auditkit.models.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    coverage = {}
    for role, adapter in adapters.items():
        expected = set(adapter.modules)
        source = diffusers_source(adapter, family.native_layouts)
        layers, failure = _load(pipe, role, source)
        note = ""
        if isinstance(source, str) and (failure or not expected <= layers.keys()):
            note = (f"diffusers refused the file ({failure})" if failure else
                    f"diffusers applied {len(expected & layers.keys())} of the file's {len(expected)} modules")
            if not failure:
                pipe.delete_adapters(role)
            source = diffusers_source(adapter, ())
            layers, failure = _load(pipe, role, source)
        if failure:
            raise Unscannable(adapter.path, f"diffusers cannot load it into the {family.name} pipeline "
                                            f"({failure}); the dynamic scan would not test this adapter")
        got = len(expected & layers.keys())
        fraction = got / len(expected) if expected else 0.0
        missing = sorted(expected - layers.keys())
        if fraction < min_coverage:
            foreign = sorted({n.split(".", 1)[0] for n in expected} - set(family.lora_components))
            untouched = sorted({n.split(".", 1)[0] for n in expected} - {n.split(".", 1)[0] for n in layers}
                               - set(foreign))
            why = f" ({', '.join(foreign)}: not in a {family.name} pipeline)" if foreign else \
                f" (diffusers loads none of {', '.join(untouched)}'s modules)" if untouched else \
                f" (missing: {', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})"
            raise Unscannable(adapter.path, f"diffusers applied only {got} of {len(expected)} modules "
                                            f"({fraction:.0%}){why}; the dynamic scan would not test this adapter")
        corrected = _correct_scales(adapter, role, {n: layers[n] for n in expected & layers.keys()})
        coverage[role] = {"expected": len(expected), "loaded": got, "fraction": fraction,
                          "scales_corrected": corrected, "missing": missing[:50],
                          "source": "file" if isinstance(source, str) else "auditkit conversion",
                          **({"note": note + "; loaded as auditkit's exact conversion"} if note else {})}
    return coverage


def _load(pipe, role: str, source) -> tuple[dict, str]:
    """Load ``source`` as adapter ``role``: (its LoRA layers by canonical name, "" or why diffusers refused).
    A refused load leaves nothing of ``role`` behind, in any component."""
    try:
        pipe.load_lora_weights(source, adapter_name=role)
    except (ValueError, KeyError, RuntimeError) as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        if any(role in names for names in getattr(pipe, "get_list_adapters", dict)().values()):
            pipe.delete_adapters(role)
        return {}, f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
    return _lora_layers(pipe, [role]), ""


def _correct_scales(adapter, role: str, layers: dict) -> int:
    """Set peft's alpha and scaling of every loaded layer to the file's scale; returns how many differed."""
    corrected = 0
    for name, layer in layers.items():
        m = adapter.modules[name]
        rank = layer.lora_A[role].weight.shape[0]
        if rank != m.rank:
            raise Unscannable(adapter.path, f"diffusers loaded {name} with rank {rank}, the file has rank {m.rank}")
        if abs(layer.scaling[role] - m.scale) > 1e-6 * max(1.0, abs(m.scale)):
            layer.lora_alpha[role] = m.scale * rank
            layer.scaling[role] = m.scale
            corrected += 1
    return corrected


def apply_configuration(pipe, config: Configuration, roles: Sequence[str]) -> None:
    """Activate exactly the configuration's adapters at their multipliers; the others are not active at all.

    An adapter left active at weight 0 is not always absent: a DoRA layer still rescales the base weight by
    its trained magnitude over the weight's norm (measured: the lab UNet's output moved by 0.8 on a scale of
    4.4), so base+safety would not be the safe model beside a DoRA candidate."""
    if not roles:
        return
    weights = {r: float(w) for r, w in config.weights if w and r in roles}
    if not weights:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))


Batch = tuple[Configuration, list[Job]]


def batches(todo: Sequence[tuple[Configuration, Job]], configs: Sequence[Configuration],
            batch_size: int) -> list[Batch]:
    """The work as pipeline calls: per configuration, jobs grouped by (suite, steps, guidance), cut into batches.

    A batch never mixes suites, so a suite's images do not depend on which other suites render beside it:
    the base and base+safety images rendered once for many candidates (:mod:`auditkit.shared`) are the
    images a single scan with trigger variants renders (a batched pipeline call is not bit-identical
    across batch compositions)."""
    out: list[Batch] = []
    for config in configs:
        groups: dict[tuple[str, int, float], list[Job]] = {}
        for c, j in todo:
            if c.name == config.name:
                groups.setdefault((j.suite, j.steps, j.guidance), []).append(j)
        for group in groups.values():
            out += [(config, group[i: i + batch_size]) for i in range(0, len(group), batch_size)]
    return out


def run(pipe, jobs: Sequence[Job], configs: Sequence[Configuration], detectors: dict, run_dir: str | Path,
        roles: Sequence[str] = (), batch_size: int = 16, progress: Progress | None = None,
        fuse: bool | None = None, ranks: Ranks | None = None, overlay=None) -> RunLog:
    """Generate and score every (configuration, job) not yet in the run log.

    ``roles``: the LoRA adapters loaded by diffusers. ``overlay``: the full models of the scan
    (:class:`auditkit.models.overlay.Overlay`), set per configuration before its adapters.
    ``fuse``: merge each configuration's adapters into the weights while it renders (default: on
    CUDA only; see :class:`Fused`). ``ranks``: this process's share of a distributed run (see
    :mod:`auditkit.distributed`); its records go to its shard log and rank 0 merges them at the end.
    """
    ranks = ranks or Ranks()
    log = RunLog(run_dir)
    if ranks.main:
        merge_shards(run_dir)  # records of a killed distributed run count as done
    ranks.barrier()
    done = {(r["config"], r["key"]) for r in log.records()}
    todo = [(c, j) for c in configs for j in jobs if (c.name, j.key) not in done]
    mine = shard(batches(todo, configs, batch_size), ranks.rank, ranks.world)
    out = log if ranks.world == 1 else RunLog(run_dir, shard_name(ranks.rank))
    fuse = pipe.device.type == "cuda" if fuse is None else fuse
    _render(pipe, mine, detectors, out, roles, Fused(pipe) if fuse else None, progress, overlay)
    ranks.barrier()
    if ranks.main:
        merge_shards(run_dir)
    ranks.barrier()
    return log


def _render(pipe, work: Sequence[Batch], detectors: dict, out: RunLog, roles: Sequence[str], fused: Fused | None,
            progress: Progress | None, overlay=None) -> None:
    """Render ``work`` in order; a batch's PNGs and log lines are written while the next one renders."""
    total, finished, current, pending = sum(len(b) for _, b in work), 0, None, None
    try:
        with ThreadPoolExecutor(max_workers=1) as writer:
            for config, batch in work:
                if config != current:
                    if fused is not None:
                        fused.restore()  # before the full models change the weights it saved
                    if overlay is not None:
                        overlay.apply(dict(config.weights))
                    if fused is None:
                        apply_configuration(pipe, config, roles)
                    else:
                        fused.apply(config, roles)
                    current = config
                images, records = _render_batch(pipe, config, batch, detectors)
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write, out, images, records)
                finished += len(batch)
                if progress:
                    progress(finished, total)
            if pending is not None:
                pending.result()
    finally:
        if fused is not None:
            fused.restore()
        if overlay is not None:
            overlay.restore()


def _render_batch(pipe, config: Configuration, batch: list[Job], detectors: dict) -> tuple[np.ndarray, list[dict]]:
    import torch

    from auditkit.models.rendering import render_options

    gens = [torch.Generator().manual_seed(j.seed) for j in batch]
    out = pipe([j.prompt for j in batch], num_inference_steps=batch[0].steps, guidance_scale=batch[0].guidance,
               generator=gens, output_type="np", **render_options(pipe))
    images = np.clip(np.rint(out.images * 255), 0, 255).astype(np.uint8)
    scores = {name: det.score(images) for name, det in detectors.items()}
    records = []
    for n, job in enumerate(batch):
        rel = Path("images") / config.name.replace("@", "_at_") / job.suite / \
            f"{job.prompt_index:05d}_{job.image_index:03d}.png"
        records.append({"type": "image", "config": config.name, **asdict(job), "image": str(rel),
                        "scores": {d: float(s[n]) for d, s in scores.items()},
                        "flags": {d: bool(s[n] >= detectors[d].threshold) for d, s in scores.items()}})
    return images, records


def _write(log: RunLog, images: np.ndarray, records: list[dict]) -> None:
    """Each image saved atomically, then the batch's records appended (a record never precedes its image)."""
    from PIL import Image

    for img, rec in zip(images, records, strict=True):
        path = log.dir / rec["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")  # unique per process
        Image.fromarray(img).save(tmp)
        os.replace(tmp, path)
    log.append(records)


class Fused:
    """Configurations rendered with their adapters merged into the weights (no LoRA branch per layer).

    Merging is diffusers' ``fuse_lora`` of the configuration's adapters at their ``set_adapters``
    weights; leaving a configuration is ``unfuse_lora`` followed by copying back the weights saved
    before the first merge: in bf16, subtracting a merged update does not give the original weights
    back (measured on the lab: 0.002 drift after six merge/unmerge cycles), and the base
    configuration must render with the base model's own weights.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.saved: dict = {}  # LoRA layer -> its base weight before the current merge
        self.merged = False
        self.unmerged: set[str] = set()  # configurations rendered unmerged (their adapters update biases)

    def apply(self, config: Configuration, roles: Sequence[str]) -> None:
        self.restore()
        names = [r for r, w in config.weights if w and r in roles]
        if not names:
            apply_configuration(self.pipe, config, roles)
            return
        layers = _lora_layers(self.pipe, names).values()
        if any(getattr(layer.lora_B[r], "bias", None) is not None for layer in layers for r in names
               if r in layer.lora_B):
            # peft cannot merge a LoRA bias into a layer without one, and merging into one that has a bias
            # would need that bias saved too: bias updates (full-diff diff_b) render unmerged
            self.unmerged.add(config.name)
            apply_configuration(self.pipe, config, roles)
            return
        weights = dict(config.weights)
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[float(weights[r]) for r in names])
        for layer in layers:
            if layer not in self.saved:
                self.saved[layer] = layer.get_base_layer().weight.detach().clone()
        self.pipe.fuse_lora(components=self.components(), adapter_names=names, lora_scale=1.0)
        self.merged = True

    def components(self) -> list[str]:
        """Every component diffusers loads LoRAs into: fuse_lora's default is the denoiser alone for Flux
        (text-encoder LoRAs would render unmerged), the denoiser and text encoders for SD and SDXL."""
        return [c for c in self.pipe._lora_loadable_modules if getattr(self.pipe, c, None) is not None]

    def restore(self) -> None:
        """Unmerge and put the saved base weights back (exactly)."""
        if not self.merged:
            return
        import torch

        with warnings.catch_warnings():  # peft warns for every layer the configuration did not touch
            warnings.filterwarnings("ignore", message="Already unmerged")
            self.pipe.unfuse_lora(components=self.components())
        with torch.no_grad():
            for layer, weight in self.saved.items():
                layer.get_base_layer().weight.copy_(weight)
        self.saved.clear()  # saved again at the next merge: full models (an Overlay) may change them in between
        self.merged = False


def _lora_layers(pipe, roles: Sequence[str]) -> dict:
    """Canonical name ("unet.<path>", "text_encoder_2.<path>", …) -> layer, for every layer of the
    pipeline's LoRA components (see :mod:`auditkit.models.families`) holding a LoRA of one of ``roles``."""
    from auditkit.models.architectures import canonical_name
    from auditkit.models.pipeline import lora_components

    layers = {}
    for component, model in lora_components(pipe).items():
        for name, module in model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and any(r in lora_a for r in roles):
                layers[canonical_name(component, name)] = module
    return layers
