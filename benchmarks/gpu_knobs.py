"""Experiment: which rendering knobs raise the runner's GPU throughput (SD1.5 architecture, LoRA pair fused).

The same pipeline, prompts and seeds as ``gpu_throughput.py``; each step adds one knob to the previous ones and
times ``auditkit.runner.run`` on the same images (after a warm-up batch, which also compiles where a step
compiles). Also reports where one batch's time goes (UNet steps vs VAE decode). GPU only.

Usage: ``python benchmarks/gpu_knobs.py [--images 64] --json OUT.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

from gpu_throughput import (
    CONFIG,
    ROLES,
    _sync,
    build_pipeline,
    count_flops,
    make_adapters,
    make_jobs,
    peak_tflops,
    time_runner,
)
from harness import provenance

from auditkit.models.attach import Fused, load_adapters


def split_time(pipe, batch: int, steps: int) -> dict:
    """Seconds of ``steps`` classifier-free-guided UNet calls and of one VAE decode, at ``batch`` images."""
    import torch

    unet, vae = pipe.unet, pipe.vae
    size, dev, dt = unet.config.sample_size, unet.device, unet.dtype
    lat = torch.randn(2 * batch, 4, size, size, device=dev, dtype=dt)
    emb = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=dev, dtype=dt)
    out = {}
    with torch.no_grad():
        for name, fn in (("unet_steps", lambda: [unet(lat, 500, encoder_hidden_states=emb) for _ in range(steps)]),
                         ("vae_decode", lambda: vae.decode(lat[:batch] / vae.config.scaling_factor))):
            fn()
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            out[name] = time.perf_counter() - t
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    import torch

    warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\..*")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    pipe = build_pipeline(False, "cuda")
    jobs = make_jobs(args.images, args.steps)
    per_image = None
    rows = []

    def knob_cudnn(p):
        torch.backends.cudnn.benchmark = True

    def knob_channels_last(p):
        p.unet.to(memory_format=torch.channels_last)
        p.vae.to(memory_format=torch.channels_last)

    def knob_compile_unet(p):
        p.unet.compile()

    def knob_compile_vae(p):
        p.vae.decoder.compile()

    steps = [("bf16 batch 16 (the runner today)", None, 16), ("+ cudnn.benchmark", knob_cudnn, 16),
             ("+ channels_last", knob_channels_last, 16), ("+ batch 32", None, 32),
             ("+ torch.compile UNet", knob_compile_unet, 32), ("+ torch.compile VAE decoder", knob_compile_vae, 32)]
    with tempfile.TemporaryDirectory(prefix="auditkit-gpu-knobs-") as tmp:
        load_adapters(pipe, make_adapters("sd15", Path(tmp)))
        pipe.to(dtype=torch.bfloat16)
        per_image = count_flops(pipe, args.steps)["per_image"]
        peak = peak_tflops(torch.cuda.get_device_name())
        for i, (name, knob, batch) in enumerate(steps):
            if knob is not None:
                knob(pipe)
            t0 = time.perf_counter()
            seconds = time_runner(pipe, jobs, batch, Path(tmp) / f"k{i}")
            fused = Fused(pipe)
            fused.apply(CONFIG, ROLES)
            try:
                split = split_time(pipe, batch, args.steps)
            finally:
                fused.restore()
            ips = args.images / seconds
            row = {"step": name, "batch_size": batch, "seconds": seconds, "images_per_s": ips,
                   "fraction_of_peak": per_image * ips / 1e12 / peak, "split_seconds_per_batch": split,
                   "wall_with_warmup_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name}: {ips:.2f} images/s, {row['fraction_of_peak']:.1%} of peak; per batch of {batch}: "
                  f"UNet {split['unet_steps']:.2f} s, VAE {split['vae_decode']:.2f} s", flush=True)
            args.json.write_text(json.dumps({**provenance(), "device": torch.cuda.get_device_name(),
                                             "torch": torch.__version__,
                                             "flops_per_image": per_image, "peak": peak, "steps": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
