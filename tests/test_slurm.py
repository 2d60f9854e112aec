"""The workflow on a real SLURM cluster, and what profiles/slurm asks SLURM for.

The cluster tests (marked ``slurm``, deselect with ``-m "not slurm"``) start a throw-away single-node
cluster with ../shared/reference/slurm-local-cluster.sh (munged + slurmctld + slurmd, installed with
apt-get when root and missing), run tests/configs/smoke.yaml through profiles/slurm in a copy of the
repository, and in the same cluster session re-run one merge alone (--forcerun + --until), then force
run 0's fine-tune again, cancel its SLURM job (scancel) once epoch 1 is published, and let the
profile's retry finish it. They check that the jobs ran as SLURM jobs (the plugin's per-job logs,
SLURM's job-completion records with the requested memory and time limit), that the retry resumed
from epoch 1, and that orders, checkpoints, a merged model and table1.csv equal those of a local run
of the same config (profiles/local) done here. When this machine cannot run SLURM (not root, no
apt-get, the script missing) they skip and say why. Total: ~10-15 min on 2 CPU cores.

The other tests are cheap: the sbatch flags the plugin builds from the rules' resources.
"""

from __future__ import annotations

import hashlib
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

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / ".." / "shared" / "reference" / "slurm-local-cluster.sh").resolve()
SMOKE = ROOT / "tests" / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun", "munged", "mungekey")
RESULTS = "results/smollm2-135m/gsm/shuffle"
MERGED = f"{RESULTS}/merged/epoch2/select/seed0"  # the merge re-run alone in the same session
CANCELLED_RUN = f"{RESULTS}/runs/run0"  # the fine-tune cancelled mid-run and resumed in the same session
# Rules that run on the submit host (localrules); every other job must be a SLURM job.
LOCAL_RULES = {"prepare_data", "orders", "analyze", "all"}


# --------------------------------------------------------------------------------------------------
# cheap: the resources of each rule and the sbatch flags the plugin makes of them
# --------------------------------------------------------------------------------------------------

def resource_helpers(config: dict, threads: int = 1) -> dict:
    """rule_resources / rule_threads from workflow/rules/common.smk, run on a validated config."""
    from ordermerge.config import validate_config

    text = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    ns = {"config": validate_config(config), "THREADS": threads}
    exec(compile(text[text.index("_RESOURCE_NAMES = "):], "common.smk", "exec"), ns)
    return ns


class _Resources(dict):
    __getattr__ = dict.__getitem__


