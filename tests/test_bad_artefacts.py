"""Bad artefacts: broken checkpoints fed to evaluate and sample-losses, broken prepared datasets fed to
fine-tune, evaluate and sample-losses. Each is refused with an error that names the file and the fix,
and nothing is written. (Broken merge inputs: tests/test_merge_cli.py.)

Handling, as documented in docs/reliability.md: a prepared split with an empty
response, a duplicate sample_id, a line that is not JSON, or a sample longer than the task's
max_length (it would be truncated, down to no scored token) is refused, not repaired: prepare-data
never writes such a file, so one means the file was edited, truncated or prepared for another config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TASK_SPEC, train_cfg, write_train
from ordermerge.data.orders import make_order, save_order
from ordermerge.scoring.evaluate import evaluate_model
from ordermerge.scoring.losses import sample_losses_stage
from ordermerge.storage.checkpoint import CheckpointError
from ordermerge.train.loop import fine_tune

EVAL_CFG = {"batch_size": 4, "max_new_tokens": 4}
NORM, DOWN = "model.norm.weight", "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("artefacts")
    return {"dir": d, "base": tiny_base, "data": write_train(d / "data.jsonl", 8)}


# Checkpoints ----------------------------------------------------------------------------------------


def _edit_weights(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _truncate(d: Path) -> None:
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])


def _corrupt_header(d: Path) -> None:
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:20] = b"{not json!!!"
    p.write_bytes(bytes(raw))


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


# case -> (how to break a copy of the base, substrings the error must contain besides the path)
CHECKPOINT_CASES = {
    "truncated": (_truncate, ["model.safetensors", "truncated or corrupt", "re-create"]),
    "corrupt-header": (_corrupt_header, ["model.safetensors", "bad header", "re-create"]),
    "wrong-shape": (
        lambda d: _edit_weights(d / "model.safetensors", lambda s: s.update({NORM: s[NORM][:-1].clone()})),
        [NORM, "shape [31]", "needs [32]", "re-create"],
    ),
    "wrong-dtype": (
        lambda d: _edit_weights(d / "model.safetensors", lambda s: s.update({NORM: s[NORM].half()})),
        [NORM, "F16", "config.json says bfloat16", "re-create"],
    ),
    "integer-dtype": (
        lambda d: _edit_weights(d / "model.safetensors", lambda s: s.update({DOWN: s[DOWN].to(torch.int8)})),
        [DOWN, "I8", "re-create"],
    ),
    "missing-tensor": (
        lambda d: _edit_weights(d / "model.safetensors", lambda s: s.pop(DOWN)),
        ["1 tensors the config needs are missing", DOWN, "re-create"],
    ),
    "pickle-only": (_pickle_only, ["never unpickles", "safe_serialization=True"]),
}
CONSUMERS = ["evaluate", "sample-losses"]


def _consume(consumer: str, model_dir: Path, data: Path, out: Path) -> None:
    if consumer == "evaluate":
        evaluate_model(
            model_dir,
            str(data),
            str(data),
            TASK_SPEC,
            EVAL_CFG,
            out / "m.json",
            out / "g.jsonl",
            {"run": 0},
            out / "val_losses.csv",
        )
    elif consumer == "sample-losses":
        sample_losses_stage(model_dir, {"train": str(data)}, TASK_SPEC, 4, out / "losses.csv")
    else:
        raise AssertionError(consumer)


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_broken_checkpoint_is_refused_naming_file_and_fix(tiny, tmp_path, case, consumer):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["base"], broken)
    make, expected = CHECKPOINT_CASES[case]
    make(broken)
    out = tmp_path / "results"
    with pytest.raises(CheckpointError) as info:
        _consume(consumer, broken, tiny["data"], out)
    for part in [str(broken), *expected]:
        assert part in str(info.value), f"{part!r} missing from: {info.value}"
    assert not out.exists(), "nothing may be written for a refused checkpoint"


def test_intact_checkpoint_passes_the_same_checks(tiny, tmp_path):
    """The checks are not over-eager: the unbroken base (tied head stored once) is evaluated."""
    out = tmp_path / "results"
    _consume("evaluate", tiny["base"], tiny["data"], out)
    _consume("sample-losses", tiny["base"], tiny["data"], out)
    assert json.loads((out / "m.json").read_text())["n_val"] == 8 and (out / "losses.csv").exists()


# Prepared datasets --------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _empty_response(rows):
    rows[3]["response"] = ""
    return rows, "", [":4:", "t-003", "empty response"]


def _blank_response(rows):
    rows[5]["response"] = "  \n "
    return rows, "", [":6:", "t-005", "empty response"]


def _duplicate_id(rows):
    rows[6]["sample_id"] = rows[1]["sample_id"]
    return rows, "", [":7:", "duplicate sample_id 't-001'", "first on line 2"]


def _over_long(rows):
    rows[2]["prompt"] = "Why? " * 40
    return rows, "", ["t-002", "over max_length 96", "re-run it with this max_length", "raise tasks.<task>.max_length"]


def _truncated_file(rows):
    return rows[:7], json.dumps(rows[7])[:25], [":8:", "not JSON", "truncated or corrupt"]


DATASET_CASES = {
    "empty-response": _empty_response,
    "blank-response": _blank_response,
    "duplicate-id": _duplicate_id,
    "over-long": _over_long,
    "truncated-line": _truncated_file,
}
DATA_CONSUMERS = ["fine-tune", "evaluate", "sample-losses"]


@pytest.mark.parametrize("consumer", DATA_CONSUMERS)
@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_broken_dataset_is_refused_naming_file_and_fix(tiny, tmp_path, case, consumer):
    rows, tail, expected = DATASET_CASES[case](_rows(tiny["data"]))
    data = _write(tmp_path / "split.jsonl", rows, tail)
    out = tmp_path / "results"
    with pytest.raises(ValueError) as info:
        if consumer == "fine-tune":
            order = tmp_path / "order.npy"
            save_order(make_order(8, 1, "shuffle", 4, seed=1, task="t", run=0), order)
            fine_tune(
                tiny["base"],
                data,
                order,
                out / "run0",
                TASK_SPEC,
                train_cfg(epochs=1),
                seed=1,
                run_name="r0",
                progress=False,
            )
        else:
            _consume(consumer, tiny["base"], data, out)
    text = str(info.value)
    for part in [str(data), *expected]:
        assert part in text, f"{part!r} missing from: {text}"
    assert "re-run" in text or "raise" in text  # the fix
    assert not out.exists(), "nothing may be written for a refused dataset"


def test_the_command_line_reports_a_bad_dataset_in_one_line(tiny_base, tmp_path):
    """No traceback for bad input: one line naming the file and the fix, exit status 2."""
    import subprocess
    import sys

    model = tiny_base
    bad = tmp_path / "val.jsonl"
    bad.write_text('{"sample_id": "a", "prompt": "1+1?", "response": ""}\n')
    spec = json.dumps(TASK_SPEC)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ordermerge",
            "sample-losses",
            "--model-dir",
            str(model),
            "--split",
            f"val={bad}",
            "--task-spec",
            spec,
            "--out",
            str(tmp_path / "out.csv"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # after the model's load messages
    assert last.startswith("ordermerge sample-losses: error:") and f"{bad}:1" in last and "empty response" in last
    assert not (tmp_path / "out.csv").exists()
