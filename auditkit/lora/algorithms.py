"""Adapter algorithms (LoRA/LoCon, LyCORIS LoHa, LoKr, full diff) put in one exact low-rank form.

Every algorithm's update is written exactly as ΔW = up @ down (times the file's scale), with conv
kernels flattened (``down`` is k × in·kh·kw). The algebra that makes this exact:

* **LoRA / LoCon**: up (out×r) @ down (r×in). With a Tucker core (``lora_mid``, r×r×kh×kw) the core
  folds into the down factor: down'[i, (c,h,w)] = Σⱼ mid[i,j,h,w] · down[j,c]; rank stays r.
* **LoHa**: (B₁A₁) ⊙ (B₂A₂) = (B₁ ⊠ B₂) · (A₁ ⊙ A₂), with ⊠ the row-wise (face-splitting) and ⊙
  the column-wise Khatri–Rao product: rank ≤ r₁·r₂. ``hada_t1``/``hada_t2`` Tucker cores fold into
  each half's down factor as for LoCon.
* **LoKr**: kron(W₁, W₂) = kron(B₁, B₂) · kron(A₁, A₂) for any factorisations Wᵢ = BᵢAᵢ (the
  mixed-product property). A factor stored whole is split by its own (small) SVD; a conv W₂ is
  flattened to c × d·kh·kw, which is where its kernel columns land in the Kronecker product. The
  halves are kept apart: the SVD of a Kronecker product is the Kronecker product of the halves'
  SVDs (:func:`auditkit.analysis.factors.kronecker_svd`), so the static scan never forms the
  rank-k₁k₂ factors.
* **full** (``diff``): the dense ΔW itself, split by an SVD.

A factor form whose rank reaches min(out, in) saves nothing over the dense matrix, so it is
replaced by the SVD of the dense update (form ``dense``). Each module records the form used.
Every function here is checked against ``lycoris-lora``'s own reconstruction in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np


class Incomplete(Exception):
    """A module lacks parts its algorithm needs (e.g. a down factor without its up factor)."""


@dataclass(frozen=True)
class Built:
    down: np.ndarray | None  # k × in·kh·kw (None when held as ``kron``)
    up: np.ndarray | None  # out × k
    form: str  # "factors", "khatri-rao", "kronecker" or "dense"
    scale_rank: int | None  # the rank an alpha divides by; None: alpha is ignored (scale 1)
    kron: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # up₁, down₁, up₂, down₂


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1)


def tucker_down(core: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Fold a Tucker core (r×r×kh×kw) into a down factor (r×in): r × in·kh·kw."""
    down = _flat(down)
    return np.einsum("ijhw,jc->ichw", core, down).reshape(core.shape[0], -1)


