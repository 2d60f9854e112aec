"""Experiment trackers for a fine-tune (``train.report_to``, as transformers' ``report_to``).

``steps.csv`` is always written; ``report_to`` adds live copies of the same numbers:

- ``tensorboard``: event files (tensorboardX, offline) in the run's ``paths.TEMPLATES["tensorboard"]``
  directory, ``{results}/tensorboard/{model}/{task}/{scheme}/run{k}``, so that
  ``tensorboard --logdir {results}/tensorboard/<model>/<task>/<scheme>`` overlays the K runs.
- ``wandb``, ``mlflow``, ``trackio``: when installed (otherwise the config is refused, and at the
  latest ``fine_tune`` refuses before training, naming the package to ``pip install``). Project
  ``ordermerge``, group ``<model>/<task>/<scheme>``, run ``run<k>``; MLflow has no projects or groups:
  its experiment is ``ordermerge/<model>/<task>/<scheme>``, its run ``run<k>``; trackio names runs
  per project, so its run is ``<model>/<task>/<scheme>/run<k>`` (group ``<model>/<task>/<scheme>``).

Nothing leaves the machine unless the user configures it:
- wandb runs in ``WANDB_MODE`` if set; otherwise ``online`` only when ``WANDB_API_KEY`` is set, else
  ``offline`` (a ``wandb login`` alone stays offline: set WANDB_MODE=online, or ``wandb sync`` later).
- mlflow logs to ``MLFLOW_TRACKING_URI`` if set, else mlflow's local default store.
- trackio logs locally unless ``TRACKIO_SPACE_ID`` is set.

Logged: every numeric column of a steps.csv row (loss, lr, grad_norm, tokens, seconds, tokens_per_s)
as ``train/<column>`` at its optimizer step; after each epoch ``epoch/train_loss`` (per scored token,
as checkpoint.json's ``train_loss_epoch``) and the mean and p10/p50/p90 of that epoch's step losses
(``epoch/step_loss_*``), at the epoch's last step. The loop has no per-sample losses (a packed
micro-batch is one row, and samples are spread over ranks); the sample-losses stage has them.

Only rank 0 tracks (see distributed.py); other ranks get :class:`Tracker`, which does nothing.

Resume. A rerun continues after the last saved epoch, at step ``start_step``. Steps up to it were
logged (the trackers are flushed at each epoch end, before the state is saved); steps after it (a
killed epoch) are logged again. TensorBoard: the writer opens with ``purge_step = start_step + 1``,
so TensorBoard drops the killed try's steps from ``start_step + 1`` on; a fresh start (``start_step``
0) deletes the run directory's old event files. wandb resumes the same run (a stable id from the run
and its inputs) and keeps the first value it got for a step; mlflow and trackio continue the run of
the same name and may show a killed epoch's steps twice (same values on the CPU, where a resumed
run is bit-identical).

Importing this module needs neither torch nor any tracker (config validation uses it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT = "ordermerge"
# The workflow passes train.report_to to fine_tune jobs in this variable (comma-separated; set: it wins over
# --train-cfg's report_to), not in their params: a tracker cannot change a checkpoint, so it reruns nothing.
REPORT_TO_ENV = "ORDERMERGE_REPORT_TO"

# backend -> the module it imports (and the package to pip install)
BACKENDS = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
NOT_LOGGED = ("epoch", "step", "sample_indices")  # steps.csv columns that are not metrics


@dataclass(frozen=True)
class RunIdentity:
    """Which of the K runs this is: ``group`` = ``<model>/<task>/<scheme>``, ``run`` = ``run<k>``;
    ``tensorboard_dir``: its TensorBoard directory (paths.py's ``tensorboard`` template)."""

    group: str
    run: str
    tensorboard_dir: Path | None = None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def problems(report_to) -> list[str]:
    """Why ``report_to`` cannot run here (unknown backends, packages not installed): one
    ``value — problem; fix`` text each. Config validation reports them per entry."""
    out = []
    for name in report_to or []:
        if name not in BACKENDS:
            out.append(f"{name!r} — unknown tracker; use any of {', '.join(BACKENDS)} (or [] for steps.csv only)")
        elif not installed(BACKENDS[name]):
            out.append(
                f"{name!r} — the {BACKENDS[name]} package is not installed; pip install {BACKENDS[name]}, "
                f"or drop {name} from train.report_to"
            )
    return out


def check(report_to, identity: RunIdentity | None) -> None:
    """Refuse, before any training, trackers that cannot run here or have no run identity."""
    found = problems(report_to)
    if report_to and not found and identity is None:
        found.append(
            f"{report_to} — no run identity (model/task/scheme/run) to track under; pass --tracker-group, "
            "--tracker-run and --tracker-dir (the workflow does), or set report_to: []"
        )
    elif "tensorboard" in (report_to or []) and identity is not None and identity.tensorboard_dir is None:
        found.append(
            "'tensorboard' — no TensorBoard directory for this run; pass --tracker-dir (the workflow does), "
            "or drop tensorboard from train.report_to"
        )
    if found:
        raise ValueError("train.report_to: " + "; ".join(found))


def step_metrics(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k not in NOT_LOGGED and isinstance(v, (int, float))}


def epoch_summary(epoch_rows: list[dict], train_loss: float) -> dict[str, float]:
    """``train_loss`` per scored token and the distribution of the epoch's step losses."""
    import numpy as np

    losses = np.array([r["loss"] for r in epoch_rows], dtype=np.float64)
    out = {"train_loss": float(train_loss)}
    if len(losses):
        p10, p50, p90 = np.quantile(losses, [0.1, 0.5, 0.9])
        out.update(
            step_loss_mean=float(losses.mean()),
            step_loss_p10=float(p10),
            step_loss_p50=float(p50),
            step_loss_p90=float(p90),
        )
    return out


class Tracker:
    """The interface, and the tracker of ``report_to: []`` and of ranks other than 0: does nothing."""

    def open(self, identity: RunIdentity, start_step: int, config: dict) -> None:
        """Start (or, after ``start_step`` > 0 steps, continue) the run ``identity``."""

    def log_step(self, row: dict) -> None:
        """One steps.csv row, at its optimizer step ``row["step"]``."""

    def log_epoch(self, step: int, summary: dict) -> None:
        """An epoch's summary (epoch_summary) at its last optimizer step; flushes what was logged."""

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def open(self, identity, start_step, config):
        from tensorboardX import SummaryWriter

        log_dir = Path(identity.tensorboard_dir)
        if start_step == 0:  # a fresh start: an earlier try's curves belong to other state
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        log_dir.mkdir(parents=True, exist_ok=True)
        # A unique suffix: two writers opened within one second must not share (and truncate) a file.
        self.writer = SummaryWriter(
            str(log_dir),
            purge_step=start_step + 1 if start_step else None,
            filename_suffix=f".{os.getpid()}.{time.time_ns()}",
        )

    def log_step(self, row):
        for key, value in step_metrics(row).items():
            self.writer.add_scalar(f"train/{key}", value, int(row["step"]))

    def log_epoch(self, step, summary):
        for key, value in summary.items():
            self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class Wandb(Tracker):
    def open(self, identity, start_step, config):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run_id = hashlib.sha256(f"{identity.group}/{identity.run}/{config.get('fingerprint', '')}".encode())
        self.run = wandb.init(
            project=PROJECT,
            group=identity.group,
            name=identity.run,
            id=run_id.hexdigest()[:16],
            resume="allow",
            mode=mode,
            config=config,
        )

    def log_step(self, row):
        self.run.log({f"train/{k}": v for k, v in step_metrics(row).items()}, step=int(row["step"]))

    def log_epoch(self, step, summary):
        self.run.log({f"epoch/{k}": v for k, v in summary.items()}, step=step)

    def close(self):
        self.run.finish()


class MLflow(Tracker):
    def open(self, identity, start_step, config):
        import mlflow

        self.mlflow = mlflow
        experiment = mlflow.set_experiment(f"{PROJECT}/{identity.group}")
        found = (
            mlflow.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.mlflow.runName = '{identity.run}'",
                output_format="list",
            )
            if start_step
            else []
        )
        if found:
            self.run = mlflow.start_run(run_id=found[0].info.run_id)
        else:
            self.run = mlflow.start_run(run_name=identity.run, tags={"project": PROJECT, "group": identity.group})
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log_step(self, row):
        self.mlflow.log_metrics({f"train/{k}": v for k, v in step_metrics(row).items()}, step=int(row["step"]))

    def log_epoch(self, step, summary):
        self.mlflow.log_metrics({f"epoch/{k}": v for k, v in summary.items()}, step=step)

    def close(self):
        self.mlflow.end_run()


