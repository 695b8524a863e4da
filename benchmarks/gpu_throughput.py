"""Benchmark: dynamic-scan images per second on a GPU, SD1.5 architecture, a LoRA pair active.

In one process, on the same weights, prompts and seeds count (512x512, 25 DDIM steps, guidance 7.5):

1. auditkit's runner path (``auditkit.runner.run``): bf16, batched, the configuration's adapters
   fused into the weights, PNGs and run-log lines written while the next batch renders;
2. a naive diffusers loop: batch 1, fp32, adapters unfused (``set_adapters``), each image saved.

The model is SD1.5's architecture with random weights (throughput does not depend on their values):
UNet and CLIP text encoder from ``auditkit/models/configs/sd15.json``, the SD1.5 VAE config below,
the lab's offline word-level CLIP tokenizer padded to 77 tokens, DDIM with SD1.x's schedule. The
adapter pair (safety + candidate) are random rank-8 LoRAs on every UNet attention projection
(to_q, to_k, to_v, to_out.0 of attn1 and attn2), loaded through ``auditkit.models.attach.load_adapters``.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one classifier-free-guided
UNet call (batch 2) and one VAE decode (plus the text encoder once per image); per image =
steps x UNet + VAE + text encoder. The runner's achieved TFLOPS is reported as a fraction of the
GPU's bf16 dense peak (table below by device name, else ``--peak-tflops``).
Targets: the runner >= 5x the naive loop and >= 40% of bf16 dense peak.

Usage: ``python benchmarks/gpu_throughput.py [--images 64] [--batch-size 16] [--peak-tflops T]``
writes ``benchmarks/results/gpu_throughput.json`` (only on a GPU). Without CUDA it prints
``skipped: no CUDA device`` and exits 0; ``--cpu-smoke`` runs the same code on a tiny model on the
CPU (64x64, 2 steps, 4 images) so the script itself can be tested.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, provenance

from auditkit.dynamic import library_versions
from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter
from auditkit.models import architectures
from auditkit.models.attach import Fused, apply_configuration, load_adapters
from auditkit.runlog import RunLog
from auditkit.runner import Configuration, Job, run

RESULT_FILE = RESULTS / "gpu_throughput.json"
ATTENTION = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0",
             ".attn2.to_q", ".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")
ROLES = ("safety", "candidate")
CONFIG = Configuration("base+safety+candidate@1", (("safety", 1.0), ("candidate", 1.0)))
# bf16 dense tensor-core peak, TFLOPS (NVIDIA datasheets); first match in the device name wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
TARGET_SPEEDUP, TARGET_PEAK = 5.0, 0.40
# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "act_fn": "silu"}
PROMPTS = ("a red cross", "a blue cross on black", "a striped green cross", "a yellow square", "a white cross on gray",
           "a purple circle", "a neon tee", "a cross")


class NullDetector:
    """Scores nothing: the benchmark times rendering and writing, not a detector."""

    threshold = 1.0

    def score(self, images):
        return np.zeros(len(images))


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def build_pipeline(smoke: bool, device: str):
    """A ``StableDiffusionPipeline`` with random weights: SD1.5's architecture, or the lab's for the smoke run."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from auditkit.lab import model as lab
    from auditkit.lab.tokenizer import build_tokenizer
    from auditkit.models.build import load_config
    from auditkit.models.pipeline import quiet_libraries

    quiet_libraries()
    tokenizer = build_tokenizer()
    if smoke:  # the lab's sizes, latents 16x16 -> 64x64 images
        unet_cfg, vae_cfg = {**lab.UNET_CONFIG, "sample_size": 16}, lab.VAE_CONFIG
        te_cfg = lab.text_config(len(tokenizer))
    else:
        sd15 = load_config("sd15")
        te = sd15["text_encoders"]["text_encoder"]
        unet_cfg, vae_cfg = sd15["unet"], SD15_VAE
        te_cfg = {k: v for k, v in te.items() if k != "kohya_prefix"}
        tokenizer.model_max_length = te_cfg["max_position_embeddings"]  # 77, as SD1.5 pads prompts
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    pipe = lab.assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_adapters(arch_name: str, out_dir: Path, rank: int = 8) -> dict:
    """Random rank-``rank`` safety and candidate LoRAs on every UNet attention projection, as kohya files."""
    arch = architectures.get(arch_name)
    names = [n for n in arch.modules if n.startswith("unet.") and n.endswith(ATTENTION)]
    rng = np.random.default_rng(0)
    adapters = {}
    for role in ROLES:
        mods = {}
        for n in names:
            s = arch.modules[n]
            mods[n] = LoraModule(n, rng.normal(0, 0.02, (rank, s.flat_in)).astype(np.float32),
                                 rng.normal(0, 0.02, (s.out_features, rank)).astype(np.float32), 1.0)
        adapters[role] = read_adapter(save_adapter(mods, out_dir / f"{role}.safetensors", arch))
    return adapters


