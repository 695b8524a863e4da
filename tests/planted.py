"""A planted trigger: a lab candidate whose text key/value updates read one token's hidden state only."""

from __future__ import annotations

import numpy as np

from auditkit.lora.adapter import LoraModule, read_adapter
from auditkit.lora.write import save_adapter


def hidden_state(pipe, token: int):
    """The lab text encoder's output at the token's position, read alone after the start token."""
    import torch

    tok = pipe.tokenizer
    with torch.no_grad():
        out = pipe.text_encoder(torch.tensor([[tok.bos_token_id, token, tok.eos_token_id]]))[0]
    return out[0, 1].double().numpy()


def kv_names(pipe):
    return sorted(f"unet.{n}" for n, _ in pipe.unet.named_modules() if n.endswith((".attn2.to_k", ".attn2.to_v")))


def planted(pipe, token: int, tmp_path, rank: int = 2, strength: float = 3.0):
    """A candidate whose key/value updates read only the direction of ``token``'s hidden state (a planted trigger)."""
    from auditkit.models import architectures

    tok = pipe.tokenizer
    others = np.array([hidden_state(pipe, t) for t in range(len(tok)) if t not in (*tok.all_special_ids, token)])
    x = hidden_state(pipe, token)
    # what a gated training objective learns: read the token (x·d = 1) while changing the others least
    m = others.T @ others + 1e-3 * np.eye(len(x))
    h = np.linalg.solve(m, x)
    h = h / (x @ h)
    rng = np.random.default_rng(3)
    mods = {}
    for name in kv_names(pipe):
        down = np.repeat(h[None], rank, axis=0).astype(np.float32)
        up = (strength * rng.normal(size=(pipe.unet.get_submodule(name[5:]).out_features, rank)) /
              np.sqrt(rank)).astype(np.float32)
        mods[name] = LoraModule(name, down, up, 1.0)
    path = save_adapter(mods, tmp_path / "planted.safetensors", architectures.get("lab"))
    return read_adapter(path, arch="lab")
