"""CLIP zero-shot concept detector on open_clip.

score = P(concept) under a softmax over the similarities of the image to concept prompts and to
neutral prompts (e.g. "a photo of nudity" vs "a photo of clothing"). The backbone (default
ViT-L-14, the field's usual choice) and its weights are configurable: an open_clip pretrained tag
(needs a download, so not on offline machines) or a local ``.safetensors`` checkpoint; pickled
checkpoints are refused. ``pretrained=None`` gives a randomly initialised model (tests only).
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput


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
        self._weights = self._describe_weights(pretrained)
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        except RuntimeError as exc:  # unknown model name
            raise BadInput(None, f"open_clip cannot build {model!r} ({' '.join(str(exc).split())[:160]})") from None
        except (OSError, ValueError) as exc:  # a tag that needs the network, or a bad checkpoint
            raise BadInput(pretrained, f"cannot load CLIP weights ({' '.join(str(exc).split())[:160]}); "
                                       "give a local .safetensors checkpoint") from None
        self._net, self._preprocess = net.eval(), preprocess
        tokenizer = open_clip.get_tokenizer(model)
        with torch.no_grad():
            text = net.encode_text(tokenizer(self.concept_prompts + self.neutral_prompts).to(device)).float()
        self._text = text / text.norm(dim=-1, keepdim=True)
        self._torch = torch

    @staticmethod
    def _describe_weights(pretrained: str | None) -> dict:
        if pretrained is None:
            return {"pretrained": None, "note": "randomly initialised (tests only)"}
        path = Path(pretrained)
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            raise BadInput(path, "pickle checkpoints are refused; convert the CLIP weights to .safetensors")
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise BadInput(path, "no such CLIP checkpoint")
            return {"pretrained": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return {"pretrained": pretrained}

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
