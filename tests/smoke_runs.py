"""The session's end-to-end runs of tests/configs/smoke.yaml (tests/conftest.py's ``smoke_runs``).

- ``local``: a plain local run in a fresh directory, the outputs most tests read (``smoke_run``).
- ``slurm``: made when the session selected the SLURM cluster tests (marked ``slurm``) and this
  machine can run the throw-away cluster (../shared/reference/slurm-local-cluster.sh, with
  accounting: MariaDB + slurmdbd, so that sacct and the plugin's efficiency report work): the same
  config through profiles/slurm (job arrays on) in a copy of the repository; then, in the same
  cluster session, one merge forced again alone (--forcerun + --until), and run 0's fine-tune forced
  again, its SLURM job cancelled (scancel) once epoch 1 is published and finished by the profile's
  retry from that epoch. Both re-runs must leave the bytes they replace, so the tree stays a run of
  the smoke config.
Both start in the background before the first test of a session that reads them, and run side by
side: the local run, and the tests that come before the first reader, use the CPU time the SLURM
run spends waiting between status checks. test_determinism compares every file of the two (the SLURM
run is its second run; without one it makes a second local run), test_slurm checks how the SLURM run ran.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from helpers import ROOT, SMOKE, snakemake_cmd

BIN = Path(sys.executable).parent
SCRIPT = (ROOT / ".." / "shared" / "reference" / "slurm-local-cluster.sh").resolve()
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
COMMANDS = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "sinfo",
    "srun",
    "sacct",
    "munged",
    "mungekey",
    "slurmdbd",
    "mariadbd",
)
RESULTS = "results/smollm2-135m/gsm/shuffle"
MERGED = f"{RESULTS}/bf16/merged/epoch2/select/seed0"  # the merge re-run alone in the same session
CANCELLED_RUN = f"{RESULTS}/runs/run0"  # the fine-tune cancelled mid-run and resumed in the same session
SUMMARY = "results/summary.txt"  # written by WRAPPER (slurm-local-cluster.sh prints it), not by the workflow


def _installed(pkg: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def why_no_slurm() -> str | None:
    """None when this machine can run the throw-away cluster (installing it if need be), else why not."""
    if not sys.platform.startswith("linux"):
        return f"SLURM test cluster needs Linux, this is {sys.platform}"
    if not SCRIPT.is_file():
        return f"{SCRIPT} is missing (CI keeps ../shared beside the clone)"
    if os.geteuid() != 0:
        return "slurm-local-cluster.sh must run as root (it starts munged, slurmctld and slurmd)"
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        return (
            f"SLURM is not installed ({', '.join(c for c in COMMANDS if not shutil.which(c))}) and there is no apt-get"
        )
    missing = [p for p in PACKAGES if not _installed(p)]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-600:]}"
    gone = [c for c in COMMANDS if not shutil.which(c)]
    return f"installed {' '.join(missing)} but still missing: {' '.join(gone)}" if gone else None


def copy_repo(dest: Path) -> Path:
    """The repository's files (tracked, plus untracked ones git does not ignore) in dest."""
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True
    )
    if proc.returncode == 0:
        files = [f for f in proc.stdout.decode().split("\0") if f]
    else:  # not a git checkout: everything but outputs and environments
        skip = {".git", ".venv", "results", "logs", ".snakemake", "__pycache__", ".pytest_cache"}
        files = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_mem_mb() -> int:
    """What slurm-local-cluster.sh gives its one node: half the machine's memory."""
    return int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 // 2