def split_dense(w: np.ndarray, rtol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """w = up @ down from an SVD (up = U·S, down = Vᵀ), dropping numerically zero directions."""
    w = np.asarray(w, dtype=np.float64)
    if w.size == 0:
        return np.zeros((0, w.shape[1])), np.zeros((w.shape[0], 0))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    keep = s > (s[0] * rtol if s.size and s[0] > 0 else np.inf)
    return vt[keep], u[:, keep] * s[keep]


def khatri_rao(up1, down1, up2, down2) -> tuple[np.ndarray, np.ndarray]:
    """Factors of (up1 @ down1) ⊙ (up2 @ down2): (r₁r₂ × in, out × r₁r₂), in float32 at least (NumPy
    multiplies float16 arrays element by element in software, ~10x slower)."""
    up1, down1, up2, down2 = (np.asarray(x, dtype=np.result_type(x, np.float32)) for x in (up1, down1, up2, down2))
    up = (up1[:, :, None] * up2[:, None, :]).reshape(up1.shape[0], -1)
    down = (down1[:, None, :] * down2[None, :, :]).reshape(-1, down1.shape[1])
    return down, up


def compact(down: np.ndarray, up: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Keep the factor form unless its rank reaches min(out, in); then the dense update's SVD."""
    if down.shape[0] < min(up.shape[0], down.shape[1]):
        return down, up, form
    d, u = split_dense(up @ down)
    return d, u, "dense"


# --- per algorithm: the output/input size from the header shapes, and the exact factors -----------


def _lora_shape(s: Mapping[str, tuple]) -> tuple[int, int]:
    if "down" not in s or "up" not in s:
        raise Incomplete("needs both the down and the up factor")
    down, up, mid = s["down"], s["up"], s.get("mid")
    rank = down[0]
    if len(up) < 2 or up[1] != rank or math.prod(up[2:]) != 1 or len(down) < 2:
        raise ValueError(f"down {list(down)} and up {list(up)} do not chain")
    kernel = mid[2:] if mid is not None else down[2:]
    if mid is not None and (len(mid) != 4 or mid[0] != up[1] or mid[1] != rank or math.prod(down[2:]) != 1):
        raise ValueError(f"mid {list(mid)} does not chain down {list(down)} and up {list(up)}")
    return up[0], down[1] * math.prod(kernel)


def _lora_build(a: Mapping[str, np.ndarray]) -> Built:
    up = _flat(a["up"])
    down = tucker_down(a["mid"], a["down"]) if "mid" in a else _flat(a["down"])
    return Built(down, up, "factors", int(a["down"].shape[0]))


def _loha_halves(a: Mapping[str, np.ndarray]):
    """(up, down) of each Hadamard half. Tucker halves store hada_wN_a as r × out, r × in."""
    halves = []
    for n in ("1", "2"):
        wa, wb = a[f"hada_w{n}_a"], a[f"hada_w{n}_b"]
        t = a.get(f"hada_t{n}")
        if t is None:
            halves.append((_flat(wa), _flat(wb)))
        else:
            halves.append((wa.T, tucker_down(t, wb)))
    return halves


def _loha_shape(s: Mapping[str, tuple]) -> tuple[int, int]:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if any(p not in s for p in need):
        raise Incomplete("needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    sizes = set()
    for n in ("1", "2"):
        wa, wb, t = s[f"hada_w{n}_a"], s[f"hada_w{n}_b"], s.get(f"hada_t{n}")
        if t is None:
            if len(wa) != 2 or wa[1] != wb[0]:
                raise ValueError(f"hada_w{n}_a {list(wa)} and hada_w{n}_b {list(wb)} do not chain")
            sizes.add((wa[0], math.prod(wb[1:])))
        else:
            if len(t) < 2 or t[0] != wa[0] or t[1] != wb[0]:
                raise ValueError(f"hada_t{n} {list(t)} does not chain hada_w{n}_a {list(wa)}, hada_w{n}_b {list(wb)}")
            sizes.add((wa[1], wb[1] * math.prod(t[2:])))
    if len(sizes) != 1:
        raise ValueError(f"the two Hadamard halves have different shapes {sorted(sizes)}")
    return sizes.pop()


def _loha_build(a: Mapping[str, np.ndarray]) -> Built:
    (u1, d1), (u2, d2) = _loha_halves(a)
    down, up = khatri_rao(u1, d1, u2, d2)
    return Built(down, up, "khatri-rao", int(a["hada_w1_b"].shape[0]))


def _lokr_half(a: Mapping[str, np.ndarray], n: str) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) of kron half n, flattened; a whole matrix is split by its SVD."""
    if f"lokr_w{n}" in a:
        down, up = split_dense(_flat(a[f"lokr_w{n}"]))
        return up, down
    wa, wb = a[f"lokr_w{n}_a"], a[f"lokr_w{n}_b"]
    if n == "2" and "lokr_t2" in a:
        return wa.T, tucker_down(a["lokr_t2"], wb)
    return _flat(wa), _flat(wb)


def _lokr_half_shape(s: Mapping[str, tuple], n: str) -> tuple[int, int]:
    if f"lokr_w{n}" in s:
        w = s[f"lokr_w{n}"]
        return w[0], math.prod(w[1:])
    if f"lokr_w{n}_a" not in s or f"lokr_w{n}_b" not in s:
        raise Incomplete(f"needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b")
    wa, wb = s[f"lokr_w{n}_a"], s[f"lokr_w{n}_b"]
    if n == "2" and "lokr_t2" in s:
        t = s["lokr_t2"]
        if len(t) < 2 or t[0] != wa[0] or t[1] != wb[0]:
            raise ValueError(f"lokr_t2 {list(t)} does not chain lokr_w2_a {list(wa)} and lokr_w2_b {list(wb)}")
        return wa[1], wb[1] * math.prod(t[2:])
    if len(wa) != 2 or wa[1] != wb[0]:
        raise ValueError(f"lokr_w{n}_a {list(wa)} and lokr_w{n}_b {list(wb)} do not chain")
    return wa[0], math.prod(wb[1:])


def _lokr_shape(s: Mapping[str, tuple]) -> tuple[int, int]:
    (o1, i1), (o2, i2) = _lokr_half_shape(s, "1"), _lokr_half_shape(s, "2")
    return o1 * o2, i1 * i2


def _lokr_build(a: Mapping[str, np.ndarray]) -> Built:
    u1, d1 = _lokr_half(a, "1")
    u2, d2 = _lokr_half(a, "2")
    # lycoris: the rank alpha divides by is w1_a's, else w2_a's; with both halves whole, alpha is ignored
    if "lokr_w1_a" in a:
        rank = int(a["lokr_w1_a"].shape[1])
    elif "lokr_w2_a" in a:
        rank = int(a["lokr_w2_a"].shape[1] if "lokr_t2" not in a else a["lokr_w2_a"].shape[0])
    else:
        rank = None
    return Built(None, None, "kronecker", rank, (u1, d1, u2, d2))


def _full_shape(s: Mapping[str, tuple]) -> tuple[int, int]:
    if "diff" not in s:
        raise Incomplete("a bias difference (diff_b) without the weight difference (diff)")
    return s["diff"][0], math.prod(s["diff"][1:])


def _full_build(a: Mapping[str, np.ndarray]) -> Built:
    down, up = split_dense(_flat(a["diff"]))
    return Built(down, up, "dense", None)


@dataclass(frozen=True)
class Algorithm:
    """One adapter algorithm: the parts it owns and how they become exact factors.

    Adding an algorithm is one record in :data:`ALGORITHMS` (its part names also go in
    :data:`auditkit.lora.formats.SUFFIX_PARTS`).
    """

    name: str
    label: str
    owns: frozenset[str]  # part names only this algorithm uses
    shape: Callable[[Mapping[str, tuple]], tuple[int, int]]  # header shapes -> (out, in·kh·kw)
    build: Callable[[Mapping[str, np.ndarray]], Built]


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("lora", "LoRA/LoCon", frozenset({"down", "up", "mid"}), _lora_shape, _lora_build),
    Algorithm("loha", "LyCORIS LoHa", frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                                                  "hada_t2"}), _loha_shape, _loha_build),
    Algorithm("lokr", "LyCORIS LoKr", frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                                                  "lokr_w2_b", "lokr_t2"}), _lokr_shape, _lokr_build),
    Algorithm("full", "LyCORIS full (diff)", frozenset({"diff"}), _full_shape, _full_build),
)}
# Parts any algorithm may carry: the scale, DoRA's magnitude, a bias update.
SHARED_PARTS = frozenset({"alpha", "magnitude", "bias"})


def algorithm_of(parts) -> Algorithm:
    """The algorithm whose parts a module has; ValueError when they mix algorithms."""
    found = [a for a in ALGORITHMS.values() if a.owns & set(parts)]
    if len(found) > 1:
        raise ValueError("mixes parts of " + " and ".join(a.label for a in found))
    if not found:
        if "bias" in parts:
            return ALGORITHMS["full"]  # a lone diff_b: reported as incomplete by full's shape rule
        raise Incomplete("has no weight factors")
    return found[0]


def dora_update(w0: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, axis: str) -> np.ndarray:
    """DoRA's exact update at multiplier 1: m · (W₀ + ΔW) / ‖W₀ + ΔW‖ − W₀.

    Norms per output row (``axis="out"``: peft, and lycoris' default ``wd_on_out``) or per input
    channel (``"in"``: over the output rows and, for a conv, its kernel positions). ``w0`` and
    ``delta`` are flattened (out × in·kh·kw); ``magnitude`` has one entry per row or channel.
    """
    w = w0 + delta
    m = magnitude.reshape(-1)
    if axis == "out":
        norm = np.linalg.norm(w, axis=1)[:, None]
        return m[:, None] * w / np.where(norm > 0, norm, 1.0) - w0
    grouped = w.reshape(w.shape[0], m.size, -1)  # out × in × kh·kw
    norm = np.sqrt(np.sum(grouped**2, axis=(0, 2)))[None, :, None]
    return (m[None, :, None] * grouped / np.where(norm > 0, norm, 1.0)).reshape(w.shape) - w0