class Trackio(Tracker):
    def open(self, identity, start_step, config):
        import trackio

        self.trackio = trackio
        trackio.init(
            project=PROJECT,
            name=f"{identity.group}/{identity.run}",
            group=identity.group,
            config=config,
            resume="allow",
        )

    def log_step(self, row):
        self.trackio.log({f"train/{k}": v for k, v in step_metrics(row).items()}, step=int(row["step"]))

    def log_epoch(self, step, summary):
        self.trackio.log({f"epoch/{k}": v for k, v in summary.items()}, step=step)

    def close(self):
        self.trackio.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}


class Trackers(Tracker):
    """All of ``report_to`` at once."""

    def __init__(self, report_to):
        self.members = [CLASSES[name]() for name in report_to]

    def open(self, identity, start_step, config):
        for m in self.members:
            m.open(identity, start_step, config)

    def log_step(self, row):
        for m in self.members:
            m.log_step(row)

    def log_epoch(self, step, summary):
        for m in self.members:
            m.log_epoch(step, summary)

    def close(self):
        for m in self.members:
            m.close()


def open_trackers(report_to, identity: RunIdentity | None, start_step: int, config: dict, main: bool) -> Tracker:
    """The run's trackers, opened (rank 0 only; :func:`check` first)."""
    if not main or not report_to:
        return Tracker()
    tracker = Trackers(report_to)
    tracker.open(identity, start_step, config)
    return tracker
