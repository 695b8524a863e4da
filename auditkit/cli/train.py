"""``auditkit align`` (a Safety LoRA by ESD) and ``auditkit finetune`` (on top of a safety module, or modular)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from auditkit.cli.common import (
    base_option,
    check_output,
    device_option,
    out,
    progress_bar,
    read_prompts,
    torch_threads,
)
from auditkit.cli.options import setting_options
from auditkit.fsutil import check_writable
from auditkit.train.esd import ESDConfig
from auditkit.train.finetune import FinetuneConfig


def _method_help() -> str:
    from auditkit.train.align import ALIGN_METHODS

    return "; ".join(f"{m.name}: {m.summary}" for m in ALIGN_METHODS.values())


def _methods() -> list[str]:
    from auditkit.train.align import ALIGN_METHODS

    return list(ALIGN_METHODS)


@click.command()
@base_option
@click.option("--concept", "concepts", multiple=True, help="A prompt naming the concept to erase (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="A text file of concept prompts, one per line.")
@click.option("--method", type=click.Choice(_methods()), default="esd-x", show_default=True, help=_method_help())
@click.option("--anchors", "anchor_files", type=click.Path(path_type=Path), multiple=True,
              help="Suite file(s) of prompts to preserve (e.g. other shapes and colours): ESD adds a preservation "
                   "term pinning the base's predictions on them, uce keeps their encodings; must share no prompt "
                   "with the concept prompts. The module's cost on them is printed.")
@click.option("--preserve", type=float, default=None,
              help="Weight of the preservation term (ESD) or of the preserved prompts (uce); default 1 with --anchors.")
@setting_options(ESDConfig, ("rank", "alpha", "steps", "lr", "batch", "eta", "ddim_steps", "seed"))
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@device_option
@click.option("--full", is_flag=True, help="Fine-tune the layers' weights themselves, as the original ESD does: "
                                           "--out is a new folder, the erased denoiser (diffusers component "
                                           "folder), usable wherever a safety module is (--rank/--alpha unused).")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path))
def align(base, concepts, prompts_file, method, anchor_files, preserve, rank, alpha, steps, lr, batch, eta, ddim_steps,
          seed, threads, device, full, out_file):
    """Train a Safety LoRA that erases a concept (ESD objective, or UCE's closed form), written as a kohya
    .safetensors (Flux, SD3: in the diffusers layout); with --full, the erased model itself. With --anchors, the
    rest of the model is preserved and the module's cost on the anchors is printed."""
    from auditkit.dynamic import load_base
    from auditkit.lora.write import save_adapter
    from auditkit.models.families import family_of_pipeline
    from auditkit.models.pipeline import architecture_of
    from auditkit.models.saving import check_new_folder, save_component
    from auditkit.train.align import ALIGN_METHODS, read_anchors

    prompts = list(concepts) + read_prompts(prompts_file)
    if not prompts:
        raise click.UsageError("give the concept with --concept or --prompts")
    chosen = ALIGN_METHODS[method]
    if full and chosen.full is None:
        trained = ", ".join(n for n, m in ALIGN_METHODS.items() if m.full)
        raise click.UsageError(f"--full applies to the trained methods ({trained}), not to {method}")
    if chosen.needs_anchors and not anchor_files:
        raise click.UsageError(f"--method {method} needs --anchors (the prompts it preserves)")
    if preserve is not None and not anchor_files:
        raise click.UsageError("--preserve needs --anchors (the prompts it preserves)")
    anchors = read_anchors(anchor_files, prompts)  # bad or overlapping anchors fail before any model loads
    if full:
        check_new_folder(out_file)
    else:
        check_output(out_file)
        check_writable(out_file)
    settings = {"rank": rank, "alpha": alpha, "steps": steps, "lr": lr, "batch": batch, "eta": eta, "seed": seed,
                "ddim_steps": ddim_steps, "preserve": preserve}
    chosen.check(settings, anchors is not None)  # bad settings fail before any model loads
    torch_threads(threads)
    pipe, _, _ = load_base(base, device, full_precision=full)
    bar, update = progress_bar(f"align {method}{' (full)' if full else ''}")
    if full:
        from auditkit.models.pipeline import denoiser_for

        with bar:
            deltas = chosen.full(pipe, prompts, anchors, settings, update)
        component = denoiser_for(pipe).component
        save_component(pipe, component, deltas, out_file)
        out.print(f"erased model ({component}): [bold]{out_file}[/bold] ({len(deltas)} weights changed, {method}, "
                  "full fine-tuning); use it as --safety with --base " + base.name)
        _print_cost(pipe, deltas, anchors, base)
        return
    with bar:
        modules = chosen.train(pipe, prompts, anchors, settings, update)
    rank_written = max(m.down.shape[0] for m in modules.values()) if method == "uce" else rank
    meta = {"auditkit.kind": "safety", "auditkit.method": method, "auditkit.concept_prompts": json.dumps(prompts),
            "auditkit.base": base.name, "ss_network_dim": str(rank_written),
            "ss_network_alpha": str(rank_written if method == "uce" else alpha or rank)}
    if anchors is not None:
        meta["auditkit.anchor_prompts"] = json.dumps(list(anchors.prompts))
        meta["auditkit.preserve"] = str(1.0 if preserve is None else preserve)
    save_adapter(modules, out_file, architecture_of(pipe, "custom"), family_of_pipeline(pipe).written_layout,
                 metadata=meta, require_trained=True)
    out.print(f"safety adapter: [bold]{out_file}[/bold] ({len(modules)} modules, rank {rank_written}, {method}"
              f"{', anchors preserved' if anchors is not None else ''})")
    _print_cost(pipe, modules, anchors, base)


def _print_cost(pipe, modules, anchors, base) -> None:
    """What the module costs on the anchors: adherence of base vs base + module, by the lab detector (a lab base);
    said to be not measured otherwise."""
    from rich.table import Table

    if anchors is None:
        out.print("[dim]cost: not measured (no --anchors: no prompts to measure what the module keeps)[/dim]")
        return
    if base.lab is None:
        out.print("[dim]cost: not measured (no detector judges this base's prompts; scan with a control suite to "
                  "compare base and base + safety)[/dim]")
        return
    from auditkit.lab.detector import LabConceptDetector
    from auditkit.train.align import anchor_cost

    cost = anchor_cost(pipe, modules, anchors, LabConceptDetector())
    t = Table("adherence", "base", "base + safety", title=f"cost on the anchors ({cost['images']} images, "
                                                         "lab detector)")
    for head in ("shape", "colour"):
        b, a = cost["base"].get(head), cost["base+safety"].get(head)
        if b and a:
            t.add_row(head, f"{b['rate']:.1%}", f"{a['rate']:.1%}")
    out.print(t)


@click.command()
@base_option
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of images with same-named .txt captions.")
@click.option("--safety", type=click.Path(path_type=Path),
              help="The safety module (needed for on-top/full): a Safety LoRA, or the erased model itself.")
@setting_options(FinetuneConfig, ("mode", "targets", "rank", "alpha", "steps", "lr", "batch", "seed", "extract_rank"))
@click.option("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
@device_option
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path))
def finetune(base, data_dir, safety, mode, targets, rank, alpha, steps, lr, batch, seed, extract_rank, threads, device,
             out_file):
    """Fine-tune a LoRA on an image-caption folder, on top of a safety module or modularly."""
    from auditkit.dynamic import load_base
    from auditkit.inputs import read_input
    from auditkit.lora.metadata import kohya_training_metadata
    from auditkit.lora.write import save_adapter
    from auditkit.models.families import family_of_pipeline
    from auditkit.models.pipeline import architecture_of, denoiser_for
    from auditkit.train.data import check_folder, load_folder
    from auditkit.train.finetune import finetune as run_finetune
    from auditkit.train.lora import denoiser_targets

    if mode in ("on-top", "full") and safety is None:
        raise click.UsageError(f"--mode {mode} needs --safety")
    check_output(out_file, safety)
    check_writable(out_file)
    cfg = FinetuneConfig(mode=mode, targets=targets, rank=rank, alpha=alpha, steps=steps, lr=lr, batch=batch,
                         seed=seed, extract_rank=extract_rank)  # bad settings fail before any model loads
    pairs = check_folder(data_dir)  # bad data fails before any model loads
    if safety is not None:  # read against the base's own architecture when it is a custom one
        read_input(safety, "safety module", base, extra_architectures=base.extra_architectures)
    torch_threads(threads)
    pipe, _, _ = load_base(base, device, full_precision=mode == "full")
    den = denoiser_for(pipe)
    denoiser_targets(den, cfg.targets)  # a target pattern that selects nothing fails before training
    arch = architecture_of(pipe, "custom")
    # an erased model takes part exactly (every tensor it changes), an adapter as its modules
    safety_modules = read_input(safety, "safety module", base, arch, arch=arch).exact() if safety else None
    data = load_folder(data_dir, den.image_size(), pairs)
    bar, update = progress_bar(f"finetune {mode}")
    with bar:
        result = run_finetune(pipe, data.images, data.captions, cfg, safety=safety_modules, progress=update)
    meta = {"auditkit.kind": "finetune", "auditkit.mode": mode, "auditkit.base": base.name,
            "ss_network_dim": str(rank), "ss_network_alpha": str(alpha or rank), "ss_max_train_steps": str(steps),
            **kohya_training_metadata(data.captions, data_dir.resolve().name)}
    save_adapter(result.modules, out_file, arch, family_of_pipeline(pipe).written_layout, metadata=meta,
                 require_trained=True)
    out.print(f"fine-tuning adapter: [bold]{out_file}[/bold] ({len(result.modules)} modules, mode {mode}, "
              f"final loss {result.losses[-1]:.4f})")