def sbatch_call(rule: str, config_path: Path, builtin: dict, attempt: int = 1) -> str:
    """The sbatch command line the SLURM plugin builds for one job of ``rule``."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    cfg = yaml.safe_load(config_path.read_text())
    ns = resource_helpers(cfg, cfg.get("threads_per_job", 1))
    res = ns["rule_resources"](rule, **builtin)
    res["runtime"] = res["runtime"](None, attempt)
    job = SimpleNamespace(resources=_Resources(res), threads=ns["rule_threads"](rule), name=rule)
    params = {"run_uuid": "x", "slurm_logfile": "/tmp/x.log", "comment_str": f"rule_{rule}",
              "account": "", "partition": "", "workdir": "/tmp"}
    return get_submit_command(job, params) + set_gres_string(job)


def test_gpu_fine_tune_asks_slurm_for_a_gpu_memory_time_and_cpus():
    call = sbatch_call("fine_tune", ROOT / "configs" / "gpu.yaml", {"mem_mb": 6000, "runtime": 120})
    assert "--gpus=1" in call and "--mem 16000" in call and "-t 60" in call and "--cpus-per-task=4" in call
    # a retry (profile `retries`) asks for attempt x runtime: the fine-tune resumes from its last epoch
    assert "-t 180" in sbatch_call("fine_tune", ROOT / "configs" / "gpu.yaml", {"mem_mb": 6000, "runtime": 120},
                                   attempt=3)
    merge = sbatch_call("merge", ROOT / "configs" / "gpu.yaml", {"mem_mb": 4000, "runtime": 30})
    assert "--gpus" not in merge and "--cpus-per-task=4" in merge and "--mem 8000" in merge


def test_config_overrides_partition_account_and_gpu_model(tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["resources"] = {"default": {"partition": "cpu", "account": "proj1"},
                        "fine_tune": {"gpus": 2, "gpu_model": "a100", "partition": "gpu", "cpus": 6,
                                      "slurm_extra": "--exclusive"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ns = resource_helpers(cfg)
    ft = ns["rule_resources"]("fine_tune", mem_mb=6000, runtime=120)
    assert ft["slurm_partition"] == "gpu" and ft["slurm_account"] == "proj1" and ft["mem_mb"] == 6000
    assert ns["rule_resources"]("merge", mem_mb=4000, runtime=30)["slurm_partition"] == "cpu"
    assert ns["rule_threads"]("fine_tune") == 6 and ns["rule_threads"]("merge") == 1
    call = sbatch_call("fine_tune", path, {"mem_mb": 6000, "runtime": 120})
    assert "--gpus=a100:2" in call and "--cpus-per-task=6" in call and "--exclusive" in call


def test_default_config_keeps_the_built_in_resources():
    ns = resource_helpers(yaml.safe_load((ROOT / "config.yaml").read_text()))
    res = ns["rule_resources"]("fine_tune", mem_mb=6000, runtime=120)
    assert res["gpu"] == 0 and res["mem_mb"] == 6000 and res["runtime"](None, 2) == 240
    assert set(res) == {"gpu", "mem_mb", "runtime"}  # no partition/account unless configured


def test_profiles_parse_and_name_real_options():
    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["retries"] >= 1
    assert "set-resources" not in slurm  # per-rule numbers live in the rules and the config
    local = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    assert local["resources"]["gpu"] >= 0
    help_text = subprocess.run([str(BIN / "snakemake"), "--help"], capture_output=True, text=True).stdout
    for key in list(slurm) + list(local):
        assert f"--{key}" in help_text, f"profile key {key!r} is not a snakemake option"


# --------------------------------------------------------------------------------------------------
# a real cluster
# --------------------------------------------------------------------------------------------------

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
        return f"SLURM is not installed ({', '.join(c for c in COMMANDS if not shutil.which(c))}) and there is no apt-get"
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
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True)
    if proc.returncode == 0:
        files = [f for f in proc.stdout.decode().split("\0") if f]
    else:  # not a git checkout: everything but outputs and environments
        skip = {".git", ".venv", "results", "logs", ".snakemake", "__pycache__", ".pytest_cache"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
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


def smoke_config_for_node(path: Path, node_mem_mb: int) -> Path:
    """The smoke config plus the resources this one small node can grant: two jobs side by side."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["resources"] = {"default": {"partition": "debug", "mem_mb": max(200, node_mem_mb // 2 - 100)}}
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
    > results/summary.txt
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_local_run(tmp: Path, config: Path) -> tuple[Path, subprocess.Popen]:
    """The same config run locally (profiles/local) in another copy: the reference the SLURM outputs
    must equal. It runs beside the SLURM run, on the CPU time the SLURM run spends waiting between
    status checks."""
    wd = copy_repo(tmp / "local")  # beside the same config.yaml as the SLURM copy
    shutil.copy2(config, wd / config.name)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "snakemake"), "--profile", "profiles/local", "--configfile", config.name, "--cores", "2"]
    log = open(tmp / "logs" / "local.log", "w")
    return wd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=wd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reason = why_no_slurm()
    if reason:
        pytest.skip(f"cannot run a SLURM cluster here: {reason}")
    tmp = tmp_path_factory.mktemp("slurm")
    base = Path(tempfile.mkdtemp(prefix="omslurm-", dir="/tmp"))  # short: munge's socket path is limited
    base.chmod(0o755)  # munged wants its socket's directories a+x
    wf = copy_repo(tmp / "wf")
    logs = tmp / "logs"
    logs.mkdir()
    node_mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) // 1024 // 2
    config = smoke_config_for_node(wf / "slurm-smoke.yaml", node_mem)
    fake_venv = tmp / "smkvenv"
    (fake_venv / "bin").mkdir(parents=True)
    wrapper = fake_venv / "bin" / "snakemake"
    wrapper.write_text(WRAPPER.format(bin=BIN, logs=logs, target=MERGED, fine_tune=f"{CANCELLED_RUN}/steps.csv",
                                      fine_tune_dir=CANCELLED_RUN))
    wrapper.chmod(0o755)
    ctld, slurmd = free_ports(2)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "SLURMTEST_BASE": str(base),
           "SMK_VENV": str(fake_venv), "SMK_WORKDIR": str(wf), "SMK_TIMEOUT": "1500",
           "SLURMCTLD_PORT": str(ctld), "SLURMD_PORT": str(slurmd)}
    args = ["--profile", "profiles/slurm", "--configfile", config.name, "--jobs", "4",
            "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs",
            "--slurm-status-command", "squeue"]
    t0 = time.monotonic()
    local_dir, local = start_local_run(tmp, config)
    try:
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1800)
        slurm_seconds = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise AssertionError(f"SLURM run failed ({proc.returncode}) after {slurm_seconds:.0f} s:\n{out[-6000:]}")
        local_rc = local.wait(timeout=1200)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
        jobcomp = base / "cluster" / "log" / "jobcomp.txt"
        jobcomp_text = jobcomp.read_text() if jobcomp.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
    assert local_rc == 0, f"local run failed:\n{(logs / 'local.log').read_text()[-4000:]}"
    print(f"\nSLURM smoke run + one merge re-run: {slurm_seconds:.0f} s (cluster up and down included); "
          f"with the local run beside it: {time.monotonic() - t0:.0f} s")
    return SimpleNamespace(wf=wf, local=local_dir, config=config, out=out, full=(logs / "full.log").read_text(),
                           rerun=(logs / "rerun.log").read_text(), cancel=(logs / "cancel.log").read_text(),
                           cancelled=(logs / "cancelled_jobs.txt").read_text().split(), jobcomp=jobcomp_text,
                           node_mem=node_mem)


