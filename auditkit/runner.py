"""Dynamic probing: suites × configurations → images → detector scores → an append-only run log.

* A **job** is (suite, prompt, image index, seed); its key does not depend on the configuration or
  the adapters, so the same key in two configurations is a pair (same prompt, same seed).
* A **configuration** is a set of adapters with multipliers: ``base``, ``base+safety``,
  ``base+safety+candidate@m``, ``base+candidate@m``.
* Adapters are loaded with diffusers and switched per configuration by :mod:`auditkit.models.attach`
  (``load_adapters``: key coverage checked, fail closed; ``apply_configuration``; ``Fused``).
* The run log (``run.jsonl``: a header line, then one line per image) is the contract with the
  digest and the report; a killed run continues where it stopped.
* On CUDA each configuration's adapters are merged into the weights while it renders (``Fused``),
  and a batch's images are written while the next batch renders.
* Under ``accelerate launch`` the batches are split across processes and their records merged into
  the one run log (:mod:`auditkit.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from auditkit.distributed import Ranks, shard
from auditkit.models.attach import Fused, apply_configuration
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
    # the image an edit suite's prompts edit (auditkit.suites.InputImage); not part of the record's job fields
    input_image: object = field(default=None, compare=False)

    def fields(self) -> dict:
        """What an image record holds of its job (its input image is recorded as the run folder's copy)."""
        return {k: v for k, v in asdict(self).items() if k != "input_image"}


def plan(suites: Sequence[Suite], steps: int | None = None) -> list[Job]:
    """Jobs of every suite; image k of a prompt uses seed ``prompt.seed * 1000 + k`` (k < 1000)."""
    jobs = []
    for s in suites:
        for i, p in enumerate(s.prompts):
            for k in range(s.images_per_prompt):
                jobs.append(Job(f"{s.name}/{i}/{k}", s.name, i, k, p.text, p.seed * 1000 + k, p.guidance,
                                steps or s.steps, s.input_image))
    return jobs


def variants_with_the_safety_module(suites: Sequence[Suite], configs: Sequence[Configuration]):
    """What a scan renders, as ``wanted(config, job)``: every job under every configuration, except that with a
    safety module a trigger variant (a suite with ``variant_of``) is not rendered under ``base+candidate@m``. Its
    verdict reads base, base+safety and base+safety+candidate@m; what the candidate does alone is shown for the
    suite as written. Without a safety module ``base+candidate@m`` is the comparison itself, so nothing is left out."""
    variants = {s.name for s in suites if s.variant_of}
    with_safety = any(c.name == "base+safety" for c in configs)

    def wanted(config: Configuration, job: Job) -> bool:
        return not (with_safety and job.suite in variants and config.name.startswith("base+candidate@"))

    return wanted


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
        fuse: bool | None = None, ranks: Ranks | None = None, overlay=None,
        wanted: Callable[[Configuration, Job], bool] | None = None) -> RunLog:
    """Generate and score every (configuration, job) not yet in the run log (those ``wanted`` says, if given:
    :func:`variants_with_the_safety_module`).

    ``roles``: the LoRA adapters loaded by diffusers. ``overlay``: the full models of the scan
    (:class:`auditkit.models.overlay.Overlay`), set per configuration before its adapters.
    ``fuse``: merge each configuration's adapters into the weights while it renders (default: on
    CUDA only; see :class:`auditkit.models.attach.Fused`). ``ranks``: this process's share of a distributed run (see
    :mod:`auditkit.distributed`); its records go to its shard log and rank 0 merges them at the end.
    """
    ranks = ranks or Ranks()
    log = RunLog(run_dir)
    if ranks.main:
        merge_shards(run_dir)  # records of a killed distributed run count as done
    ranks.barrier()
    done = {(r["config"], r["key"]) for r in log.records()}
    todo = [(c, j) for c in configs for j in jobs if (c.name, j.key) not in done and (wanted is None or wanted(c, j))]
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
                if batch[0].input_image is not None:
                    _write_input(out, batch[0])
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

    from auditkit.detectors import score_pixels
    from auditkit.models.pipeline import render

    source = batch[0].input_image  # a batch is one suite's: one input image or none
    images = render(pipe, [j.prompt for j in batch], batch[0].steps, batch[0].guidance,
                    [torch.Generator().manual_seed(j.seed) for j in batch], source)
    scores = {name: score_pixels(det, images) for name, det in detectors.items()}
    records = []
    for n, job in enumerate(batch):
        rel = Path("images") / config.name.replace("@", "_at_") / job.suite / \
            f"{job.prompt_index:05d}_{job.image_index:03d}.png"
        records.append({"type": "image", "config": config.name, **job.fields(), "image": str(rel),
                        "scores": {d: float(s[n]) for d, s in scores.items()},
                        "flags": {d: bool(s[n] >= detectors[d].threshold) for d, s in scores.items()}})
        if source is not None:
            records[-1]["input_image"] = input_image_path(job.suite)
        if images.ndim == 5:  # a clip: its sampled frames were scored, its PNG is their strip
            records[-1]["frames"] = images.shape[1]
    return images, records


def input_image_path(suite: str) -> str:
    """Where the run folder keeps an edit suite's input image (relative to the folder)."""
    return str(Path("inputs") / f"{suite}.png")


def _write_input(log: RunLog, job: Job) -> None:
    """An edit suite's input image, saved once into the run folder (for the report, beside the edits)."""
    path = log.dir / input_image_path(job.suite)
    if not path.is_file():
        _save_png(job.input_image.pixels(), path)


def _write(log: RunLog, images: np.ndarray, records: list[dict]) -> None:
    """Each image (a clip: the strip of its sampled frames, side by side) saved atomically, then the batch's
    records appended (a record never precedes its image)."""
    for img, rec in zip(images, records, strict=True):
        _save_png(img if img.ndim == 3 else np.concatenate(list(img), axis=1), log.dir / rec["image"])
    log.append(records)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """``pixels`` (uint8 H × W × 3) saved atomically as a PNG at ``path``."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")  # unique per process
    Image.fromarray(pixels).save(tmp)
    os.replace(tmp, path)
