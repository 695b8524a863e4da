"""Training checkpoints as safetensors (never pickle): trained parameters, AdamW state, RNG states.

A checkpoint carries a fingerprint of everything that determines the training (settings, data,
frozen modules); resuming with other settings is refused. A resumed run continues the same random
streams, so it ends with the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.fsutil import atomic_write_bytes
from auditkit.lora.io import open_safetensors, serialize

SCHEMA = "auditkit.checkpoint/1"


def fingerprint(settings: dict, images: np.ndarray, captions: list[str], frozen: dict | None = None) -> str:
    """sha256 over the training settings (JSON-able), the data and any frozen (merged) modules: LoRA modules,
    or a full model's per-tensor differences (arrays)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(json.dumps(captions).encode())
    for name in sorted(frozen or {}):
        m = frozen[name]
        h.update(name.encode())
        if isinstance(m, np.ndarray):
            h.update(np.ascontiguousarray(m, np.float32).tobytes())
            continue
        h.update(np.ascontiguousarray(m.down, np.float32).tobytes())
        h.update(np.ascontiguousarray(m.up, np.float32).tobytes())
        h.update(repr(float(m.scale)).encode())
    return h.hexdigest()


@dataclass
class State:
    step: int
    losses: list[float]


def save(path: str | Path, step: int, params: list, optimizer, rng: np.random.Generator, gen, losses: list[float],
         fp: str) -> None:
    """Write the training state after ``step`` steps, atomically."""
    tensors = {f"param.{i}": p.detach().float().cpu().numpy() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = np.asarray(value.detach().float().cpu().numpy(), dtype=np.float32)
    tensors["rng.torch"] = gen.get_state().numpy().astype(np.uint8)
    meta = {"schema": SCHEMA, "step": str(step), "fingerprint": fp, "losses": json.dumps(losses),
            "rng.numpy": json.dumps(rng.bit_generator.state)}
    atomic_write_bytes(path, serialize(tensors, meta))


def saved_step(path: str | Path) -> int | None:
    """The step an auditkit checkpoint was saved at; None when there is none (or it is not one)."""
    path = Path(path)
    if not path.exists():
        return None
    st = open_safetensors(path)
    step = st.metadata.get("step", "")
    return int(step) if st.metadata.get("schema") == SCHEMA and step.isdigit() else None


def restore(path: str | Path, fp: str, params: list, optimizer, rng: np.random.Generator, gen) -> State | None:
    """Load a checkpoint into the live parameters, optimizer and RNGs; None when there is none."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    st = open_safetensors(path)
    if st.metadata.get("schema") != SCHEMA:
        raise BadInput(path, "not an auditkit training checkpoint")
    if st.metadata.get("fingerprint") != fp:
        raise BadInput(path, "checkpoint was made with other settings or data; delete it to start over")
    if sum(1 for k in st.tensors if k.startswith("param.")) != len(params):
        raise BadInput(path, "checkpoint does not match the trained parameters")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(torch.from_numpy(np.array(st.array(f"param.{i}"))).to(p.dtype))
    state = optimizer.state_dict()
    state["state"] = {}
    for i in range(len(params)):
        keys = [k for k in st.tensors if k.startswith(f"adam.{i}.")]
        if keys:
            state["state"][i] = {k.split(".", 2)[2]: torch.from_numpy(np.array(st.array(k))) for k in keys}
    optimizer.load_state_dict(state)
    gen.set_state(torch.from_numpy(np.array(st.array("rng.torch"))))
    rng.bit_generator.state = json.loads(st.metadata["rng.numpy"])
    return State(int(st.metadata["step"]), [float(x) for x in json.loads(st.metadata["losses"])])


# ------------------------------------------------------------------------------------------------
# any nested training state (model/optimizer state dicts, EMA copies, counters) as safetensors

TREE_SCHEMA = "auditkit.state/1"


def save_tree(path: str | Path, tree) -> None:
    """Write a nested state (dicts with str or int keys, lists, tuples, numbers, strings, None and
    torch tensors) as a safetensors file: tensors as entries, the structure as JSON metadata. Atomic.
    Key types survive (an optimizer's state is keyed by int), tuples come back as lists."""
    from safetensors.torch import save

    tensors: dict = {}

    def encode(node):
        if hasattr(node, "detach") and hasattr(node, "dtype"):  # a torch tensor
            name = f"t{len(tensors)}"
            tensors[name] = node.detach().cpu().contiguous().clone()
            return {"tensor": name}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in node):
                raise TypeError("state keys must be str or int")
            return {"dict": [[k, encode(v)] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"list": [encode(v) for v in node]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return {"value": node}
        raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint")

    skeleton = encode(tree)
    atomic_write_bytes(path, save(tensors, metadata={"schema": TREE_SCHEMA, "tree": json.dumps(skeleton)}))


def load_tree(path: str | Path):
    """Read a state written by :func:`save_tree` (nothing in the file can execute)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("schema") != TREE_SCHEMA:
                raise BadInput(path, "not an auditkit state checkpoint")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no items()
    except (OSError, ValueError, SafetensorError) as exc:
        raise BadInput(path, f"unreadable checkpoint ({' '.join(str(exc).split())[:120]})") from None

    def decode(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "dict" in node:
            return {k: decode(v) for k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        return node["value"]

    return decode(json.loads(meta["tree"]))
