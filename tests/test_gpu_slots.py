"""GPU slots (src/ordermerge/gpu_slots/) without a GPU: fake device ids, a private lock directory per
test and tiny child commands, then the workflow wiring through dry runs. ~20 s.

The launcher gives each GPU job its own device: concurrent jobs never share a slot, a killed job's slot
comes back by itself (flock), a 2-GPU job gets two ids, the child's exit code and SIGTERM pass through,
and a SLURM job runs unchanged. In the workflow, every GPU job goes through it, whichever executor runs
it (the launcher itself passes a SLURM job through); a CPU-only config's commands never mention it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, SMOKE, snakemake
from ordermerge import gpu_slots

LAUNCHER = [sys.executable, "-m", "ordermerge.gpu_slots"]
# The child of the concurrency test: records its devices and when it ran, after `sleep` seconds' work.
RECORD = (
    "import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
    "json.dump({'devices': os.environ['CUDA_VISIBLE_DEVICES'], 'start': start, 'end': time.time()}, "
    "open(sys.argv[1], 'w'))"
)
PRINT_DEVICES = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables the launcher reads, plus ``extra``."""
    drop = {"CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", gpu_slots.LOCK_DIR_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def launch(lock_dir: Path, *options: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*LAUNCHER, "--lock-dir", str(lock_dir), *options, "--", *command],
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(
    lock_dir: Path, *options: str, command: list[str], env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCHER, "--lock-dir", str(lock_dir), *options, "--", *command],
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(path: Path, timeout: float = 10) -> str:
    """The content of ``path`` once a child wrote it (its pid: it runs and holds its slot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def holder(tmp_path: Path, lock_dir: Path, devices: str, name: str = "holder") -> tuple[subprocess.Popen, int]:
    """A launcher holding one slot of ``devices`` with a shell that sleeps; returns it and the shell's pid."""
    pidfile = tmp_path / f"{name}.pid"
    proc = launch(lock_dir, "--devices", devices, command=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"])
    return proc, int(wait_for(pidfile))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    """6 jobs, 3 devices: at most 3 at once, never two on one device at the same time, and they do overlap."""
    locks, records = tmp_path / "locks", [tmp_path / f"job{i}.json" for i in range(6)]
    procs = [
        launch(locks, "--devices", "0,1,2", command=[sys.executable, "-c", RECORD, str(r), "0.6"]) for r in records
    ]
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert re.search(r"gpu_slots: slot [012] of devices 0,1,2 \(from --devices", err), err
    jobs = [json.loads(r.read_text()) for r in records]
    assert {j["devices"] for j in jobs} <= {"0", "1", "2"}
    for a in jobs:
        for b in jobs:
            if a is not b and a["devices"] == b["devices"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    events = sorted([(j["start"], 1) for j in jobs] + [(j["end"], -1) for j in jobs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= 3, peak


def test_a_killed_job_frees_its_gpu(tmp_path):
    """kill -9 of the launcher and its command: no cleanup, the next job gets the slot at once."""
    locks = tmp_path / "locks"
    first, child = holder(tmp_path, locks, "0")
    kill(first.pid)
    kill(child)
    first.wait(timeout=10)
    start = time.monotonic()
    nxt = run(locks, "--devices", "0", "--timeout", "5", command=[sys.executable, "-c", PRINT_DEVICES])
    assert nxt.returncode == 0, nxt.stderr
    assert nxt.stdout.strip() == "0" and time.monotonic() - start < 4


def test_the_slot_lasts_as_long_as_the_command(tmp_path):
    """kill -9 of the launcher alone: its command still runs on the GPU, so the slot stays held (with a
    clear timeout error naming the holder) until the command ends."""
    locks = tmp_path / "locks"
    first, child = holder(tmp_path, locks, "0")
    try:
        kill(first.pid)
        first.wait(timeout=10)
        blocked = run(locks, "--devices", "0", "--timeout", "0.5", command=["true"])
        assert blocked.returncode == gpu_slots.EXIT_TIMEOUT
        assert "no 1 free GPU slot(s) among devices 0 after 0.5 s" in blocked.stderr, blocked.stderr
        assert f"0: held by pid {first.pid} (command pid {child})" in blocked.stderr, blocked.stderr
        assert "lower --resources gpu=N" in blocked.stderr
    finally:
        kill(child)
    nxt = run(locks, "--devices", "0", "--timeout", "5", command=[sys.executable, "-c", PRINT_DEVICES])
    assert nxt.returncode == 0 and nxt.stdout.strip() == "0", nxt.stderr


def test_a_two_gpu_job_gets_two_free_devices(tmp_path):
    locks = tmp_path / "locks"
    both = run(locks, "--gpus", "2", "--devices", "0,1,2", command=[sys.executable, "-c", PRINT_DEVICES])
    assert both.returncode == 0 and both.stdout.strip() == "0,1", both.stderr
    assert "slots 0,1 of devices 0,1,2" in both.stderr
    first, child = holder(tmp_path, locks, "0,1,2")  # takes 0
    try:
        rest = run(locks, "--gpus", "2", "--devices", "0,1,2", command=[sys.executable, "-c", PRINT_DEVICES])
        assert rest.returncode == 0 and rest.stdout.strip() == "1,2", rest.stderr
    finally:
        kill(first.pid)
        kill(child)
        first.wait(timeout=10)
    too_many = run(locks, "--gpus", "3", "--devices", "0,1", command=["true"])
    assert too_many.returncode == gpu_slots.EXIT_USAGE
    assert "needs 3 GPUs but only 2 devices are known (0,1)" in too_many.stderr
    assert "lower resources.<rule>.gpus" in too_many.stderr


def test_exit_codes_and_sigterm_reach_through(tmp_path):
    locks = tmp_path / "locks"
    assert run(locks, "--devices", "0", command=[sys.executable, "-c", "raise SystemExit(7)"]).returncode == 7
    assert run(locks, "--devices", "0", command=["sh", "-c", "kill -KILL $$"]).returncode == 128 + 9
    assert run(locks, "--devices", "0", command=["no-such-command-here"]).returncode == 127
    # SIGTERM to the launcher reaches the command (in its own session: only through the launcher)
    pidfile, note = tmp_path / "trap.pid", tmp_path / "trap.note"
    script = f"trap 'echo term > {note}; exit 3' TERM; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    proc = launch(locks, "--devices", "0", command=["sh", "-c", script])
    wait_for(pidfile)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 3 and note.read_text().strip() == "term"


def test_slurm_jobs_run_unchanged(tmp_path):
    locks = tmp_path / "locks"
    slurm = run(
        locks,
        "--devices",
        "0,1",
        command=[sys.executable, "-c", PRINT_DEVICES],
        env=clean_env(SLURM_JOB_ID="42", CUDA_VISIBLE_DEVICES="5"),
    )
    assert slurm.returncode == 0 and slurm.stdout.strip() == "5", slurm.stderr
    assert "SLURM_JOB_ID=42" in slurm.stderr and not locks.exists()  # no slot claimed
    asked = run(
        locks,
        "--respect-scheduler",
        command=[sys.executable, "-c", PRINT_DEVICES],
        env=clean_env(CUDA_VISIBLE_DEVICES="3"),
    )
    assert asked.returncode == 0 and asked.stdout.strip() == "3" and not locks.exists()
    unset = run(locks, command=[sys.executable, "-c", PRINT_DEVICES], env=clean_env(SLURM_JOB_ID="42"))
    assert unset.stdout.strip() == "<unset>"


def test_devices_default_to_the_visible_ones(tmp_path, monkeypatch):
    picked = run(
        tmp_path / "locks", command=[sys.executable, "-c", PRINT_DEVICES], env=clean_env(CUDA_VISIBLE_DEVICES="4,6")
    )
    assert picked.stdout.strip() == "4" and "from CUDA_VISIBLE_DEVICES" in picked.stderr
    usage = subprocess.run([*LAUNCHER, "--gpus", "1", "true"], capture_output=True, text=True, env=clean_env())
    assert usage.returncode == 2 and "put the command after --" in usage.stderr
    assert gpu_slots.discover_devices(1, {"CUDA_VISIBLE_DEVICES": "4, 6"}) == (["4", "6"], "CUDA_VISIBLE_DEVICES")
    assert gpu_slots.discover_devices(1, {"CUDA_VISIBLE_DEVICES": "2,-1,3"})[0] == ["2"]  # CUDA stops at -1
    with pytest.raises(gpu_slots.SlotError, match="makes no GPU visible; unset it"):
        gpu_slots.discover_devices(1, {"CUDA_VISIBLE_DEVICES": ""})
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: every job waits for the same ids
    devices, source = gpu_slots.discover_devices(2, {})
    assert devices == ["0", "1"] and "set CUDA_VISIBLE_DEVICES=0,1" in source
    assert gpu_slots.default_lock_dir({gpu_slots.LOCK_DIR_ENV: "/x"}) == Path("/x")
    assert gpu_slots.default_lock_dir({}).name == f"ordermerge-gpu-slots-{os.getuid()}"
    assert gpu_slots.slot_path(Path("/l"), "MIG-GPU-a/1/2").name == "slot-MIG-GPU-a_1_2.lock"


# --- the workflow ------------------------------------------------------------------------------------


def shell_commands(proc: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """rule -> the shell commands `snakemake -n -p` prints for its jobs."""
    commands: dict[str, list[str]] = {}
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := re.match(r"^\s*(?:local)?rule (\w+):\s*$", line):
            rule = m.group(1)
        elif rule and "Shell command:" in line:
            commands.setdefault(rule, []).append(line.split("Shell command:", 1)[1].strip())
    return commands


def test_gpu_jobs_run_behind_the_launcher_whichever_executor_runs_them(tmp_path, monkeypatch):
    gpu = ROOT / "configs" / "gpu.yaml"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    local = shell_commands(
        snakemake(tmp_path, "-n", "-p", "--until", "evaluate_single", "sample_losses", configfile=gpu)
    )
    for rule, launcher in [
        ("fine_tune", "ordermerge fine-tune --threads "),
        ("evaluate_single", "ordermerge evaluate "),
        ("sample_losses", "ordermerge sample-losses "),
    ]:
        assert local[rule] and all(
            c.startswith(f"python -m ordermerge.gpu_slots --gpus 1 -- {launcher}") for c in local[rule]
        ), local.get(rule, [])[:1]
    assert local["orders"] and not any("gpu_slots" in c for c in local["orders"] + local["prepare_data"])
    # The workflow does not ask where it runs: inside a SLURM allocation the commands are the same, and the
    # launcher runs them unchanged there (test_slurm_jobs_run_unchanged)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    on_slurm = shell_commands(
        snakemake(tmp_path, "-n", "-p", "--until", "evaluate_single", "sample_losses", configfile=gpu)
    )
    assert {r: sorted(c) for r, c in on_slurm.items()} == {r: sorted(c) for r, c in local.items()}


def test_cpu_configs_keep_their_commands(tmp_path):
    (tmp_path / "cpu").mkdir()
    cpu = shell_commands(snakemake(tmp_path / "cpu", "-n", "-p", configfile=SMOKE))
    assert cpu["fine_tune"] and cpu["evaluate_single"]
    assert not any("gpu_slots" in c for cs in cpu.values() for c in cs)
    # through the SLURM profile too; a GPU config's SLURM jobs carry the launcher, which passes them through
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("SLURM_JOB_ID", None)

    def slurm_dry_run(config: Path) -> dict[str, list[str]]:
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "snakemake"),
                "-s",
                str(ROOT / "Snakefile"),
                "-d",
                str(tmp_path / "slurm"),
                "--configfile",
                str(config),
                "--profile",
                str(ROOT / "profiles" / "slurm"),
                "-n",
                "-p",
                "--until",
                "evaluate_single",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return shell_commands(proc)

    slurm = slurm_dry_run(SMOKE)
    assert slurm["fine_tune"] and slurm["evaluate_single"]
    assert not any("gpu_slots" in c for cs in slurm.values() for c in cs)
    gpu = slurm_dry_run(ROOT / "configs" / "gpu.yaml")
    assert gpu["fine_tune"] and all(
        c.startswith("python -m ordermerge.gpu_slots --gpus 1 -- ordermerge fine-tune") for c in gpu["fine_tune"]
    )
