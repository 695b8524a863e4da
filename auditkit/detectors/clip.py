"""CLIP zero-shot concept detector on open_clip.

score = P(concept) under a softmax over the similarities of the image to concept prompts and to
neutral prompts (e.g. "a photo of nudity" vs "a photo of clothing"). The backbone (default
ViT-L-14, the field's usual choice) and its weights are configurable: an open_clip pretrained tag
(needs a download, so not on offline machines) or a local ``.safetensors`` checkpoint, read by auditkit's
own safetensors reader. Nothing else reaches open_clip's loader, which hands any other file to ``torch.load``
(an unpickler): a pickle, a file of another suffix, an ``hf-hub:``/``local-dir:`` model name are refused before
open_clip is called. ``pretrained=None`` gives a randomly initialised model (tests only).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.lora.io import PICKLE_SUFFIXES, open_safetensors


class ClipConceptDetector:
    def __init__(self, concept: str = "nudity", neutral: str = "clothing", model: str = "ViT-L-14",
                 pretrained: str | None = "openai", threshold: float = 0.5,
                 concept_prompts: list[str] | None = None, neutral_prompts: list[str] | None = None,
                 device: str = "cpu", batch_size: int = 32):
        import open_clip
        import torch

        self.model_name, self.threshold, self.device, self.batch_size = model, float(threshold), device, batch_size
        self.concept_prompts = concept_prompts or [f"a photo of {concept}", f"an image showing {concept}"]
        self.neutral_prompts = neutral_prompts or [f"a photo of {neutral}", f"an image showing {neutral}"]
        self.name = f"clip-{model}"
        self._weights = describe_weights(model, pretrained)
        tag = None if "sha256" in self._weights else pretrained  # a file is loaded below, by auditkit
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=tag, device=device)
        except RuntimeError as exc:  # unknown model name
            raise BadInput(None, f"open_clip cannot build {model!r} ({' '.join(str(exc).split())[:160]})") from None
        except (OSError, ValueError) as exc:  # a tag that needs the network, or a bad checkpoint
            raise BadInput(pretrained, f"cannot load CLIP weights ({' '.join(str(exc).split())[:160]}); "
                                       "give a local .safetensors checkpoint") from None
        if "sha256" in self._weights:
            _load_weights(net, Path(pretrained), model)
        self._net, self._preprocess = net.eval(), preprocess
        tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            text = net.encode_text(tokenizer(self.concept_prompts + self.neutral_prompts).to(device)).float()
        self._text = text / text.norm(dim=-1, keepdim=True)
        self._torch = torch

    def profile(self) -> dict:
        return {"name": self.name, "kind": "clip-zero-shot", "open_clip_version": metadata.version("open_clip_torch"),
                "model": self.model_name, **self._weights, "concept_prompts": self.concept_prompts,
                "neutral_prompts": self.neutral_prompts, "threshold": self.threshold,
                "score": "softmax mass on concept prompts"}

    def embed(self, images) -> np.ndarray:
        """Unit-norm CLIP image embeddings (N × d), e.g. to compare two renderings of one prompt."""
        from PIL import Image

        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                batch = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images[i: i + self.batch_size]]
                x = torch.stack([self._preprocess(im) for im in batch]).to(self.device)
                feats = self._net.encode_image(x).float()
                out.append((feats / feats.norm(dim=-1, keepdim=True)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self._text.shape[1]), np.float32)

    def score(self, images) -> np.ndarray:
        if len(images) == 0:
            return np.zeros(0)
        torch = self._torch
        feats = torch.from_numpy(self.embed(images)).to(self.device)
        with torch.no_grad():
            logits = self._net.logit_scale.exp().float() * feats @ self._text.T
            probs = torch.softmax(logits, dim=-1)
        return probs[:, :len(self.concept_prompts)].sum(dim=-1).cpu().numpy().astype(float)

    def flag(self, images) -> np.ndarray:
        return self.score(images) >= self.threshold


def describe_weights(model: str, pretrained: str | None) -> dict:
    """What ``pretrained`` names for open_clip model ``model``, checked before open_clip sees either: a local
    ``.safetensors`` file (any case; with its SHA-256), an open_clip pretrained tag of ``model``, or None
    (random weights). Anything else is a one-line :class:`BadInput`, never a file handed to open_clip,
    whose loader unpickles every file not named ``*.safetensors`` with ``torch.load``."""
    import open_clip

    if ":" in model:  # open_clip's hf-hub:/local-dir: schemas fetch or pick weight files themselves (.bin too)
        raise BadInput(None, f"CLIP model {model!r}: give one of open_clip's built-in model names (no "
                             "'hf-hub:' or 'local-dir:'), with local weights in --clip-weights")
    if pretrained is None:
        return {"pretrained": None, "note": "randomly initialised (tests only)"}
    path = Path(pretrained)
    if path.suffix.lower() == ".safetensors":
        return {"pretrained": str(path), "sha256": open_safetensors(path).sha256}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInput(path, "pickle checkpoints are refused (never unpickled); convert the CLIP weights to "
                             ".safetensors")
    if pretrained in open_clip.list_pretrained_tags_by_model(model):
        return {"pretrained": pretrained}
    raise BadInput(path, f"CLIP weights must be a local .safetensors file or an open_clip pretrained tag of "
                         f"{model!r}; auditkit loads nothing else (a pickle is never unpickled)")


def _load_weights(net, path: Path, model: str) -> None:
    """Load the safetensors checkpoint ``path`` into open_clip model ``net`` (every tensor, exactly)."""
    import torch

    weights = open_safetensors(path)
    state = {name: torch.from_numpy(np.array(weights.array(name))) for name in weights.tensors}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadInput(path, f"these CLIP weights do not fit {model!r} ({' '.join(str(exc).split())[:160]})") from None