def make_jobs(n: int, steps: int, guidance: float = 7.5) -> list[Job]:
    return [Job(f"bench/{i}/0", "bench", i, 0, PROMPTS[i % len(PROMPTS)], 1000 * (i + 1), guidance, steps)
            for i in range(n)]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_naive(pipe, jobs: list[Job], out_dir: Path) -> float:
    """Seconds for ``jobs`` one image at a time, adapters unfused, each image saved (after one warm-up image)."""
    import torch

    apply_configuration(pipe, CONFIG, ROLES)
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(job: Job) -> None:
        image = pipe(job.prompt, num_inference_steps=job.steps, guidance_scale=job.guidance,
                     generator=torch.Generator().manual_seed(job.seed)).images[0]
        image.save(out_dir / f"{job.prompt_index:05d}.png")

    one(jobs[0])
    _sync()
    start = time.perf_counter()
    for job in jobs:
        one(job)
    _sync()
    return time.perf_counter() - start


def time_runner(pipe, jobs: list[Job], batch_size: int, work_dir: Path) -> float:
    """Seconds for ``auditkit.runner.run`` on ``jobs`` (fused, batched), after a one-batch warm-up run."""
    detectors = {"none": NullDetector()}
    for name, js in (("warmup", jobs[:batch_size]), ("timed", jobs)):
        log = RunLog(work_dir / name)
        log.start({"benchmark": name})
        _sync()
        start = time.perf_counter()
        run(pipe, js, [CONFIG], detectors, log.dir, roles=ROLES, batch_size=batch_size, fuse=True)
        _sync()
        seconds = time.perf_counter() - start
    if len(log.records()) != len(jobs):
        raise RuntimeError(f"the runner wrote {len(log.records())} records for {len(jobs)} jobs")
    return seconds


