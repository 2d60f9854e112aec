"""No command overwrites its inputs: the path guards on their own (the CLI wiring is tested per command)."""

from __future__ import annotations

import os

import pytest

from ordermerge.storage.guards import OverlapError, refuse_duplicates, refuse_overlap


@pytest.mark.parametrize(
    "out, relation",
    [
        ("run0", "is"),
        ("run0/sub", "lies inside"),
        (".", "contains"),
        ("x/../run0", "is"),
    ],
)
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


# --- every writing command, through the CLI: refused before anything is written ------------------


def _tree(tmp_path):
    for d in ("base", "run0", "run1", "data"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "keep.txt").write_text(d)
    for f in ("data/train.jsonl", "data/val.jsonl", "data/test.jsonl", "order.npy"):
        (tmp_path / f).write_text("x")
    return {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


CASES = {
    "merge-output-is-an-input": [
        "merge",
        "--base",
        "base",
        "--method",
        "average",
        "--force",
        "--out",
        "run0",
        "run0",
        "run1",
    ],
    "merge-output-inside-an-input": [
        "merge",
        "--base",
        "base",
        "--method",
        "select",
        "--force",
        "--out",
        "run1/m",
        "run0",
        "run1",
    ],
    "merge-output-contains-the-base": [
        "merge",
        "--base",
        "base",
        "--method",
        "average",
        "--force",
        "--out",
        ".",
        "run0",
        "run1",
    ],
    "merge-same-model-twice": ["merge", "--base", "base", "--method", "average", "--out", "m", "run0", "./run0"],
    "fine-tune-into-its-base": [
        "fine-tune",
        "--base",
        "base",
        "--train",
        "data/train.jsonl",
        "--order",
        "order.npy",
        "--out-dir",
        "base",
        "--run-name",
        "r",
        "--task-spec",
        "{}",
        "--train-cfg",
        "{}",
        "--seed",
        "0",
    ],
    "orders-over-the-train-split": [
        "orders",
        "--train",
        "data/train.jsonl",
        "--task",
        "t",
        "--scheme",
        "shuffle",
        "--run",
        "0",
        "--epochs",
        "1",
        "--batch-size",
        "1",
        "--seed",
        "0",
        "--out",
        "data/train.jsonl",
    ],
    "sample-losses-over-a-split": [
        "sample-losses",
        "--model-dir",
        "run0",
        "--split",
        "train=data/train.jsonl",
        "--task-spec",
        "{}",
        "--out",
        "data/train.jsonl",
    ],
    "evaluate-into-the-model": [
        "evaluate",
        "--model-dir",
        "run0",
        "--val",
        "data/val.jsonl",
        "--test",
        "data/test.jsonl",
        "--task-spec",
        "{}",
        "--eval-cfg",
        "{}",
        "--out",
        "run0/metrics.json",
        "--generations",
        "g.jsonl",
    ],
    "prepare-data-into-the-base": [
        "prepare-data",
        "--task",
        "t",
        "--spec",
        "{}",
        "--base",
        "base",
        "--seed",
        "0",
        "--out-dir",
        "base/data",
    ],
    "base-model-over-its-source": ["base-model", "--source", "run0", "--out", "run0"],
    "analyze-into-a-model-dir": [
        "analyze",
        "--config-json",
        '{"models": {"m": {}}}',
        "--results-dir",
        ".",
        "--out-dir",
        "m",
    ],
}


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_every_writing_command_refuses_to_overwrite_its_inputs(tmp_path, monkeypatch, capsys, argv):
    from ordermerge.cli import main

    (tmp_path / "m").mkdir()
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert f"ordermerge {argv[0]}: error:" in err and ("Nothing was written" in err or "mistake, not a merge" in err)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no input changed, nothing new written


def test_merge_refuses_two_copies_of_one_run_by_content(tmp_path, capsys):
    """Different directories, same weights: refused by the digests merge.json records; nothing written."""
    import shutil

    from helpers import fine_tuned_state, merge_base_state, save_model_dir
    from ordermerge.cli import main

    base = merge_base_state()
    save_model_dir(tmp_path / "base", base)
    save_model_dir(tmp_path / "run0", fine_tuned_state(base, 0))
    shutil.copytree(tmp_path / "run0", tmp_path / "run0-copy")
    save_model_dir(tmp_path / "run1", fine_tuned_state(base, 1))
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "merge",
                "--base",
                str(tmp_path / "base"),
                "--method",
                "average",
                "--out",
                str(tmp_path / "m"),
                str(tmp_path / "run0"),
                str(tmp_path / "run1"),
                str(tmp_path / "run0-copy"),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "same sha256" in err and "run0-copy" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".tmp-*"))