@pytest.fixture(scope="module")
def cluster(runs):
    return runs


@pytest.fixture(scope="module")
def local_run(runs):
    return runs.local


def submitted(log: str) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's 'submitted with SLURM jobid N (log: .../rule_X/...)'."""
    return {m.group(1): m.group(2) for m in
            re.finditer(r"submitted with SLURM jobid (\d+) \(log: \S*?/slurm_logs/rule_(\w+)/", log)}


def jobcomp_records(text: str) -> dict[str, dict[str, str]]:
    recs = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            recs[fields["JobId"]] = fields
    return recs


def planned(log: str) -> dict[str, int]:
    block = log.split("Job stats:", 1)[1] if "Job stats:" in log else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


@pytest.mark.slurm
@pytest.mark.slow
def test_every_job_but_the_local_rules_ran_as_a_completed_slurm_job(cluster):
    jobs = submitted(cluster.full)
    plan = planned(cluster.full)
    remote = {rule: n for rule, n in plan.items() if rule not in LOCAL_RULES | {"total"}}
    assert remote and {r: list(jobs.values()).count(r) for r in remote} == remote
    assert not LOCAL_RULES & set(jobs.values())  # prepare_data, orders, analyze ran on the submit host
    records = jobcomp_records(cluster.jobcomp)
    assert set(jobs) <= set(records), f"jobs SLURM has no completion record of: {set(jobs) - set(records)}"
    mem = max(200, cluster.node_mem // 2 - 100)
    for jid, rule in jobs.items():
        rec = records[jid]
        assert rec["JobState"] == "COMPLETED", (rule, rec)
        assert rec["Partition"] == "debug"
        assert f"mem={mem}M" in rec.get("Tres", ""), (rule, rec.get("Tres"))  # resources.default.mem_mb
    limits = {rule: {records[j]["TimeLimit"] for j, r in jobs.items() if r == rule} for rule in remote}
    assert limits["fine_tune"] == {"120"} and limits["merge"] == {"30"}  # built-in runtimes, attempt 1
    # the plugin kept one log per SLURM job, named by its id
    logs = {p.stem for p in (cluster.wf / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(jobs) <= logs


@pytest.mark.slurm
@pytest.mark.slow
def test_one_merge_reran_alone_as_a_new_slurm_job_with_the_same_bytes(cluster, local_run):
    rerun = submitted(cluster.rerun)
    assert list(rerun.values()) == ["merge"], cluster.rerun[-3000:]
    assert not set(rerun) & set(submitted(cluster.full))
    assert planned(cluster.rerun).get("total") == 1
    assert sha256(cluster.wf / MERGED / "model.safetensors") == sha256(local_run / MERGED / "model.safetensors")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_outputs_equal_a_local_run(cluster, local_run):
    import pandas as pd

    for k in range(2):
        rel = f"{RESULTS}/orders/run{k}.npy"
        assert sha256(cluster.wf / rel) == sha256(local_run / rel), rel
    rel = f"{RESULTS}/runs/run1/epoch2/model.safetensors"
    assert sha256(cluster.wf / rel) == sha256(local_run / rel), rel
    t_slurm = pd.read_csv(cluster.wf / "results" / "tables" / "table1.csv")
    t_local = pd.read_csv(local_run / "results" / "tables" / "table1.csv")
    assert len(t_slurm) == 4
    pd.testing.assert_frame_equal(t_slurm, t_local, check_exact=False, rtol=1e-9)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_cancelled_fine_tune_resumes_from_its_last_epoch_and_ends_bit_identical(cluster, local_run):
    jobs = submitted(cluster.cancel)
    assert list(jobs.values()) == ["fine_tune", "fine_tune"], cluster.cancel[-3000:]  # first try + one retry
    first, retry = jobs
    assert cluster.cancelled == [first], (cluster.cancelled, jobs)
    records = jobcomp_records(cluster.jobcomp)
    assert records[first]["JobState"] == "CANCELLED" and records[retry]["JobState"] == "COMPLETED"
    assert records[retry]["TimeLimit"] == "240"  # attempt 2 asks for twice the runtime
    log = (cluster.wf / "logs" / "fine_tune" / "smollm2-135m_gsm_shuffle_run0.log").read_text()
    assert "resuming after epoch 1" in log, log[-2000:]
    assert not (cluster.wf / CANCELLED_RUN / ".resume").exists()  # removed once the run completed
    for rel in (f"{CANCELLED_RUN}/epoch1/model.safetensors", f"{CANCELLED_RUN}/epoch2/model.safetensors"):
        assert sha256(cluster.wf / rel) == sha256(local_run / rel), rel
