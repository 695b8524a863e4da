"""Shared renders of an edit suite (Flux.1 Kontext): a candidate's run folder gets the suite's input image with the
shared records that name it, so its report shows the input beside the edits."""

import numpy as np

from auditkit.runlog import RunLog
from auditkit.shared import SharedRenders


def _record(key: str) -> dict:
    return {"type": "image", "config": "base", "key": key, "suite": "edit", "prompt_index": 0, "image_index": 0,
            "prompt": "a red cross", "seed": 7, "guidance": 3.5, "steps": 2, "image": f"images/base/edit/{key}.png",
            "scores": {"lab-cross": 0.1}, "flags": {"lab-cross": False}, "input_image": "inputs/edit.png"}


def test_seeding_links_the_input_image_of_an_edit_suite(tmp_path):
    from PIL import Image

    header = {"base": "b", "suites": {"edit": {"detector": "lab-cross", "input_image": "lab:2"}}, "render": {},
              "adapters": {}, "detectors": {}, "seeds": "s", "steps_override": None}
    shared_dir, run_dir = tmp_path / "shared", tmp_path / "cand"
    shared = RunLog(shared_dir)
    shared.start(header)
    for rel in ("images/base/edit/a.png", "images/base/edit/b.png", "inputs/edit.png"):
        (shared_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(shared_dir / rel)
    shared.append([_record("a"), _record("b")])
    log = RunLog(run_dir)
    log.start(header)
    assert SharedRenders(shared_dir).seed(log, header, {}) == 2
    assert (run_dir / "inputs" / "edit.png").is_file() and (run_dir / "images/base/edit/b.png").is_file()
