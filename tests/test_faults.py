"""Faults: kill -9 a fine-tune, a merge and a per-sample-loss pass mid-work; a full disk mid-checkpoint.

Each kill trial runs the real ``ordermerge`` command line (``cli.main``) in a forked child of this
process (torch is already imported, so the work starts at once; this process keeps no helper
threads that a fork could copy mid-lock: one torch thread, no tqdm monitor, no tokenizer pool),
sends SIGKILL at a reproducible random point, and then checks that
- every output that exists looks complete *and is* complete: byte-identical to an uninterrupted
  run's (an atomic write leaves only ``.tmp-*`` names behind);
- a rerun completes, and its outputs are bit-identical (sha256) to the uninterrupted run's.
Kill points follow observable progress, not the clock (two shared cores make wall time swing
several-fold): the CPU time C an uninterrupted run uses is measured per stage as the least of three
runs (one run's CPU time swings by a third on a busy machine, and an inflated C puts late kill points
past the end), and trial i kills the child as soon as its own CPU time (/proc/<pid>/stat) reaches
``uniform(0.1, 0.8) * C`` (seeded by stage and i). A trial whose child still finished first is
retried once at the same fraction of the CPU time that child used. A kill "landed mid-work" when
the child was still running (exit by SIGKILL, not by finishing); "mid-write" when a ``.tmp-*`` was
present at that moment.
``test_kills_landed_mid_work`` prints and checks the counts.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from helpers import train_cfg, write_train
from ordermerge.data.orders import make_order, save_order
from ordermerge.storage.atomic import DiskFullError
from ordermerge.train.loop import TIMING_COLUMNS, fine_tune

# The trials: (stage, index). Counted by tests/reliability_counts.py for docs/reliability.md.
FAULT_TRIALS = (
    [("fine-tune", i) for i in range(4)] + [("merge", i) for i in range(4)] + [("sample-losses", i) for i in range(3)]
)
DISK_FULL_CASES = {"model-weights-epoch2": 3, "training-state-epoch2": 4}  # n-th safetensors save_file call
SEED = 8
REFERENCE_RUNS = 3  # the reference CPU time is the least of these (see the module docstring)
N_TRAIN = 16
TASK_SPEC = {"max_length": 128, "system_prompt": None}
LANDED: list[dict] = []  # one row per kill, filled by the trials


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: torch on one thread


# Helpers ------------------------------------------------------------------------------------------

_CTX = multiprocessing.get_context("fork")


def _no_helper_threads() -> None:
    """Stop tqdm's monitor thread (an earlier test's progress bar starts one, which holds tqdm's lock
    while it looks at the bars: a fork at that moment leaves the child's copy locked, and the child
    hangs at its first progress bar) and check that no other Python thread is left to copy."""
    from tqdm._monitor import TMonitor

    tqdm.monitor_interval = 0  # no new one (subclasses such as tqdm.auto's inherit it)
    for thread in threading.enumerate():
        if isinstance(thread, TMonitor):  # started by tqdm or a subclass (transformers uses tqdm.auto)
            thread.exit()
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    assert not others, f"threads a fork would copy mid-work (stop them before the kill trials): {others}"


def _private_tqdm_locks() -> None:
    """Give tqdm and every subclass of it (tqdm.auto's, which transformers' loading bars use, keeps a
    lock of its own) a lock of this process alone, and stop new locks from sharing one across forks.
    tqdm's default lock holds a multiprocessing semaphore (``TqdmDefaultWriteLock.mp_lock``, one per
    process tree) that every child forked from here shares; a child SIGKILLed while it held it (while
    it drew a progress bar, even a disabled one: ``tqdm.__new__`` takes the lock) leaves it taken for
    good, and this process and every later child then hang at their next bar. Seen in CI: a
    sample-losses trial's children hung, then the in-process fine-tune of the disk-full test."""
    from tqdm.std import TqdmDefaultWriteLock

    TqdmDefaultWriteLock.mp_lock = None  # create_mp_lock() sees it set: new default locks are thread locks
    classes = [tqdm]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is tqdm or "_lock" in vars(cls):
            cls.set_lock(threading.RLock())


def _child(argv: list[str]) -> None:
    """The forked child: the command line, with tqdm locks of its own (see ``_private_tqdm_locks``)."""
    from ordermerge.cli import main

    _private_tqdm_locks()
    main(argv)


