"""Loading pipeline folders: a ``save_pretrained`` folder of a known family (:mod:`auditkit.models.families`: a
family with a ``pipeline_class``), detected from its ``model_index.json``, and the architecture of a folder or a
loaded pipeline. What ``--base`` names (a lab model or a folder) is resolved once, by :mod:`auditkit.models.base`.

Everything is offline: a path must be a ``save_pretrained`` folder on disk; nothing is fetched, and
only ``.safetensors`` weights are loaded (a pickle ``.bin`` is never unpickled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from auditkit.errors import BadInput
from auditkit.fsutil import read_json
from auditkit.lab.bases import BASE_HELP
from auditkit.lora.io import PICKLE_SUFFIXES
from auditkit.models.build import META_CLASSES  # a class name in a model_index.json is only looked up there
from auditkit.models.conditioning import Conditioning
from auditkit.models.denoising import Denoiser
from auditkit.models.families import Family, family_of_index, family_of_pipeline, known_family, read_model_index

CONFIG_LIMIT = 1 << 20  # a component's config.json is a few KiB


def quiet_libraries() -> None:
    """No library progress bars or info chatter on the user's terminal: auditkit reports progress itself."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def load_pipeline(folder: str | Path, device: str = "cpu", dtype=None, index: dict | None = None):
    """The pipeline saved in ``folder`` (a folder of a family that loads: one with a ``pipeline_class``), after
    :func:`check_pipeline_folder` (``index``: its ``model_index.json`` when already read); a base is loaded with
    :meth:`auditkit.models.base.Base.load`."""
    import torch

    quiet_libraries()
    dtype = dtype or torch.float32
    path = Path(folder)
    index = require_model_index(path) if index is None else index
    family = check_pipeline_folder(path, index)
    why = family.refuses(index) if family.refuses is not None else ""
    if why:
        raise BadInput(path, why)
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class)
    try:
        # use_safetensors: never fall back to pickle .bin weights (torch.load) for any component
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True,
                                              **family.load_options)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInput(path, f"cannot load the {family.name} pipeline ({' '.join(str(exc).split())[:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    if family.on_load is not None:
        family.on_load(pipe)
    return pipe.to(device)


def require_model_index(path: Path) -> dict:
    """``model_index.json`` of the pipeline folder a base names; BadInput saying what a base can be when it has
    none."""
    if not (path / "model_index.json").is_file():
        raise BadInput(path, f"not a diffusers pipeline folder (no model_index.json); use {BASE_HELP}")
    return read_model_index(path)


def check_pipeline_folder(path: Path, index: dict | None = None) -> Family:
    """The family of pipeline folder ``path`` (``index``: its ``model_index.json`` when already read), after
    checking that every component with weights has ``.safetensors`` ones (BadInput naming the pickle files
    otherwise); loads nothing."""
    index = require_model_index(path) if index is None else index
    if not list(path.glob("*/*.safetensors")):
        pickles = _pickles(path, "*/*")
        found = f" (it holds {', '.join(pickles[:3])}: pickle files, which auditkit never loads)" if pickles else ""
        raise BadInput(path, f"no .safetensors weights in the pipeline folder{found}; save it with "
                             "save_pretrained(..., safe_serialization=True)")
    for component in sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)):
        folder = path / component
        pickles = _pickles(path, f"{component}/*")
        if folder.is_dir() and pickles and not list(folder.glob("*.safetensors")):
            raise BadInput(path, f"component '{component}' has only pickle weights ({', '.join(pickles[:2])}), which "
                                 "auditkit never loads; save it with save_pretrained(..., safe_serialization=True)")
    return family_of_index(index, path)


def _pickles(path: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.glob(pattern) if p.suffix.lower() in PICKLE_SUFFIXES)


def architecture_of(pipe, name: str = "custom"):
    """The auditkit architecture of a loaded pipeline (a built-in one when the shapes match)."""
    from auditkit.models.build import architecture_from_models

    family = family_of_pipeline(pipe)
    encoders = {c: getattr(pipe, c) for c in family.text_encoders if getattr(pipe, c, None) is not None}
    return _builtin_or(architecture_from_models(name, getattr(pipe, family.denoiser), encoders,
                                                component=family.denoiser, kohya_prefixes=_prefixes(family)))


def _prefixes(family: Family) -> dict | None:
    return dict(family.kohya_prefixes) or None


def architecture_of_folder(folder: str | Path, name: str = "custom", index: dict | None = None):
    """The auditkit architecture of a pipeline folder, built from its components' configs on the meta
    device (no weights read): what adapters for that base are checked against before it loads (``index``: its
    ``model_index.json`` when already read)."""
    import diffusers
    import torch
    import transformers

    from auditkit.models.build import architecture_from_models

    folder = Path(folder)
    index = read_model_index(folder) if index is None else index
    family = family_of_index(index, folder)
    models = {}
    libraries = {"diffusers": diffusers, "transformers": transformers}
    for component in family.lora_components:
        entry = index.get(component)
        class_name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if class_name is None and component in family.text_encoders[1:]:
            continue  # an optional second text encoder left out (None in model_index.json)
        if class_name not in META_CLASSES:
            raise BadInput(folder / "model_index.json", f"component '{component}' is {class_name!r}; "
                                                        f"supported: {', '.join(sorted(META_CLASSES))}")
        cls = getattr(libraries[META_CLASSES[class_name]], class_name)
        config = folder / component / "config.json"
        if not config.is_file():
            raise BadInput(folder, f"component '{component}' has no config.json")
        read_json(config, "config.json", limit=CONFIG_LIMIT)  # bounded first: the libraries' readers are not
        try:
            with torch.device("meta"):
                if hasattr(cls, "from_config"):  # diffusers models
                    models[component] = cls.from_config(cls.load_config(folder / component))
                else:  # transformers models
                    models[component] = cls(cls.config_class.from_json_file(config))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BadInput(config, f"cannot build {class_name} from it ({' '.join(str(exc).split())[:200]})") from None
    denoiser = models.pop(family.denoiser)
    return _builtin_or(architecture_from_models(name, denoiser, models, component=family.denoiser,
                                                kohya_prefixes=_prefixes(family)))


