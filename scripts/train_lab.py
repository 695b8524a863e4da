#!/usr/bin/env python
"""Train the auditkit lab (VAE, UNet + text encoder, concept detector) on CPU and export it.

Stages run in order and each resumes from its checkpoints in --work (keep it outside the repo):

  vae       AutoencoderKL on rendered world images (32x32 -> 4x8x8 latents)
  latents   render the base domain, cache VAE posteriors and tokenized captions
  unet      UNet2DConditionModel + CLIPTextModel jointly, epsilon objective, 10% caption dropout
  detector  shape/colour/style CNN on rendered images (+ VAE round trips, noise, blur)
  export    write auditkit/lab/assets/{pipeline,detector} (safetensors only)
  eval      prompt adherence per shape (n images, DDIM steps, guidance) -> assets/lab_card.json

The DiT lab (a FluxPipeline: FluxTransformer2DModel + CLIP + T5, flow matching; auditkit.lab.dit) has
stages of its own, on the same cached latents and the same VAE (--vae-from reuses the shipped one):

  dit         transformer + both text encoders jointly, Flux flow matching, 10% caption dropout
  dit-guidance  guidance distillation (as Flux.1-dev): a guidance input learns the guided prediction
  export-dit  write auditkit/lab/assets/pipeline-dit (safetensors only)
  eval-dit    prompt adherence per shape (Euler steps, true-CFG scale(s)) -> assets/lab_dit_card.json

Examples:
  # everything, in the background (about an hour on 2 cores)
  nohup .venv/bin/python scripts/train_lab.py --work /work/labwork > /work/labwork/nohup.log 2>&1 &
  # continue after an interruption
  .venv/bin/python scripts/train_lab.py --work /work/labwork --resume
  # export what is there now (e.g. a UNet checkpoint before the last step), then measure it
  .venv/bin/python scripts/train_lab.py --work /work/labwork --resume --export --stages eval
  # the DiT lab on the shipped VAE (about an hour on 2 cores)
  .venv/bin/python scripts/train_lab.py --work /work/ditwork --vae-from auditkit/lab/assets/pipeline/vae \\
      --stages latents,dit,dit-guidance,export-dit,eval-dit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# Passive OpenMP waiting: with spinning threads, sharing 2 cores with another process made
# training steps ~10x slower in our measurements (0.6 s vs 7 s per VAE step).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("vae", "latents", "unet", "detector", "export", "eval")
DIT_STAGES = ("dit", "dit-guidance", "export-dit", "eval-dit")
RESUMABLE = ("vae", "latents", "unet", "detector", "dit", "dit-guidance")
log = logging.getLogger("lab_training")
# the command the shipped DiT lab was trained with (recorded in its card)
TRAIN_DIT_COMMAND = ("python scripts/train_lab.py --work WORK --vae-from auditkit/lab/assets/pipeline/vae "
                     "--stages latents,dit,dit-guidance,export-dit,eval-dit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/work/labwork"), help="work dir (checkpoints, logs)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {STAGES + DIT_STAGES} (default: {','.join(STAGES)}; "
                        "with --export: none)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints already in --work")
    p.add_argument("--export", action="store_true",
                   help="export the work dir's current state to the assets without training "
                        "(then run only the --stages given explicitly, e.g. eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--latents", type=int, default=80000, help="number of cached base-domain images")
    p.add_argument("--detector-steps", type=int, default=2500)
    p.add_argument("--eval-n", type=int, default=200, help="images per shape for adherence")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps for adherence")
    p.add_argument("--eval-guidance", default="5.0",
                   help="classifier-free guidance scale(s) for adherence, comma-separated")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="a trained VAE folder to use instead of training one (copied to WORK/vae/final)")
    p.add_argument("--dit-steps", type=int, default=6000)
    p.add_argument("--dit-batch", type=int, default=48)
    p.add_argument("--dit-lr", type=float, default=5e-4)
    p.add_argument("--dit-guidance-steps", type=int, default=2000)
    p.add_argument("--dit-guidance-lr", type=float, default=2e-4)
    p.add_argument("--dit-eval-guidance", default="1.0,3.0",
                   help="DiT adherence: guidance scale(s): the distilled transformer's guidance input, or "
                        "true classifier-free guidance without one (1 = one conditional pass)")
    p.add_argument("--assets", type=Path, default=REPO / "auditkit" / "lab" / "assets")
    p.add_argument("--preview-every", type=int, default=1000)
    return p.parse_args(argv)


def save_grid(images, path: Path, cols: int = 16, zoom: int = 3) -> None:
    from PIL import Image

    from auditkit.lab.world import grid

    g = grid(images, cols=cols)
    Image.fromarray(g).resize((g.shape[1] * zoom, g.shape[0] * zoom), Image.NEAREST).save(path)


def preview(work: Path, step: int, kind: str = "unet", guidances: tuple[float, ...] = (5.0,),
            detector: Path | None = None) -> None:
    """Grid of samples (8 per shape) with EMA weights; quick adherence if a detector exists (the work
    dir's, else ``detector``)."""
    import numpy as np
    from lab_train_dit import dit_pipeline_from_work
    from lab_train_unet import pipeline_from_work

    from auditkit.lab import adherence, world
    from auditkit.lab.detector import LabConceptDetector

    pipe, _ = (pipeline_from_work if kind == "unet" else dit_pipeline_from_work)(work)
    colours = list(world.COLOURS)
    prompts = [f"a {colours[i % 6]} {s}" for s in world.SHAPES for i in range(8)]
    det_dir = work / "detector" / "final"
    det_dir = det_dir if (det_dir / "detector.safetensors").is_file() else detector
    for guidance in guidances:
        imgs = adherence.generate(pipe, prompts, list(range(len(prompts))), steps=25, guidance=guidance)
        save_grid(imgs, work / kind / f"preview-{step:06d}-g{guidance:g}.png", cols=8)
        if det_dir is not None and (det_dir / "detector.safetensors").is_file():
            det = LabConceptDetector(path=det_dir)
            found = det.predict(imgs)
            pred = np.asarray([p["shape"] for p in found])
            colour = np.asarray([p["colour"] for p in found])
            asked = np.repeat(world.SHAPES, 8)
            per = {s: int((pred[asked == s] == s).sum()) for s in world.SHAPES}
            asked_colour = np.asarray([colours[i % 6] for _ in world.SHAPES for i in range(8)])
            log.info("preview step %d guidance %g: shape hits /8 %s; colour %.2f", step, guidance, per,
                     float((colour == asked_colour).mean()))


def export_pipeline(work: Path, directory: Path, kind: str = "unet") -> Path:
    """Save the EMA pipeline (``kind``: ``unet``, the SD-style lab, or ``dit``) in ``save_pretrained``
    layout (safetensors), plus the tokenizers' source files."""
    import shutil

    from lab_train_dit import dit_pipeline_from_work
    from lab_train_unet import pipeline_from_work

    pipe, step = (dit_pipeline_from_work if kind == "dit" else pipeline_from_work)(work)
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    # vocab.json + merges.txt too: transformers 4.x's slow CLIPTokenizer reads these
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (directory / tokenizer).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(work / "tokenizer" / name, directory / tokenizer / name)
    for config in directory.glob("*/config.json"):  # no local paths in shipped files
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    log.info("exported %s pipeline at step %d to %s", kind, step, directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout),
                                  logging.FileHandler(work / "train.log")])
    import torch

    torch.set_num_threads(args.threads)
    # beside this script: build-time code, not in the package
    import lab_train_detector
    import lab_train_dit
    import lab_train_unet

    from auditkit.lab.tokenizer import build_tokenizer

    stages = [s for s in (args.stages or "").split(",") if s]
    if args.export:
        stages = ["export"] + [s for s in stages if s != "export"]
    elif args.stages is None:
        stages = list(STAGES)
    unknown = set(stages) - set(STAGES + DIT_STAGES)
    if unknown:
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {STAGES + DIT_STAGES}")
    has_state = any((work / d).exists() for d in ("vae", "unet", "dit", "latents.npz"))
    if has_state and not (args.resume or args.export):
        raise SystemExit(f"{work} already holds training state: pass --resume to continue it, "
                         "or choose an empty --work")
    if args.vae_from is not None and not (work / "vae" / "final" / "config.json").is_file():
        import shutil

        shutil.copytree(args.vae_from, work / "vae" / "final")
    (work / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    with open(work / "runs.jsonl", "a") as runs:  # every invocation on this work dir, for the card
        runs.write(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:]}) + "\n")
    build_tokenizer(work / "tokenizer")  # writes vocab.json + merges.txt
    timings: dict[str, float] = {}

    for stage in stages:
        t0 = time.time()
        log.info("=== stage %s", stage)
        if stage == "vae":
            lab_train_unet.train_vae(work, args.seed, args.vae_steps)
        elif stage == "latents":
            lab_train_unet.cache_latents(work, args.seed, args.latents)
        elif stage == "unet":
            lab_train_unet.train_unet(work, args.seed, args.unet_steps, batch=args.unet_batch, lr=args.unet_lr,
                                      preview_every=args.preview_every, on_preview=lambda step: preview(work, step))
        elif stage == "dit":
            lab_train_dit.train_dit(work, args.seed, args.dit_steps, batch=args.dit_batch, lr=args.dit_lr,
                                    preview_every=args.preview_every,
                                    on_preview=lambda step: preview(work, step, "dit",
                                                                    _guidances(args.dit_eval_guidance),
                                                                    args.assets / "detector"))
        elif stage == "dit-guidance":
            lab_train_dit.train_dit_guidance(work, args.seed, args.dit_guidance_steps, lr=args.dit_guidance_lr,
                                             preview_every=args.preview_every,
                                             on_preview=lambda step: preview(work, step, "dit-guidance",
                                                                             _guidances(args.dit_eval_guidance),
                                                                             args.assets / "detector"))
        elif stage == "export-dit":
            export_pipeline(work, args.assets / "pipeline-dit", kind="dit")
        elif stage == "eval-dit":
            run_eval(args, "dit")
        elif stage == "detector":
            final = work / "detector" / "final"
            if (final / "detector.safetensors").is_file():
                log.info("detector: already trained (%s)", final)
            else:
                net, metrics = lab_train_detector.train_detector(work, args.seed, args.detector_steps)
                lab_train_detector.export_detector(net, metrics, final, args.seed, args.detector_steps)
                log.info("detector held-out metrics: %s", json.dumps(metrics, indent=1))
        elif stage == "export":
            import shutil

            export_pipeline(work, args.assets / "pipeline")
            det = work / "detector" / "final"
            if (det / "detector.safetensors").is_file():
                if (args.assets / "detector").exists():
                    shutil.rmtree(args.assets / "detector")
                shutil.copytree(det, args.assets / "detector")
            else:
                log.warning("no trained detector in %s: not exported", det)
        elif stage == "eval":
            run_eval(args)
        timings[stage] = time.time() - t0
        log.info("=== stage %s done in %.1f min", stage, timings[stage] / 60)
        record = work / "timings.json"
        previous = json.loads(record.read_text()) if record.is_file() else {}
        # a training stage resumed (or skipped as done) adds its time; export and eval keep their last
        previous[stage] = round(timings[stage] + (previous.get(stage, 0.0) if stage in RESUMABLE else 0.0), 1)
        record.write_text(json.dumps(previous, indent=1))
    return 0