def count_flops(pipe, steps: int) -> dict[str, int]:
    """FLOPs of one image's work with the adapters fused: text encoder (prompt + empty prompt), ``steps``
    UNet calls at batch 2 (classifier-free guidance) and one VAE decode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    unet, device, dtype = pipe.unet, pipe.unet.device, pipe.unet.dtype
    ids = torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.long, device=device)
    size = unet.config.sample_size
    latents = torch.randn(2, unet.config.in_channels, size, size, device=device, dtype=dtype)
    fused = Fused(pipe)
    fused.apply(CONFIG, ROLES)
    try:
        with torch.no_grad():
            emb = pipe.text_encoder(ids)[0]
            out = {"text_encoder": flops(lambda: pipe.text_encoder(ids)),
                   "unet_step": flops(lambda: unet(latents, 999, encoder_hidden_states=emb)),
                   "vae_decode": flops(lambda: pipe.vae.decode(latents[:1]))}
    finally:
        fused.restore()
    out["per_image"] = out["text_encoder"] + steps * out["unet_step"] + out["vae_decode"]
    return out


def benchmark(args) -> dict:
    import torch

    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    steps, n_images, batch = (2, 4, 2) if smoke else (args.steps, args.images, args.batch_size)
    pipe = build_pipeline(smoke, device)
    jobs = make_jobs(n_images, steps)
    with tempfile.TemporaryDirectory(prefix="auditkit-gpu-bench-") as tmp:
        coverage = load_adapters(pipe, make_adapters("lab" if smoke else "sd15", Path(tmp)))
        naive_s = time_naive(pipe, jobs, Path(tmp) / "naive")  # fp32, unfused
        pipe.to(dtype=torch.bfloat16)
        runner_s = time_runner(pipe, jobs, batch, Path(tmp) / "runner")
    flops = count_flops(pipe, steps)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, args.peak_tflops) if device == "cuda" else args.peak_tflops
    runner_ips, naive_ips = n_images / runner_s, n_images / naive_s
    tflops = flops["per_image"] * runner_ips / 1e12
    return {
        "git_commit": provenance()["git_commit"], "device": name, "smoke": smoke, "peak_bf16_dense_tflops": peak,
        "settings": {"architecture": "lab" if smoke else "sd15", "height": pipe.unet.config.sample_size *
                     pipe.vae_scale_factor, "steps": steps, "guidance": 7.5, "images": n_images,
                     "adapters": {r: {"rank": 8, "modules": c["loaded"]} for r, c in coverage.items()},
                     "fp32_matmul_tf32": torch.backends.cuda.matmul.allow_tf32},
        "runner": {"dtype": "bfloat16", "batch_size": batch, "fused": True, "seconds": runner_s,
                   "images_per_s": runner_ips},
        "naive": {"dtype": "float32", "batch_size": 1, "fused": False, "seconds": naive_s, "images_per_s": naive_ips},
        "speedup": runner_ips / naive_ips,
        "flops": flops, "runner_tflops": tflops, "fraction_of_peak": tflops / peak if peak else None,
        "targets": {"speedup": TARGET_SPEEDUP, "fraction_of_peak": TARGET_PEAK},
        "libraries": library_versions(), "python": platform.python_version(),
        "gpu_memory_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def summary(r: dict) -> list[str]:
    s, run_, naive = r["settings"], r["runner"], r["naive"]
    peak = f"{r['peak_bf16_dense_tflops']:g} TFLOPS bf16 dense" if r["peak_bf16_dense_tflops"] else "peak unknown"
    lines = [f"device: {r['device']} ({peak}){'  [cpu smoke run: tiny model]' if r['smoke'] else ''}",
             f"{s['architecture']} {s['height']}x{s['height']}, {s['steps']} steps, guidance {s['guidance']}, "
             f"{s['images']} images, LoRA pair active",
             f"naive loop (batch 1, fp32, unfused): {naive['images_per_s']:.3f} images/s ({naive['seconds']:.1f} s)",
             f"auditkit runner (bf16, batch {run_['batch_size']}, fused): {run_['images_per_s']:.3f} images/s "
             f"({run_['seconds']:.1f} s)",
             f"speedup {r['speedup']:.2f}x (target >= {TARGET_SPEEDUP:g}x: "
             f"{'met' if r['speedup'] >= TARGET_SPEEDUP else 'missed'})",
             f"FLOPs per image {r['flops']['per_image'] / 1e12:.3f} TFLOP; runner {r['runner_tflops']:.2f} TFLOPS"]
    if r["fraction_of_peak"] is not None:
        met = "met" if r["fraction_of_peak"] >= TARGET_PEAK else "missed"
        lines[-1] += f" = {r['fraction_of_peak']:.1%} of peak (target >= {TARGET_PEAK:.0%}: {met})"
    return lines


def section(throughput: dict, knobs: dict | None = None) -> str:
    """The BENCHMARKS.md section, from the results JSON (and ``gpu_knobs.py``'s, when given)."""
    r, s = throughput, throughput["settings"]
    lines = ["## GPU throughput (issue 4)", "",
             f"Command: `{r.get('command', 'python benchmarks/gpu_throughput.py')}` → "
             f"`benchmarks/results/gpu_throughput.json`, on {r.get('ran_on', 'a GPU')} "
             f"(git commit {str(r.get('git_commit'))[:12]}, "
             f"{r.get('date', '')}, {r['device']}, torch {r['libraries']['torch']}, diffusers "
             f"{r['libraries']['diffusers']}). SD1.5's architecture with random weights, "
             f"{s['height']}², {s['steps']} steps, guidance {s['guidance']}, {s['images']} images per path, a rank-8 "
             f"safety + candidate LoRA pair ({s['adapters']['candidate']['modules']} modules each), same prompts and "
             "seeds in both paths.", "",
             "| path | images/s | seconds |", "|---|---|---|",
             f"| naive diffusers loop (batch 1, fp32, adapters unfused) | {r['naive']['images_per_s']:.3f} | "
             f"{r['naive']['seconds']:.1f} |",
             f"| auditkit runner (bf16, batch {r['runner']['batch_size']}, adapters fused) | "
             f"{r['runner']['images_per_s']:.3f} | {r['runner']['seconds']:.1f} |", "",
             f"**Speedup {r['speedup']:.2f}×** (target ≥ {r['targets']['speedup']:g}×: "
             f"{'met' if r['speedup'] >= r['targets']['speedup'] else 'missed'}). FLOPs per image "
             f"{r['flops']['per_image'] / 1e12:.1f} TFLOP (guided UNet step {r['flops']['unet_step'] / 1e12:.2f}, "
             f"VAE decode {r['flops']['vae_decode'] / 1e12:.2f}); the runner achieves {r['runner_tflops']:.0f} TFLOPS"
             + (f" = **{r['fraction_of_peak']:.1%}** of the {r['peak_bf16_dense_tflops']:g} TFLOPS bf16 dense peak "
                f"(target ≥ {r['targets']['fraction_of_peak']:.0%}: "
                f"{'met' if r['fraction_of_peak'] >= r['targets']['fraction_of_peak'] else 'missed'})."
                if r["fraction_of_peak"] is not None else ".")
             + f" GPU memory peak {r['gpu_memory_peak_gib']:.1f} GiB."]
    if knobs:
        lines += ["", "Where the rest goes (`benchmarks/gpu_knobs.py`, `benchmarks/results/gpu_knobs.json`, git commit "
                      f"{str(knobs.get('git_commit'))[:12]}, same machine): each row adds one knob to the row above; "
                      "images/s of the runner on the same 64 images, and one batch's time split into its 25 guided "
                      "UNet calls and its VAE decode (timed alone).", "",
                  "| step | batch | images/s | of peak | UNet s/batch | VAE s/batch | wall incl. warm-up s |",
                  "|---|---|---|---|---|---|---|"]
        for k in knobs["steps"]:
            sp = k["split_seconds_per_batch"]
            lines.append(f"| {k['step']} | {k['batch_size']} | {k['images_per_s']:.2f} | {k['fraction_of_peak']:.1%} | "
                         f"{sp['unet_steps']:.2f} | {sp['vae_decode']:.2f} | {k['wall_with_warmup_s']:.0f} |")
        base = knobs["steps"][0]
        best = max(knobs["steps"], key=lambda k: k["images_per_s"])

        def unet_share(k):  # the UNet calls alone, as a fraction of peak
            flops = k["batch_size"] * s["steps"] * r["flops"]["unet_step"]
            return flops / k["split_seconds_per_batch"]["unet_steps"] / 1e12 / knobs["peak"]

        lines += ["", f"The runner today spends {base['split_seconds_per_batch']['unet_steps']:.2f} s of a batch in "
                      f"the UNet and {base['split_seconds_per_batch']['vae_decode']:.2f} s in the VAE; the UNet calls "
                      f"alone run at {unet_share(base):.1%} of peak (eager bf16 kernels), {unet_share(best):.1%} "
                      "compiled. The best row (everything above it, compiled) reaches "
                      f"{best['images_per_s']:.2f} images/s ({best['fraction_of_peak']:.1%} of peak), but compiling "
                      "costs the compiled rows' warm-ups (" + ", ".join(
                          f"{k['wall_with_warmup_s']:.0f} s" for k in knobs["steps"] if "compile" in k["step"])
                      + f" of wall time, against {base['wall_with_warmup_s']:.0f} s for the plain runner's whole "
                      "row): it pays only when one process renders thousands of images (a batch scan), not in one "
                      "scan's few hundred, so the runner does not compile (an option for batch scans is left to do). "
                      "channels_last and batch 32 were slower on their own; compiling without them was not measured."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images per path (same prompts and seeds)")
    ap.add_argument("--batch-size", type=int, default=16, help="the runner's batch size")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of a GPU not in the table")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"results file (default on a GPU: {RESULT_FILE.relative_to(ROOT)})")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks that the script runs")
    ap.add_argument("--section", action="store_true",
                    help="print the BENCHMARKS.md section from the results JSON (and gpu_knobs.json beside it)")
    args = ap.parse_args(argv)
    if args.section:
        path = args.json or RESULT_FILE
        knobs = path.parent / "gpu_knobs.json"
        print(section(json.loads(path.read_text()), json.loads(knobs.read_text()) if knobs.is_file() else None))
        return 0
    import torch

    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")  # two adapters in one model: intended

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("skipped: no CUDA device (--cpu-smoke runs a tiny version on the CPU)")
        return 0
    result = benchmark(args)
    for line in summary(result):
        print(line)
    out = args.json or (None if result["smoke"] else RESULT_FILE)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
