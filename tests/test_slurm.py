"""The workflow on a real SLURM cluster, and what profiles/slurm asks SLURM for.

The cluster tests (marked ``slurm``, deselect with ``-m "not slurm"``) read the session's SLURM run
(tests/smoke_runs.py): a throw-away single-node cluster with accounting
(../shared/reference/slurm-local-cluster.sh with ACCOUNTING=1, installed with apt-get when root and
missing) runs tests/configs/smoke.yaml through profiles/slurm, job arrays on, in a copy of the
repository, and in the same cluster session re-runs one merge alone (--forcerun + --until), then
forces run 0's fine-tune again, cancels its SLURM job (scancel) once epoch 1 is published, and lets
the profile's retry finish it. They check that the jobs ran as SLURM jobs, the many-job rules as
array tasks (the plugin's logs, SLURM's job-completion records with the requested memory and time
limit), that the plugin wrote its efficiency report, that the retry resumed from epoch 1, and that
orders, checkpoints, a merged model and table1.csv equal those of the session's local run of the
same config (test_determinism compares every file). When this machine cannot run SLURM (not root,
no apt-get, the script missing) they skip and say why. Total: ~8-12 min on 2 CPU cores, the local
run included.

The other tests are cheap: the sbatch flags the plugin builds from the jobs' resources (the workflow
profile's built-in numbers, the config's over them), and the profiles' keys and array rules.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from smoke_runs import CANCELLED_RUN, MERGED, RESULTS, job_mem_mb

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent
# Rules that run on the submit host (localrules); every other job must be a SLURM job.
LOCAL_RULES = {"prepare_data", "orders", "analyze", "all"}


# --------------------------------------------------------------------------------------------------
# cheap: the resources of each rule and the sbatch flags the plugin makes of them
# --------------------------------------------------------------------------------------------------


def builtin_resources(rule: str, attempt: int = 1) -> dict:
    """A rule's built-in numbers: the workflow profile's set-resources (profiles/default), at ``attempt``."""
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    return {
        name: eval(str(value), {}, {"attempt": attempt})  # the profile's expressions, as Snakemake does
        for name, value in profile["set-resources"][rule].items()
    }


def job_resources(rule: str, cfg: dict, attempt: int = 1) -> tuple[dict, int]:
    """The resources and threads of one job of ``rule``: the config's (ordermerge.resources) over the
    workflow profile's, as the Snakefile's apply_config_resources sets them."""
    from ordermerge import resources
    from ordermerge.config import validate_config

    cfg = validate_config(cfg)
    res = {**builtin_resources(rule, attempt), **resources.job_resources(cfg, rule)}
    if callable(res["runtime"]):
        res["runtime"] = res["runtime"](None, attempt)
    return res, resources.job_threads(cfg, rule)


class _Resources(dict):
    __getattr__ = dict.__getitem__


def sbatch_call(rule: str, config_path: Path, attempt: int = 1) -> str:
    """The sbatch command line the SLURM plugin builds for one job of ``rule``."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res, threads = job_resources(rule, yaml.safe_load(config_path.read_text()), attempt)
    job = SimpleNamespace(resources=_Resources(res), threads=threads, name=rule)
    params = {
        "run_uuid": "x",
        "slurm_logfile": "/tmp/x.log",
        "comment_str": f"rule_{rule}",
        "account": "",
        "partition": "",
        "workdir": "/tmp",
    }
    return get_submit_command(job, params) + set_gres_string(job)


def test_gpu_fine_tune_asks_slurm_for_a_gpu_memory_time_and_cpus():
    call = sbatch_call("fine_tune", ROOT / "configs" / "gpu.yaml")
    assert "--gpus=1" in call and "--mem 16000" in call and "-t 60" in call and "--cpus-per-task=4" in call
    # a retry (profile `retries`) asks for attempt x runtime: the fine-tune resumes from its last epoch
    assert "-t 180" in sbatch_call("fine_tune", ROOT / "configs" / "gpu.yaml", attempt=3)
    merge = sbatch_call("merge", ROOT / "configs" / "gpu.yaml")
    assert "--gpus" not in merge and "--cpus-per-task=4" in merge and "--mem 8000" in merge


