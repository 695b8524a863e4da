"""Loading base pipelines: the shipped lab model (``lab``) or a local diffusers folder.

Everything is offline: a path must be a ``save_pretrained`` folder on disk; nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

from auditkit.errors import BadInput


def quiet_libraries() -> None:
    """No library progress bars or info chatter on the user's terminal: auditkit reports progress itself."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def load_pipeline(base: str, device: str = "cpu", dtype=None):
    """The base ``StableDiffusionPipeline`` named by ``base`` (``lab`` or a local folder)."""
    import torch

    quiet_libraries()
    dtype = dtype or torch.float32
    if base == "lab":
        from auditkit.lab.model import lab_pipeline_available, lab_pipeline_path, load_lab_pipeline

        if not lab_pipeline_available():
            raise BadInput(lab_pipeline_path(), "the lab model is not installed (run scripts/train_lab.py)")
        return load_lab_pipeline(device=device, dtype=dtype)
    path = Path(base)
    if not (path / "model_index.json").is_file():
        raise BadInput(path, "not a diffusers pipeline folder (no model_index.json); use 'lab' or a local folder")
    pickles = sorted(p.relative_to(path).as_posix() for p in path.glob("*/*") if p.suffix in (".bin", ".ckpt", ".pt"))
    weights = list(path.glob("*/*.safetensors"))
    if not weights:
        found = f" (it holds {', '.join(pickles[:3])}: pickle files, which auditkit never loads)" if pickles else ""
        raise BadInput(path, f"no .safetensors weights in the pipeline folder{found}; save it with "
                             "save_pretrained(..., safe_serialization=True)")
    from diffusers import StableDiffusionPipeline

    try:
        # use_safetensors: never fall back to pickle .bin weights (torch.load) for any component
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                       safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise BadInput(path, f"cannot load the pipeline ({' '.join(str(exc).split())[:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def architecture_of(pipe, name: str = "custom"):
    """The auditkit architecture of a loaded pipeline (a built-in one when the shapes match)."""
    from auditkit.models import architectures
    from auditkit.models.build import architecture_from_models

    arch = architecture_from_models(name, pipe.unet, {"text_encoder": pipe.text_encoder})
    for known in architectures.builtin():
        unet_known = {k: v for k, v in known.modules.items() if k.startswith("unet.")}
        unet_here = {k: v for k, v in arch.modules.items() if k.startswith("unet.")}
        if unet_known == unet_here:
            return known
    return arch
