"""No command overwrites its inputs: the path guards on their own (the CLI wiring is tested per command)."""

from __future__ import annotations

import os

import pytest

from ordermerge.storage.guards import OverlapError, refuse_duplicates, refuse_overlap


@pytest.mark.parametrize("out, relation", [
    ("run0", "is"),
    ("run0/sub", "lies inside"),
    (".", "contains"),
    ("x/../run0", "is"),
])
def test_overlap_is_refused_with_both_paths(tmp_path, out, relation):
    (tmp_path / "run0").mkdir()
    (tmp_path / "x").mkdir()
    os.chdir(tmp_path)
    with pytest.raises(OverlapError) as exc:
        refuse_overlap("merge", {"--out": out}, {"MODEL_DIR": ["run1", "run0"]})
    msg = str(exc.value)
    assert relation in msg and out in msg and "run0" in msg and "Nothing was written" in msg


def test_symlink_to_an_input_is_refused(tmp_path):
    (tmp_path / "run0").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run0")
    with pytest.raises(OverlapError, match="is the input"):
        refuse_overlap("merge", {"--out": tmp_path / "link"}, {"MODEL_DIR": [tmp_path / "run0"]})


def test_siblings_and_prefix_names_pass(tmp_path):
    # run0-merged shares a prefix with run0 but is not inside it
    refuse_overlap("merge", {"--out": tmp_path / "run0-merged"}, {"MODEL_DIR": [tmp_path / "run0", tmp_path / "run1"]})
    refuse_overlap("evaluate", {"--out": None}, {"--val": tmp_path / "v.jsonl"})


def test_duplicate_paths_and_duplicate_contents(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(OverlapError, match="same directory"):
        refuse_duplicates("merge", [tmp_path / "a", tmp_path / "b", f"{tmp_path}/b/../a"])
    with pytest.raises(OverlapError, match="same sha256"):
        refuse_duplicates("merge", ["a", "b", "c"], ["d1", "d2", "d1"])
    refuse_duplicates("merge", ["a", "b"], ["d1", "d2"])
