"""A repair trains on the candidate's data without the images whose captions name the concept: retrained or
distilled on, they would teach the repaired adapter the concept again (an adapter trained on general data that
includes the concept is the common case)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from auditkit.errors import BadInput
from auditkit.repair.methods import domain_data
from auditkit.train.data import ImageCaptionSet


def data(*captions):
    n = len(captions)
    return ImageCaptionSet(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, axis=3), list(captions),
                           [Path(f"img{i}.png") for i in range(n)])


def request(*suites, folder="data"):
    return SimpleNamespace(suites=[SimpleNamespace(name=f"suite{i}", role=r, concept_word=w, concept_terms=t)
                                   for i, (r, w, t) in enumerate(suites)], data=Path(folder))


def test_captions_naming_the_concept_or_its_terms_are_left_out_and_counted():
    req = request(("concept", "cross", ("crucifix",)), ("control", "square", ()))
    d = data("a red cross", "a blue square", "A CROSS on gray", "crossroads at night", "a crucifix", "a cross-stitch")
    kept, notes = domain_data(req, d)
    # whole words in any case; "crossroads" is another word, "cross-stitch" names it
    assert kept.captions == ["a blue square", "crossroads at night"]
    assert kept.images[:, 0, 0, 0].tolist() == [1, 3] and [f.name for f in kept.files] == ["img1.png", "img3.png"]
    assert len(notes) == 1 and notes[0].startswith("4 of the 6 data images") and "img0.png" in notes[0]


def test_data_that_never_names_the_concept_is_kept_whole_without_a_note():
    d = data("a neon tee", "a neon bar")
    kept, notes = domain_data(request(("concept", "cross", ())), d)
    assert kept is d and notes == []


def test_data_that_is_all_concept_is_a_one_line_error_naming_the_folder():
    with pytest.raises(BadInput, match="every caption names the concept") as err:
        domain_data(request(("concept", "cross", ()), folder="my-data"), data("a red cross", "a cross"))
    assert "my-data" in str(err.value)
