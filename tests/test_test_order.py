"""The test run's own order (tests/conftest.py): the heaviest files go first so the loadfile workers end together."""

from conftest import heaviest_files_first


def test_heaviest_files_go_first_each_file_kept_together_and_in_order():
    files = ["a.py", "a.py", "b.py", "c.py", "b.py", "d.py"]
    order = heaviest_files_first(files, {"b.py": 50.0, "c.py": 10.0, "a.py": 1.0})
    assert [files[i] for i in order] == ["b.py", "b.py", "c.py", "a.py", "a.py", "d.py"]
    assert order == [2, 4, 3, 0, 1, 5]  # b's tests in their own order; the unknown file last


def test_without_timings_the_collection_order_stays():
    files = ["x.py", "y.py", "x.py"]
    assert heaviest_files_first(files, {}) == [0, 2, 1]