def job_mem_mb(node_mem: int) -> int:
    """The memory each job asks for: two jobs side by side on the node."""
    return max(200, node_mem // 2 - 100)


def smoke_config_for_node(path: Path, node_mem: int) -> Path:
    """The smoke config plus the resources this one small node can grant."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["resources"] = {"default": {"partition": "debug", "mem_mb": job_mem_mb(node_mem)}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


WRAPPER = """#!/usr/bin/env bash
# Called by slurm-local-cluster.sh as $SMK_VENV/bin/snakemake, inside the cluster session, in the
# workflow copy: the whole smoke workflow; one merge forced again and nothing after it; then run 0's
# fine-tune forced again, its SLURM job cancelled (scancel) once epoch 1 is published, and the
# profile's retry left to finish it from that epoch.
set -uo pipefail
export PATH={bin}:$PATH
{bin}/snakemake "$@" > {logs}/full.log 2>&1 || {{ tail -n 60 {logs}/full.log; exit 3; }}
{bin}/snakemake "$@" --forcerun {target} --until merge > {logs}/rerun.log 2>&1 \\
    || {{ tail -n 60 {logs}/rerun.log; exit 4; }}
{bin}/snakemake "$@" --forcerun {fine_tune} --until fine_tune > {logs}/cancel.log 2>&1 &
smk=$!
for _ in $(seq 1 600); do  # Snakemake deletes the forced job's outputs before submitting it ...
    [ -d {fine_tune_dir}/epoch1 ] || break
    sleep 0.2
done
for _ in $(seq 1 3000); do  # ... so epoch1 reappearing means epoch 1 is done and epoch 2 under way
    [ -d {fine_tune_dir}/epoch1 ] && break
    kill -0 $smk 2>/dev/null || break
    sleep 0.2
done
jobs_running=$(squeue -h -o %i)
echo "$jobs_running" > {logs}/cancelled_jobs.txt
[ -n "$jobs_running" ] && scancel $jobs_running
wait $smk || {{ tail -n 60 {logs}/cancel.log; exit 5; }}
mkdir -p results && echo "smoke workflow ran on SLURM; one merge re-ran alone; a cancelled fine-tune resumed" \\
    > {summary}
"""


class SlurmRun:
    """The SLURM run (module docstring), started in the background; ``wait`` gives what test_slurm reads."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.base = Path(tempfile.mkdtemp(prefix="omslurm-", dir="/tmp"))  # short: munge's socket path is limited
        self.base.chmod(0o755)  # munged wants its socket's directories a+x
        self.wf = copy_repo(tmp / "wf")
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.node_mem = node_mem_mb()
        self.config = smoke_config_for_node(self.wf / "slurm-smoke.yaml", self.node_mem)
        fake_venv = tmp / "smkvenv"
        (fake_venv / "bin").mkdir(parents=True)
        wrapper = fake_venv / "bin" / "snakemake"
        wrapper.write_text(
            WRAPPER.format(
                bin=BIN,
                logs=self.logs,
                target=MERGED,
                fine_tune=f"{CANCELLED_RUN}/steps.csv",
                fine_tune_dir=CANCELLED_RUN,
                summary=SUMMARY,
            )
        )
        wrapper.chmod(0o755)
        ctld, slurmd, dbd, db = free_ports(4)
        env = {
            **os.environ,
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1",
            "SLURMTEST_BASE": str(self.base),
            "SMK_VENV": str(fake_venv),
            "SMK_WORKDIR": str(self.wf),
            "SMK_TIMEOUT": "1500",
            "ACCOUNTING": "1",
            "SLURMCTLD_PORT": str(ctld),
            "SLURMD_PORT": str(slurmd),
            "SLURMDBD_PORT": str(dbd),
            "MARIADB_PORT": str(db),
        }
        args = [
            "--profile",
            "profiles/slurm",
            "--configfile",
            self.config.name,
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--slurm-keep-successful-logs",
            "--slurm-status-command",
            "squeue",
        ]
        self.t0 = time.monotonic()
        self.out_file = open(tmp / "cluster.log", "w")
        self.proc = subprocess.Popen(
            ["bash", str(SCRIPT), *args], stdout=self.out_file, stderr=subprocess.STDOUT, env=env, text=True
        )

    def wait(self) -> SimpleNamespace:
        try:
            rc = self.proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        seconds = time.monotonic() - self.t0
        self.out_file.close()
        out = (self.tmp / "cluster.log").read_text()
        jobcomp = self.base / "cluster" / "log" / "jobcomp.txt"
        jobcomp_text = jobcomp.read_text() if jobcomp.exists() else ""
        shutil.rmtree(self.base, ignore_errors=True)
        if rc != 0:
            raise AssertionError(f"SLURM run failed ({rc}) after {seconds:.0f} s:\n{out[-6000:]}")
        read = lambda name: (self.logs / name).read_text() if (self.logs / name).exists() else ""  # noqa: E731
        return SimpleNamespace(
            wf=self.wf,
            config=self.config,
            out=out,
            full=read("full.log"),
            rerun=read("rerun.log"),
            cancel=read("cancel.log"),
            cancelled=read("cancelled_jobs.txt").split(),
            jobcomp=jobcomp_text,
            node_mem=self.node_mem,
            seconds=seconds,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)


class SmokeRuns:
    """The local run, and the SLURM run beside it when asked for and possible (module docstring),
    started in the background when the session starts (tests/conftest.py), so the tests that come
    before the first reader run meanwhile, on the CPU time the SLURM run spends waiting; ``wait``
    gives a namespace: ``local`` (the workdir), ``slurm`` (what SlurmRun.wait gave, or None with
    ``slurm_missing`` saying why, a skip reason, or ``slurm_error``: the run failed, test_slurm fails
    with it, the other tests go on)."""

    def __init__(self, tmp_path_factory, with_slurm: bool):
        self.t0 = time.monotonic()
        self.reason = why_no_slurm() if with_slurm else "the session selected no SLURM cluster test"
        self.slurm = SlurmRun(tmp_path_factory.mktemp("slurm")) if self.reason is None else None
        self.local = tmp_path_factory.mktemp("smoke")
        cmd, env = snakemake_cmd(self.local)
        self.log = self.local.with_name(
            self.local.name + ".log"
        )  # beside the workdir: it holds only what the workflow wrote
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.local
        )
        self._result: SimpleNamespace | None = None

    def wait(self) -> SimpleNamespace:
        if self._result is None:
            try:
                rc = self.proc.wait()
                self._log_file.close()
                if rc != 0:
                    raise AssertionError(f"snakemake failed ({rc}):\n{self.log.read_text()[-6000:]}")
                result, error = None, None
                if self.slurm is not None:
                    try:
                        result = self.slurm.wait()
                    except AssertionError as exc:
                        error = str(exc)
            finally:
                self.stop()
            print(
                f"\nsmoke runs: local{' + SLURM' if self.slurm else ''} done {time.monotonic() - self.t0:.0f} s "
                "after they started"
            )
            self._result = SimpleNamespace(local=self.local, slurm=result, slurm_missing=self.reason, slurm_error=error)
        return self._result

    def stop(self) -> None:
        """Whatever still runs (a session cut short) is killed; the cluster is taken down."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._log_file.closed:
            self._log_file.close()
        if self.slurm is not None:
            self.slurm.stop()
