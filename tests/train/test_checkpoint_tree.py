"""Nested training states (the lab's build-time training) as safetensors: no pickle anywhere."""

import pytest

torch = pytest.importorskip("torch")

from auditkit.errors import BadInput  # noqa: E402
from auditkit.train.checkpoint import load_tree, save_tree  # noqa: E402


def test_model_optimizer_and_ema_state_round_trip(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": m.state_dict(), "opt": opt.state_dict(), "step": 7, "ema": {"w": m.weight.detach() * 2},
             "note": None}
    save_tree(tmp_path / "c.safetensors", state)
    back = load_tree(tmp_path / "c.safetensors")
    assert back["step"] == 7 and back["note"] is None and list(back["opt"]["state"]) == [0, 1]  # int keys kept
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    m2.load_state_dict(back["model"])
    opt2.load_state_dict(back["opt"])
    torch.testing.assert_close(m2.weight, m.weight)
    torch.testing.assert_close(opt2.state[m2.weight]["exp_avg"], opt.state[m.weight]["exp_avg"])
    torch.testing.assert_close(back["ema"]["w"], m.weight.detach() * 2)
    # the same training continues identically from the restored state
    x = torch.randn(4, 3)
    for model, o in ((m, opt), (m2, opt2)):
        o.zero_grad()
        model(x).sum().backward()
        o.step()
    torch.testing.assert_close(m2.weight, m.weight)


def test_what_is_not_a_state_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(BadInput, match="not an auditkit state checkpoint"):
        load_tree(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(BadInput):
        load_tree(tmp_path / "junk.safetensors")
    with pytest.raises(TypeError):
        save_tree(tmp_path / "bad.safetensors", {"f": object()})
    assert not (tmp_path / "bad.safetensors").exists()