def _start(argv: list[str]) -> multiprocessing.Process:
    import ordermerge.cli  # noqa: F401  (imported here, before the fork: the child starts at once)

    _no_helper_threads()
    _private_tqdm_locks()  # here too: a killed child must not hold a lock this process needs
    torch.set_num_threads(1)
    proc = _CTX.Process(target=_child, args=(argv,), daemon=True)
    proc.start()
    return proc


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_to_end(argv: list[str]) -> float:
    """Run a stage to its end; returns the CPU seconds the child used."""
    t0 = _children_cpu()
    proc = _start(argv)
    proc.join(90)
    if proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    assert proc.exitcode == 0, f"ordermerge {argv[0]} failed (exit {proc.exitcode}); see the captured output"
    return _children_cpu() - t0


def normalised(path: Path) -> bytes:
    """steps.csv without its wall-clock columns (seconds, tokens_per_s); every other file as is."""
    data = path.read_bytes()
    if path.name != "steps.csv":
        return data
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return json.dumps([{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]).encode()


def digests(root: Path) -> dict[str, str]:
    """sha256 of every visible file under root (a file or a directory); hidden names (.tmp-*, .resume) skipped."""
    if root.is_file():
        return {root.name: hashlib.sha256(normalised(root)).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(normalised(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def temporaries(parent: Path) -> list[Path]:
    return [p for p in parent.rglob(".tmp-*")]


# The three stages, each with its inputs, command line and output --------------------------------


@pytest.fixture(scope="module")
def stages(tiny_base, tmp_path_factory):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tqdm.monitor_interval = 0
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    base = tiny_base
    train = write_train(root / "train.jsonl", N_TRAIN)
    order = root / "order.npy"
    save_order(make_order(N_TRAIN, 3, "shuffle", 2, seed=5, task="t", run=0), order)
    cfg = train_cfg(epochs=3, batch_size=2)
    losses_data = write_train(root / "losses.jsonl", 48)
    merge_base, merge_models = _merge_zoo(root / "zoo")
    work = root / "work"
    specs = {
        # out: the path the stage writes (and the rerun too: paths are recorded in merge.json)
        "fine-tune": (
            work / "ft",
            [
                "fine-tune",
                "--base",
                str(base),
                "--train",
                str(train),
                "--order",
                str(order),
                "--out-dir",
                str(work / "ft"),
                "--run-name",
                "r0",
                "--task-spec",
                json.dumps(TASK_SPEC),
                "--train-cfg",
                json.dumps(cfg),
                "--seed",
                "1",
                "--threads",
                "1",
            ],
        ),
        "merge": (
            work / "merged",
            [
                "merge",
                "--base",
                str(merge_base),
                "--method",
                "select",
                "--resample",
                "1",
                "--seed",
                "3",
                "--shard-size",
                "6MB",
                "--threads",
                "1",
                "--out",
                str(work / "merged"),
                *map(str, merge_models),
            ],
        ),
        "sample-losses": (
            work / "losses.csv",
            [
                "sample-losses",
                "--model-dir",
                str(base),
                "--split",
                f"train={losses_data}",
                "--task-spec",
                json.dumps(TASK_SPEC),
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--out",
                str(work / "losses.csv"),
            ],
        ),
    }
    out = {"root": root, "base": base, "train": train, "order": order, "cfg": cfg}
    for stage, (path, argv) in specs.items():
        cpus, refs = [], []
        for _ in range(REFERENCE_RUNS):
            _clear(path)
            cpus.append(run_to_end(argv))
            refs.append(digests(path))
        assert refs[0], f"{stage}: the uninterrupted run wrote nothing"
        assert all(r == refs[0] for r in refs), f"{stage}: two uninterrupted runs wrote different bytes"
        out[stage] = {"out": path, "argv": argv, "cpu": min(cpus), "ref": refs[0]}
        _clear(path)
    return out


def _merge_zoo(root: Path) -> tuple[Path, list[Path]]:
    """A base and 3 fine-tunes of ~20 MB each: big enough that a merge takes a measurable while."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.weight": torch.randn(1024, 1280, generator=g).to(torch.bfloat16) for i in range(8)}
    dirs = []
    for k, state in enumerate(
        [base]
        + [
            {
                n: torch.where(torch.rand(t.shape, generator=g) < 0.5, t + 0.25 * (k + 1), t).to(torch.bfloat16)
                for n, t in base.items()
            }
            for k in range(3)
        ]
    ):
        d = root / ("base" if k == 0 else f"ft{k}")
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs[0], dirs[1:]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    for tmp in path.parent.glob(f".tmp-{path.name}-*"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


# 1. kill -9 at random points --------------------------------------------------------------------------


def _kill_at(argv: list[str], out: Path, target: float) -> tuple[bool, bool, float]:
    """Start a stage, SIGKILL it once its CPU time reaches target: (landed mid-work, mid-write, child CPU s)."""
    t0, deadline = _children_cpu(), time.time() + 120
    proc = _start(argv)
    try:
        while proc.is_alive() and cpu_seconds(proc.pid) < target and time.time() < deadline:
            time.sleep(0.002)
    except FileNotFoundError:
        pass  # gone already
    mid_write = bool(temporaries(out.parent)) if out.parent.exists() else False
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # finished (exit code 0 below): not mid-work
    proc.join(60)
    landed = proc.exitcode == -signal.SIGKILL
    return landed, mid_write and landed, _children_cpu() - t0


def _clear(out: Path) -> None:
    """Remove a stage's output and whatever else a previous run left beside it (e.g. ft/.resume)."""
    _remove(out)
    if out.parent.exists():
        for p in out.parent.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.mark.parametrize("stage, i", FAULT_TRIALS, ids=[f"{s}-{i}" for s, i in FAULT_TRIALS])
def test_kill9_then_rerun_is_bit_identical(stages, stage, i):
    s = stages[stage]
    out, argv = s["out"], s["argv"]
    _clear(out)
    fraction = random.Random(f"{SEED}-{stage}-{i}").uniform(0.1, 0.8)
    target = fraction * s["cpu"]
    landed, mid_write, used = _kill_at(argv, out, target)
    if not landed:  # this child needed less CPU than the reference: once more, at the same fraction of what it used
        _clear(out)
        target = fraction * used
        landed, mid_write, used = _kill_at(argv, out, target)
    LANDED.append(
        {
            "stage": stage,
            "trial": i,
            "at_cpu_s": round(target, 3),
            "of_cpu_s": round(s["cpu"], 3),
            "mid_work": landed,
            "mid_write": mid_write,
        }
    )

    # Whatever exists and looks complete is complete.
    after_kill = digests(out) if out.exists() else {}
    for name, digest in after_kill.items():
        assert s["ref"].get(name) == digest, f"{stage}: {name} exists after the kill but differs from a complete run"
    if stage == "fine-tune":
        assert landed or (out / "steps.csv").exists(), "a finished run must have written steps.csv"
        if i % 2 == 0:  # Snakemake deletes a failed job's declared outputs before the rerun; the CLI alone does not
            for p in [*out.glob("epoch*"), out / "steps.csv"]:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif landed:
        assert not out.exists(), f"{stage}: the output exists although the run was killed before finishing"

    if not out.exists() or stage == "fine-tune":
        run_to_end(argv)
    assert digests(out) == s["ref"], f"{stage}: the rerun's outputs differ from an uninterrupted run's"
    assert not temporaries(out.parent), f"{stage}: temporaries of the killed run left: {temporaries(out.parent)}"
    if stage == "fine-tune":
        assert not (out / ".resume").exists()


def test_a_killed_child_holds_no_lock_this_process_needs():
    """The hang CI met: a child SIGKILLed while it held tqdm's lock (a bar of tqdm.auto, as
    transformers draws while loading a model) must not block this process's next bar."""
    from tqdm.auto import tqdm as auto_tqdm

    auto_tqdm(total=1, disable=True).close()  # tqdm.auto's class gets a lock of its own, as in a real session
    _private_tqdm_locks()
    ready = _CTX.Event()

    def hold_the_lock_and_wait() -> None:
        auto_tqdm.get_lock().acquire()
        tqdm.get_lock().acquire()
        ready.set()
        time.sleep(60)

    proc = _CTX.Process(target=hold_the_lock_and_wait, daemon=True)
    proc.start()
    assert ready.wait(30), "the child did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    for cls in (auto_tqdm, tqdm):
        for lock in getattr(cls.get_lock(), "locks", [cls.get_lock()]):  # a TqdmDefaultWriteLock holds several
            assert lock.acquire(timeout=5), f"{cls.__module__}.{cls.__name__}: a lock is held by a dead child"
            lock.release()


def test_kills_landed_mid_work():
    """Runs after the trials (same module): the kill points must mostly land while work is going on."""
    if len(LANDED) < len(FAULT_TRIALS):
        pytest.skip("needs every kill trial of this module to have run first")
    mid = sum(r["mid_work"] for r in LANDED)
    writes = sum(r["mid_write"] for r in LANDED)
    print(f"\nfault trials: {len(LANDED)}; killed mid-work: {mid}; of those while a .tmp-* existed: {writes}")
    for r in LANDED:
        print(f"  {r}")
    assert mid >= len(LANDED) - 1, f"only {mid} of {len(LANDED)} kills landed mid-work: the kill points are off"
    for stage in {s for s, _ in FAULT_TRIALS}:
        assert any(r["mid_work"] for r in LANDED if r["stage"] == stage), f"no {stage} kill landed mid-work"


# 2. A full disk while a checkpoint is written -----------------------------------------------------------


@pytest.mark.parametrize("case", list(DISK_FULL_CASES))
def test_disk_full_keeps_the_previous_checkpoint_and_says_so(stages, tmp_path, monkeypatch, case):
    """The n-th safetensors write writes half its bytes, then fails with ENOSPC, like a full disk."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        real(tensors, filename, metadata=metadata)
        if calls["n"] == DISK_FULL_CASES[case]:
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    s = stages["fine-tune"]
    out = tmp_path / "ft"
    args = (stages["base"], stages["train"], stages["order"], out, TASK_SPEC, stages["cfg"])
    monkeypatch.setattr(safetensors.torch, "save_file", save_file_on_a_full_disk)
    with pytest.raises(DiskFullError) as info:
        fine_tune(*args, seed=1, run_name="r0", progress=False)
    message = str(info.value)
    for part in ("disk full", str(out / ".resume"), "previous", "intact", "Free space", "rerun", "epoch 2"):
        assert part in message, f"{part!r} missing from: {message}"
    assert info.value.errno == errno.ENOSPC
    # The previous checkpoint is intact (byte for byte), nothing half-written looks complete.
    epoch1 = {k: v for k, v in s["ref"].items() if k.startswith("epoch1/")}
    assert {f"epoch1/{k}": v for k, v in digests(out / "epoch1").items()} == epoch1
    assert {f"epoch1/{k}": v for k, v in digests(out / ".resume" / "epoch1").items()} == epoch1
    assert not temporaries(out), temporaries(out)
    state = json.loads((out / ".resume" / "state" / "state.json").read_text())
    assert state["epoch"] == 1  # the state of epoch 1, so the rerun starts epoch 2 again
    assert not (out / "epoch2").exists() and not (out / "steps.csv").exists()
    # Space freed: the rerun resumes and ends bit-identical to a run that never failed.
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    fine_tune(*args, seed=1, run_name="r0", progress=False)
    assert digests(out) == s["ref"]


def test_disk_full_error_passes_other_errors_through(tmp_path):
    from ordermerge.storage.atomic import atomic_path

    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "x.json") as tmp:
            raise PermissionError(errno.EACCES, "denied")
    assert not list(tmp_path.iterdir())
    (tmp_path / "y.json").write_text("old")
    with pytest.raises(DiskFullError, match=r"disk full while writing .*y\.json .*previous y\.json, if any, is intact"):
        with atomic_path(tmp_path / "y.json") as tmp:
            tmp.write_text("new, partly")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "y.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["y.json"]


def test_next_write_removes_only_temporaries_of_dead_writers_on_this_host(tmp_path):
    import socket

    from ordermerge.storage.atomic import write_json

    host = socket.gethostname()
    dead = _CTX.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    left = {
        "dead": tmp_path / f".tmp-m.json-{host}.{dead.pid}-abc123",
        "alive": tmp_path / f".tmp-m.json-{host}.{os.getpid()}-abc123",
        "other-host": tmp_path / f".tmp-m.json-elsewhere.{dead.pid}-abc123",
        "other-target": tmp_path / f".tmp-m.json.bak-{host}.{dead.pid}-abc123",
    }
    for p in left.values():
        p.write_text("partial")
    write_json(tmp_path / "m.json", {"a": 1})
    assert {k for k, p in left.items() if p.exists()} == {"alive", "other-host", "other-target"}