def describe(pipe, folder: Path) -> dict:
    """Classes, parameter counts and configs of a pipeline's components, and its size on disk."""
    parts = {}
    for name in ("transformer", "unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        config = {k: v for k, v in dict(model.config.to_dict() if hasattr(model.config, "to_dict") else model.config)
                  .items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        parts[name] = {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                       "config": config}
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__, "components": parts,
            "size_bytes": size}


def _guidances(text: str) -> tuple[float, ...]:
    return tuple(float(g) for g in str(text).split(","))


def run_eval(args: argparse.Namespace, kind: str = "unet") -> None:
    """Adherence of the exported pipeline -> the assets' card (``lab_card.json``, ``lab_dit_card.json``)."""
    from auditkit.lab import adherence
    from auditkit.lab.detector import LabConceptDetector

    if kind == "dit":
        from auditkit.lab.dit import load_lab_dit_pipeline

        pipe = load_lab_dit_pipeline(path=args.assets / "pipeline-dit")
        guidances, card_name, out = _guidances(args.dit_eval_guidance), "lab_dit_card.json", args.work / "eval-dit"
    else:
        from auditkit.lab.model import load_lab_pipeline

        pipe = load_lab_pipeline(path=args.assets / "pipeline")
        guidances, card_name, out = _guidances(args.eval_guidance), "lab_card.json", args.work / "eval"
    det = LabConceptDetector(path=args.assets / "detector")
    out.mkdir(exist_ok=True)
    all_figures = []
    for guidance in guidances:
        res = adherence.measure_adherence(pipe, det, n_per_shape=args.eval_n, steps=args.eval_steps,
                                          guidance=guidance, seed=args.seed)
        for shape, imgs in res["images"].items():
            save_grid(imgs[:64], out / f"{shape}-g{guidance:g}.png", cols=16)
        figures = res["figures"]
        log.info("adherence (n=%d per shape, %d sampling steps, guidance %.1f):", args.eval_n,
                 args.eval_steps, guidance)
        for shape, f in figures["shapes"].items():
            lo, hi = f["shape_rate_ci95"]
            log.info("  %-9s shape %.3f [%.3f, %.3f]  colour %.3f  cross-flag %.3f  %s", shape,
                     f["shape_rate"], lo, hi, f["colour_rate"], f["concept_flag_rate"], f["detected"])
        all_figures.append(figures)
    card: dict = {"adherence": all_figures}
    timings = args.work / "timings.json"
    if timings.is_file():
        card["training_seconds"] = json.loads(timings.read_text())
    settings = args.work / "args.json"
    if kind == "dit":
        card["model"] = describe(pipe, args.assets / "pipeline-dit")
        if settings.is_file():
            card["training"] = {"command": TRAIN_DIT_COMMAND, "settings": json.loads(settings.read_text())}
        runs = args.work / "runs.jsonl"
        if runs.is_file():
            card.setdefault("training", {})["runs"] = [json.loads(line) for line in runs.read_text().splitlines()]
    (args.assets / card_name).write_text(json.dumps(card, indent=1))
    (out / "adherence.json").write_text(json.dumps(all_figures, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
