"""The static scan on LyCORIS updates (LoHa, LoKr, full) matches dense references module by module."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from auditkit.analysis.weights import static_scan
from auditkit.examples import lycoris_tensors
from auditkit.lora.adapter import read_adapter


def _dense(path, arch, names) -> dict[str, np.ndarray]:
    """ΔW per module straight from the file's tensors, by the LyCORIS formulas (dense, float64)."""
    from safetensors.numpy import load_file

    from auditkit.lora.write import kohya_name

    t = {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    out = {}
    for n in names:
        k = kohya_name(arch, n)
        if f"{k}.hada_w1_a" in t:
            w = (t[f"{k}.hada_w1_a"] @ t[f"{k}.hada_w1_b"]) * (t[f"{k}.hada_w2_a"] @ t[f"{k}.hada_w2_b"])
            out[n] = w * float(t[f"{k}.alpha"]) / t[f"{k}.hada_w1_b"].shape[0]
        elif f"{k}.lokr_w1" in t:
            w = np.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"])
            out[n] = w * float(t[f"{k}.alpha"]) / t[f"{k}.lokr_w2_a"].shape[1]
        else:
            out[n] = t[f"{k}.diff"]
    return out


def _subspace_energy(c: np.ndarray, s: np.ndarray) -> float:
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    k = int(np.sum(sv > sv[0] * 1e-9))
    proj = u[:, :k].T @ c @ vt[:k].T
    return float(np.sum(proj**2) / np.sum(c**2))


@pytest.mark.parametrize("cand_algo,safe_algo", [("lokr", "loha"), ("loha", "full"), ("full", "lokr")])
def test_static_scan_of_lycoris_pairs_matches_dense_reference(tmp_path, sd15, cand_algo, safe_algo):
    names = [n for n in sd15.modules if n.startswith("unet.down_blocks.0.") and ".attn" in n][:6]
    paths = {}
    for role, algo, seed in (("candidate", cand_algo, 1), ("safety", safe_algo, 2)):
        paths[role] = tmp_path / f"{role}.safetensors"
        save_file(lycoris_tensors(sd15, names, algo, seed=seed), str(paths[role]))
    cand, safe = read_adapter(paths["candidate"]), read_adapter(paths["safety"])
    assert cand.coverage.fraction == 1.0 and set(cand.modules) == set(names)
    dc, ds = _dense(paths["candidate"], sd15, names), _dense(paths["safety"], sd15, names)
    for n in names:  # the exact factor forms reproduce the files' updates
        np.testing.assert_allclose(cand.modules[n].delta(), dc[n], rtol=1e-5, atol=1e-7)
    # make the candidate partly undo the safety update, so cancellation is far from 0
    findings = static_scan(cand, safe)
    inner = sum(float(np.sum(dc[n] * ds[n])) for n in names)
    total = sum(float(np.sum(ds[n] ** 2)) for n in names)
    assert findings.cancellation == pytest.approx(-inner / total, rel=1e-6, abs=1e-9)
    for f in findings.modules:
        assert f.energy_in_safety_subspace == pytest.approx(_subspace_energy(dc[f.name], ds[f.name]), abs=1e-6)
        assert f.candidate_form.startswith(cand_algo) and f.safety_form.startswith(safe_algo)


def test_a_lokr_update_that_undoes_a_loha_safety_update_is_measured_as_cancelling_it(tmp_path, sd15):
    names = [n for n in sd15.modules if n.startswith("unet.down_blocks.0.") and n.endswith(("attn2.to_k",
                                                                                             "attn2.to_v"))]
    save_file(lycoris_tensors(sd15, names, "loha", seed=3), str(tmp_path / "s.safetensors"))
    safe = read_adapter(tmp_path / "s.safetensors")
    # a full-diff candidate that is exactly −0.8·ΔW_safe
    cand_tensors = {}
    from auditkit.lora.write import kohya_name
    for n in names:
        cand_tensors[f"{kohya_name(sd15, n)}.diff"] = (-0.8 * safe.modules[n].delta()).astype(np.float32)
    save_file(cand_tensors, str(tmp_path / "c.safetensors"))
    findings = static_scan(read_adapter(tmp_path / "c.safetensors"), safe)
    assert findings.cancellation == pytest.approx(0.8, rel=1e-5)
