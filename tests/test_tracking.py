"""train.report_to: TensorBoard event files hold what steps.csv holds, once per step (resume included);
unknown or missing trackers are refused before any training. Fast: the tiny Llama, CPU."""

from __future__ import annotations

import copy
import csv
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

import ordermerge.train.loop as train_mod
from helpers import TASK_SPEC, train_cfg, write_train
from ordermerge import paths
from ordermerge.config import ConfigError, validate_config
from ordermerge.data.orders import make_order, save_order
from ordermerge.train import tracking
from ordermerge.train.loop import fine_tune

ROOT = Path(__file__).resolve().parents[1]
N = 14  # batch 4: 4 steps an epoch, the last one short
STEP_TAGS = ("loss", "lr", "grad_norm", "tokens", "seconds", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: torch on one thread


@pytest.fixture(scope="module")
def tiny(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    order = make_order(N, 3, "shuffle", 4, seed=5, task="t", run=0)
    save_order(order, d / "order.npy")
    return {"base": tiny_base, "train": write_train(d / "train.jsonl", N), "order": d / "order.npy"}


def identity(results: Path) -> tracking.RunIdentity:
    log_dir = paths.Paths(str(results)).of("tensorboard", model="m", task="t", scheme="shuffle", run=0)
    return tracking.RunIdentity("m/t/shuffle", "run0", Path(log_dir))


def run(tiny, out: Path, ident, **cfg) -> Path:
    fine_tune(
        tiny["base"],
        tiny["train"],
        tiny["order"],
        out,
        TASK_SPEC,
        train_cfg(**cfg),
        seed=1,
        run_name="r0",
        progress=False,
        tracker_identity=ident,
    )
    return out


def steps_csv(out: Path) -> list[dict]:
    with open(out / "steps.csv") as fh:
        return list(csv.DictReader(fh))


# A TFRecord reader: [uint64 length][uint32 crc of length][payload][uint32 crc of payload] ...
def records(path: Path):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        pos += 12
        yield data[pos : pos + length]
        pos += length + 4
    assert pos == len(data), f"{path}: a truncated record"


def scalars(log_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] over the directory's event files in the order written; ``purge``: as
    TensorBoard reads them, a SessionLog START at step s drops the values logged before at steps >= s."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(log_dir.glob("events.out.tfevents.*")):
        for payload in records(f):
            ev = Event.FromString(payload)
            if purge and ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                out = {tag: [(s, v) for s, v in vals if s < ev.step] for tag, vals in out.items()}
            for value in ev.summary.value:
                out.setdefault(value.tag, []).append((ev.step, value.simple_value))
    return out


def assert_matches_steps_csv(log_dir: Path, out: Path, epochs: int) -> None:
    got, rows = scalars(log_dir), steps_csv(out)
    assert len(rows) == 4 * epochs
    for tag in STEP_TAGS:
        logged = got[f"train/{tag}"]
        assert [s for s, _ in logged] == [int(r["step"]) for r in rows], tag  # one value per step, in order
        np.testing.assert_allclose([v for _, v in logged], [float(r[tag]) for r in rows], rtol=1e-6, err_msg=tag)
    ends = [max(int(r["step"]) for r in rows if int(r["epoch"]) == e) for e in range(1, epochs + 1)]
    for key in ("train_loss", "step_loss_mean", "step_loss_p10", "step_loss_p50", "step_loss_p90"):
        assert [s for s, _ in got[f"epoch/{key}"]] == ends, key
    for e, (_, mean) in enumerate(got["epoch/step_loss_mean"], 1):
        assert mean == pytest.approx(np.mean([float(r["loss"]) for r in rows if int(r["epoch"]) == e]), rel=1e-6)


def test_tensorboard_logs_every_step_as_steps_csv(tiny, tmp_path):
    ident = identity(tmp_path / "results")
    assert ident.tensorboard_dir == tmp_path / "results/tensorboard/m/t/shuffle/run0"
    out = run(tiny, tmp_path / "out", ident, epochs=2, report_to=["tensorboard"])
    assert_matches_steps_csv(ident.tensorboard_dir, out, epochs=2)
    # The same training as without a tracker: report_to changes no result.
    plain = run(tiny, tmp_path / "plain", None, epochs=2)
    drop = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in steps_csv(out)] == [
        {k: v for k, v in r.items() if k not in drop} for r in steps_csv(plain)
    ]
    assert (out / "epoch2" / "model.safetensors").read_bytes() == (plain / "epoch2" / "model.safetensors").read_bytes()


class Interrupted(BaseException):
    pass


def test_resumed_run_logs_no_step_twice(tiny, tmp_path, monkeypatch):
    """Killed in epoch 2 (after 2 of its steps), resumed after epoch 1: as TensorBoard reads the files,
    each step once, with the values of the final steps.csv; a fresh start clears an old try's files."""
    ident = identity(tmp_path / "results")
    out = tmp_path / "out"
    real, calls = train_mod.backward_batch, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise Interrupted
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "backward_batch", failing)
        with pytest.raises(Interrupted):
            run(tiny, out, ident, epochs=3, report_to=["tensorboard"])
    raw = scalars(ident.tensorboard_dir, purge=False)
    assert [s for s, _ in raw["train/loss"]] == [1, 2, 3, 4, 5, 6]  # the killed try got to step 6
    for p in out.glob("epoch*"):  # Snakemake deletes a failed job's declared outputs
        shutil.rmtree(p)
    run(tiny, out, ident, epochs=3, report_to=["tensorboard"])
    raw = scalars(ident.tensorboard_dir, purge=False)
    assert [s for s, _ in raw["train/loss"]] == [1, 2, 3, 4, 5, 6, *range(5, 13)]  # 5, 6 rewritten after a purge
    assert_matches_steps_csv(ident.tensorboard_dir, out, epochs=3)
    # A rerun from scratch (no saved state): the old event files go, nothing is purged or doubled.
    shutil.rmtree(out)
    run(tiny, out, ident, epochs=3, report_to=["tensorboard"])
    assert len(list(ident.tensorboard_dir.glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in scalars(ident.tensorboard_dir, purge=False)["train/loss"]] == list(range(1, 13))
    assert_matches_steps_csv(ident.tensorboard_dir, out, epochs=3)


def test_unknown_or_missing_tracker_is_refused_before_training(tiny, tmp_path, monkeypatch):
    ident = identity(tmp_path / "results")
    with pytest.raises(ValueError, match=r"'comet' — unknown tracker; use any of tensorboard, wandb, mlflow, trackio"):
        run(tiny, tmp_path / "a", ident, report_to=["comet"])
    monkeypatch.setattr(tracking, "installed", lambda module: False)
    for name, package in tracking.BACKENDS.items():
        with pytest.raises(ValueError, match=rf"the {package} package is not installed; pip install {package}"):
            run(tiny, tmp_path / "b", ident, report_to=[name])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no run identity"):
        run(tiny, tmp_path / "c", None, report_to=["tensorboard"])
    for d in ("a", "b", "c"):
        assert not (tmp_path / d).exists()  # refused before anything was written


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "trackio"])
def test_config_names_the_package_of_a_tracker_not_installed(backend, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))
    cfg["train"]["report_to"] = ["tensorboard", backend]
    if tracking.installed(backend):
        validate_config(cfg)  # installed: accepted
        monkeypatch.setattr(tracking, "installed", lambda module: module != backend)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.problems == [
        f"train.report_to[1]: '{backend}' — the {backend} package is not installed; "
        f"pip install {backend}, or drop {backend} from train.report_to"
    ]


def test_default_is_steps_csv_only(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert cfg["train"]["report_to"] == []
    smoke = validate_config(yaml.safe_load((ROOT / "tests/configs/smoke.yaml").read_text()))
    assert smoke["train"]["report_to"] == []  # test_determinism compares results/ byte for byte