def _builtin_or(arch):
    """A built-in architecture with the same denoiser modules and components as ``arch``, else ``arch``."""
    from auditkit.models import architectures

    def components(a) -> set[str]:
        return {n.split(".", 1)[0] for n in a.modules}

    def denoiser(a) -> dict:
        return {k: v for k, v in a.modules.items() if not k.startswith("text_encoder")}

    for known in architectures.builtin():
        if components(known) == components(arch) and denoiser(known) == denoiser(arch):
            return known
    return arch


def lora_components(pipe) -> dict:
    """Component name -> model, for the components of ``pipe`` that adapters change (denoiser first)."""
    family = family_of_pipeline(pipe)
    return {c: getattr(pipe, c) for c in family.lora_components if getattr(pipe, c, None) is not None}


def denoiser_of(pipe):
    """The denoising model of a pipeline (its UNet for SD 1/2 and SDXL, its transformer for the others);
    :func:`denoiser_for` binds how to call, train and sample it."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


# --- what a loaded pipeline's family does its own way (auditkit.models.family) -------------------------

def denoiser_for(pipe) -> Denoiser:
    """The denoiser of ``pipe``, bound to its family's :class:`~auditkit.models.denoising.Denoising` record."""
    family = family_of_pipeline(pipe)
    record, model = family.denoising, getattr(pipe, family.denoiser)
    return Denoiser(pipe, model, family.denoiser, record, record.process(pipe.scheduler.config))


def encode(pipe, prompts: Sequence[str]) -> Conditioning:
    """The conditioning of ``prompts`` for ``pipe``'s family (no gradient; the text encoders stay frozen):
    the family's own prompt encoding (:mod:`auditkit.models.conditioning`)."""
    return family_of_pipeline(pipe).conditioning(pipe, list(prompts))


SAMPLED_FRAMES = 4  # frames of each rendered clip the detectors score (evenly spaced, the first and last among them)


def sample_frames(clips, k: int = SAMPLED_FRAMES):
    """``k`` evenly spaced frames (the first and the last among them) of clips N × F × H × W × 3."""
    import numpy as np

    idx = np.unique(np.rint(np.linspace(0, clips.shape[1] - 1, min(k, clips.shape[1]))).astype(int))
    return clips[:, idx]


def render(pipe, prompts: Sequence[str], steps: int, guidance: float, generators: list, input_image=None):
    """Images (uint8 N × H × W × 3) of ``prompts`` as the pipeline renders them with its family's render options
    (:func:`render_options`), one generator per prompt, or for a video family the clips' sampled frames (uint8
    N × :data:`SAMPLED_FRAMES` × H × W × 3, :func:`sample_frames`); ``input_image``: the image an edit pipeline's
    prompts edit (an :class:`auditkit.suites.InputImage`, given as its family's ``input_image`` hook says). The
    one place a scan, a trigger confirmation or a benchmark calls a pipeline to render."""
    import numpy as np

    edit = family_of_pipeline(pipe).input_image(pipe, input_image.pixels()) if input_image is not None else {}
    # the prompt by keyword: an edit pipeline's first parameter is its input image (FluxKontextPipeline)
    with guided(pipe, guidance, len(prompts)) as options:
        out = pipe(prompt=list(prompts), num_inference_steps=steps, generator=generators, output_type="np",
                   **options, **render_options(pipe), **edit)
    clips = getattr(out, "frames", None)  # a video pipeline's output (WanPipelineOutput)
    pixels = np.asarray(out.images if clips is None else sample_frames(np.asarray(clips)))
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def guided(pipe, guidance: float, n: int) -> Iterator[dict]:
    """The suite's ``guidance`` for a render of ``n`` prompts: yields the call's guidance arguments
    (:func:`guidance_options`), or for a family whose pipeline guides through a component (``Family.guider``:
    a diffusers guider) nothing, the component replaced for the duration by a copy of it at ``guidance``
    (``guider.new(guidance_scale=…)``; the pipeline's own is put back, unchanged)."""
    family = known_family(pipe)
    component = family.guider if family is not None else None
    if component is None:
        yield guidance_options(pipe, guidance, n)
        return
    own = getattr(pipe, component)
    setattr(pipe, component, own.new(guidance_scale=guidance))
    try:
        yield {}
    finally:
        setattr(pipe, component, own)


def guidance_options(pipe, guidance: float, n: int) -> dict:
    """The render call's guidance arguments: ``guidance_scale``, or the family's own (``Family.guidance_options``)."""
    family = known_family(pipe)
    hook = family.guidance_options if family is not None else None
    return hook(guidance, n) if hook else {"guidance_scale": guidance}


def render_options(pipe) -> dict:
    """The family's extra render arguments for ``pipe`` ({} for families that need none, and for a
    pipeline of no known family: a test double renders with its own defaults)."""
    family = known_family(pipe)
    hook = family.render_options if family is not None else None
    return hook(pipe) if hook else {}
