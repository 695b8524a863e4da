"""Base model weights read from a diffusers pipeline folder, without torch.

Analyses that need W0 (DoRA's column norms, extraction of a fine-tuned model's difference from
the base, relative update sizes) only need a handful of weight matrices. Loading the pipeline
with diffusers costs seconds and gigabytes; reading the ``.safetensors`` files with auditkit's own
memory-mapped reader (:func:`auditkit.lora.io.open_safetensors`) costs milliseconds and only the
bytes of the tensors asked for. Pickle weights (``.bin``) are never read.

Folder layout (``save_pretrained``): ``model_index.json`` and one subfolder per component
(``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer``, ``vae``) holding
``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers), or a
sharded ``*.safetensors.index.json`` whose ``weight_map`` names the shard of every tensor, or the
same files with the ``fp16`` variant (``*.fp16.safetensors``, ``*.safetensors.index.fp16.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.fsutil import read_json
from auditkit.lora.io import PICKLE_SUFFIXES, SafetensorsFile, open_safetensors
from auditkit.models.families import read_model_index

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' file names
VARIANTS = ("", "fp16")  # preferred first: full precision, then the fp16 variant
_COMPONENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SHARD_INDEX_LIMIT = 16 << 20  # T5-XXL's index, the largest real one, is about 100 KiB


def weight_files(stem: str, variant: str) -> tuple[str, ...]:
    """Names of a component's single weight file and of its sharded index, for one variant.

    Args:
        stem: ``diffusion_pytorch_model`` or ``model``.
        variant: ``""`` or e.g. ``"fp16"``; diffusers and transformers put the variant before the
            last suffix (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``); the
            index is also accepted as ``model.fp16.safetensors.index.json``.

    Example:
        >>> weight_files("model", "fp16")
        ('model.fp16.safetensors', 'model.safetensors.index.fp16.json', 'model.fp16.safetensors.index.json')
    """
    if not variant:
        return (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
    return (f"{stem}.{variant}.safetensors", f"{stem}.safetensors.index.{variant}.json",
            f"{stem}.{variant}.safetensors.index.json")


def _key_spellings(component: str, path: str) -> tuple[str, ...]:
    """Tensor-name prefixes to try for a module: transformers 5 saves CLIP text encoders without
    the ``text_model.`` level, older versions with it."""
    if not component.startswith("text_encoder"):
        return (path,)
    if path.startswith("text_model."):
        return (path, path[len("text_model."):])
    return (path, "text_model." + path)


class BaseWeights:
    """Weights of a local diffusers pipeline, by auditkit canonical module name.

    Components are indexed when first asked for; tensors are read from memory maps.

    Args:
        folder: a ``save_pretrained`` pipeline folder (it has ``model_index.json``).

    Example:
        >>> base = BaseWeights.for_base(resolve_base("lab"))  # doctest: +SKIP
        >>> base.get("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k").shape  # doctest: +SKIP
        (32, 64)
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model_index.json"
        if not index.is_file():
            from auditkit.lab.bases import BASE_HELP

            raise BadInput(self.folder, f"not a diffusers pipeline folder (no model_index.json); use {BASE_HELP}")
        read_model_index(self.folder)
        self._keys: dict[str, dict[str, Path] | None] = {}  # component -> tensor name -> file
        self._files: dict[Path, SafetensorsFile] = {}

    @classmethod
    def for_base(cls, base) -> BaseWeights:
        """The weights of ``base``, a resolved :class:`~auditkit.models.base.Base` (a lab model or a folder)."""
        return cls(base.folder)

    def get(self, canonical: str) -> np.ndarray | None:
        """The weight of a module as a float64 matrix (conv kernels flattened to out x in*kh*kw).

        Args:
            canonical: an auditkit canonical module name, e.g.
                ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`` or
                ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``; the first dotted
                part names the component folder.

        Returns:
            The matrix, or ``None`` when the pipeline has no such component or no such weight.
            Malformed weight files or shard indexes raise :class:`BadInput` naming the file.
        """
        component, _, path = canonical.partition(".")
        keys = self._component(component) if path else None
        if keys is None:
            return None
        for prefix in _key_spellings(component, path):
            name = prefix + ".weight"
            if name in keys:
                weights = self._open(keys[name])
                if name not in weights.tensors:
                    raise BadInput(weights.path, f"has no tensor '{name}', though the shard index lists it there")
                weight = weights.float_array(name)
                return weight.astype(np.float64).reshape(weight.shape[0], -1)
        return None

    def _open(self, file: Path) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = open_safetensors(file)
        return self._files[file]

    def _component(self, component: str) -> dict[str, Path] | None:
        if component not in self._keys:
            folder = self.folder / component
            ok = _COMPONENT.fullmatch(component) and folder.is_dir()
            self._keys[component] = self._index(folder) if ok else None
        return self._keys[component]

    def _index(self, folder: Path) -> dict[str, Path]:
        return component_index(folder, self._open)


def component_index(folder: Path, open_file=open_safetensors) -> dict[str, Path]:
    """Tensor name -> file of a component folder, from the first weight file or shard index found (see
    :data:`VARIANTS`); ``open_file`` reads a single file's header. A folder with only pickle weights (or
    none) is refused, naming them."""
    for variant in VARIANTS:
        for stem in WEIGHT_STEMS:
            single, *indexes = (folder / name for name in weight_files(stem, variant))
            if single.is_file():
                return dict.fromkeys(open_file(single).tensors, single)
            for index in indexes:
                if index.is_file():
                    return _read_shard_index(index)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    held = f" (it holds {', '.join(pickles[:3])}: pickle files, which auditkit never loads)" if pickles else ""
    raise BadInput(folder, f"no .safetensors weights{held}; save the pipeline with "
                           "save_pretrained(..., safe_serialization=True)")


def _read_shard_index(index: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from a ``*.safetensors.index.json``; every defect names the index."""
    parsed = read_json(index, "shard index", limit=SHARD_INDEX_LIMIT)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise BadInput(index, "shard index has no 'weight_map' mapping tensor names to shard files")
    files: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        # Shards live beside the index: a path elsewhere (../, /abs, sub/dir) is refused, not followed.
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise BadInput(index, f"shard index names {shard!r}, not a .safetensors file beside it")
        files[shard] = index.parent / shard
        if not files[shard].is_file():
            raise BadInput(index, f"shard index lists '{shard}', which is missing")
    return {name: files[shard] for name, shard in weight_map.items()}