def test_config_overrides_partition_account_and_gpu_model(tmp_path):
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["resources"] = {
        "default": {"partition": "cpu", "account": "proj1"},
        "fine_tune": {"gpus": 2, "gpu_model": "a100", "partition": "gpu", "cpus": 6, "slurm_extra": "--exclusive"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ft, ft_threads = job_resources("fine_tune", cfg)
    assert ft["slurm_partition"] == "gpu" and ft["slurm_account"] == "proj1" and ft["mem_mb"] == 6000
    merge, merge_threads = job_resources("merge", cfg)
    assert merge["slurm_partition"] == "cpu" and ft_threads == 6 and merge_threads == 1
    call = sbatch_call("fine_tune", path)
    assert "--gpus=a100:2" in call and "--cpus-per-task=6" in call and "--exclusive" in call


def test_default_config_keeps_the_built_in_resources():
    from ordermerge import resources
    from ordermerge.config import validate_config

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert resources.job_resources(validate_config(raw), "fine_tune") == {"gpu": 0}  # no partition unless set
    res, _ = job_resources("fine_tune", raw, attempt=2)
    assert res == {"gpu": 0, "mem_mb": 6000, "runtime": 240}


def test_profiles_parse_and_name_real_options():
    from ordermerge import resources
    from ordermerge.config import load_schema

    slurm = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["retries"] >= 1
    # per-rule numbers live in the workflow profile and the config; a set-resources here would replace them
    assert "set-resources" not in slurm
    local = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    assert local["resources"]["gpu"] >= 0
    default = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert set(default) == {"set-resources"}  # a default-resources here would hide profiles/slurm's
    assert list(default["set-resources"]) == resources.job_rules(load_schema())  # every job rule, no other
    help_text = subprocess.run([str(BIN / "snakemake"), "--help"], capture_output=True, text=True).stdout
    for key in list(slurm) + list(local) + list(default):
        assert f"--{key}" in help_text, f"profile key {key!r} is not a snakemake option"


# --------------------------------------------------------------------------------------------------
# a real cluster: the session's SLURM run of the smoke config (tests/smoke_runs.py)
# --------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cluster(smoke_runs):
    if smoke_runs.slurm_error:
        raise AssertionError(smoke_runs.slurm_error)
    if smoke_runs.slurm is None:
        pytest.skip(f"cannot run a SLURM cluster here: {smoke_runs.slurm_missing}")
    return smoke_runs.slurm


@pytest.fixture(scope="module")
def local_run(smoke_runs):
    """The session's local run of the same config, made beside the SLURM run: the bytes to equal."""
    return smoke_runs.local


def job_rules(log: str) -> dict[str, str]:
    """Snakemake job id -> rule, from the job blocks Snakemake prints ('rule X:' ... 'jobid: N')."""
    return {
        m.group(2): m.group(1)
        for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:[ \t]+.*\n)*?[ \t]+jobid: (\d+)$", log, re.M)
    }


def submitted(log: str) -> dict[str, str]:
    """SLURM job id -> rule: plain jobs ('submitted with SLURM jobid N (log: .../rule_X/...)') as 'N',
    array tasks ('Submitted array job with Snakemake IDs a,b and SLURM job ID N. The individual task
    IDs are s-e.') as 'N_i'."""
    jobs = {
        m.group(1): m.group(2)
        for m in re.finditer(r"submitted with SLURM jobid (\d+) \(log: \S*?/slurm_logs/rule_(\w+)/", log)
    }
    rules = job_rules(log)
    for m in re.finditer(
        r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
        r"The individual task IDs are (\d+)-(\d+)",
        log,
    ):
        ids, first = m.group(1).split(","), int(m.group(3))
        assert len(ids) == int(m.group(4)) - first + 1, m.group(0)
        for k, sid in enumerate(ids):
            jobs[f"{m.group(2)}_{first + k}"] = rules[sid]
    return jobs


def jobcomp_records(text: str) -> dict[str, dict[str, str]]:
    """SLURM's job-completion records by job id; an array task's also as 'ArrayJobId_ArrayTaskId'."""
    recs = {}
    for line in text.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            recs[fields["JobId"]] = fields
            if fields.get("ArrayJobId", "0") not in ("", "0") and fields.get("ArrayTaskId", "") not in (
                "",
                "4294967294",
            ):
                recs[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
    return recs


def planned(log: str) -> dict[str, int]:
    block = log.split("Job stats:", 1)[1] if "Job stats:" in log else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def array_rules() -> set[str]:
    """The rules profiles/slurm submits as job arrays."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    return {r.strip() for r in str(profile.get("slurm-array-jobs", "")).replace(";", ",").split(",") if r.strip()}


def test_the_profiles_array_rules_are_the_workflows_many_job_rules():
    """Every name in slurm-array-jobs is a rule (a typo would silently submit that rule plainly), and
    every rule the default run has several jobs of is among them, local rules aside."""
    text = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    rules = set(re.findall(r"^(?:use )?rule (\w+)(?=:| as )", text, re.M)) | set(re.findall(r" as (\w+) with:", text))
    assert array_rules() and array_rules() <= rules, array_rules() - rules
    assert {"fine_tune", "sample_losses", "merge", "evaluate_single", "evaluate_merged"} <= array_rules()
    assert not array_rules() & LOCAL_RULES


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
    mem = job_mem_mb(cluster.node_mem)
    for jid, rule in jobs.items():
        rec = records[jid]
        assert rec["JobState"] == "COMPLETED", (rule, rec)
        assert rec["Partition"] == "debug"
        asked = int(re.search(r"mem=(\d+)M", rec.get("Tres", "")).group(1))
        # resources.default.mem_mb; an array asks for a few MB more, for the payload of its tasks' commands
        assert asked == mem or ("_" in jid and mem < asked <= mem + 64), (rule, rec.get("Tres"))
    limits = {rule: {records[j]["TimeLimit"] for j, r in jobs.items() if r == rule} for rule in remote}
    assert limits["fine_tune"] == {"120"} and limits["merge"] == {"30"}  # built-in runtimes, attempt 1
    # the plugin kept one log per SLURM job, named by its id
    logs = {p.stem for p in (cluster.wf / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(jobs) <= logs


@pytest.mark.slurm
@pytest.mark.slow
def test_the_many_job_rules_ran_as_job_arrays_and_the_efficiency_report_was_written(cluster):
    import pandas as pd

    jobs = submitted(cluster.full)
    arrays: dict[str, list[str]] = {}  # SLURM array id -> the rules of its tasks
    for jid, rule in jobs.items():
        if "_" in jid:
            arrays.setdefault(jid.split("_")[0], []).append(rule)
    print("\njob arrays:", {a: f"{rules[0]} x {len(rules)}" for a, rules in arrays.items()})
    assert arrays, "no job array was submitted"
    assert all(len(set(rules)) == 1 for rules in arrays.values()), arrays  # one rule per array
    assert {rules[0] for rules in arrays.values()} <= array_rules()
    # jobs that become ready together go in together: the smoke run's 4 merges, its per-sample losses
    assert max(len(rules) for rules in arrays.values()) >= 4, arrays
    reports = sorted((cluster.wf / "logs" / "slurm").glob("efficiency_report_*.csv"))
    assert reports, "the plugin wrote no efficiency report (profile: slurm-efficiency-report)"
    report = pd.concat([pd.read_csv(r) for r in reports])  # one per Snakemake invocation in the session
    assert {"JobID", "Elapsed_sec", "CPU Efficiency (%)", "Memory Usage (%)", "RequestedMem_MB"} <= set(report.columns)
    main_ids = {str(i) for i in report["MainJobID"]}
    assert {j.split("_")[0] for j in jobs} <= main_ids, "jobs of the run missing from its efficiency report"
    assert (report["Elapsed_sec"] > 0).all() and (report["RequestedMem_MB"] >= job_mem_mb(cluster.node_mem)).all()


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
    assert len(t_slurm) == 8  # 4 rows (single + 3 merges) in each of 2 precisions
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
