"""Attribute accuracy of lab images against their prompts (shared by the lab benchmarks)."""

import numpy as np

from auditkit.lab.adherence import attribute_accuracy
from auditkit.lab.detector import HEADS


class FakeDetector:
    """Returns one-hot probabilities for fixed predictions (shape, colour, style) per image."""

    def __init__(self, predictions):
        self.predictions = predictions

    def probabilities(self, images):
        out = {}
        for head, classes in HEADS.items():
            p = np.zeros((len(self.predictions), len(classes)))
            for i, pred in enumerate(self.predictions):
                p[i, classes.index(pred[head])] = 1.0
            out[head] = p
        return out


def test_attribute_accuracy_counts_each_head_and_plain_style():
    shape, other = HEADS["shape"][0], HEADS["shape"][1]
    red, blue = HEADS["colour"][0], HEADS["colour"][1]
    styles = [s for s in HEADS["style"] if s != "neon"]
    preds = [{"shape": shape, "colour": red, "style": "neon"},
             {"shape": shape, "colour": blue, "style": "neon"},
             {"shape": other, "colour": red, "style": styles[0]},
             {"shape": shape, "colour": red, "style": styles[0]}]
    det = FakeDetector(preds)
    neon = attribute_accuracy(det, None, [shape] * 4, "neon", [red] * 4)
    assert neon == {"shape_and_style": 0.5, "shape": 0.75, "style": 0.5, "colour": 0.75, "all": 0.25}
    plain = attribute_accuracy(det, None, [shape] * 4, "plain")
    assert plain == {"shape_and_style": 0.25, "shape": 0.75, "style": 0.5}  # no colours asked: no colour keys
