"""Every shipped config in configs/ validates and plans the DAG it should (snakemake -n, nothing run).

Each dry-run happens in an empty temporary directory through profiles/slurm, with the hub offline:
the hub configs (TinyLlama, Llama-2-7b + GSM8K) only build the DAG, nothing is fetched. ~30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ordermerge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Full cluster configs; the study's files are overlays on config.yaml (tested below, as make study runs them).
CONFIGS = sorted(c for c in (ROOT / "configs").glob("*.yaml") if not c.stem.startswith("study"))
STUDY = {  # overlay chain (+ --config) -> jobs per rule, worked out as for EXPECTED (K=4, final epoch scored)
    # the default extended: 3 precisions (fp32 as saved; bf16, bf16sr rounded: 4 rounds each); per precision
    # average + select x 2 + resample1 x 2 + resample4 x 2 + task_arithmetic + ties + dare x 2 + model_stock +
    # tsv = 13 merges; losses of 3 merges; K-sweep sizes 2/3/4 with 3/3/1 subsets x 2 methods = 14 each
    ("study",): {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 4,
        "fine_tune": 4,
        "round_checkpoint": 8,
        "evaluate_single": 12,
        "sample_losses": 12,
        "merge": 39,
        "evaluate_merged": 39,
        "sample_losses_merged": 9,
        "ksweep_merge": 42,
        "ksweep_evaluate": 42,
        "analyze": 1,
        "all": 1,
        "total": 215,
    },
    # a replication: the default's DAG (2 precisions, 5 merges each), new orders, its own results_dir
    ("study-replicate",): {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 4,
        "fine_tune": 4,
        "round_checkpoint": 4,
        "evaluate_single": 8,
        "sample_losses": 8,
        "merge": 10,
        "evaluate_merged": 10,
        "sample_losses_merged": 6,
        "analyze": 1,
        "all": 1,
        "total": 58,
    },
    # the earlier schedule ablation (by hand): 2 schemes, every epoch scored and rounded; K-sweep 4 + 4 per precision
    ("study-schedule",): {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 8,
        "fine_tune": 8,
        "round_checkpoint": 24,
        "evaluate_single": 16,
        "sample_losses": 48,
        "merge": 44,
        "evaluate_merged": 20,
        "sample_losses_merged": 36,
        "ksweep_merge": 16,
        "ksweep_evaluate": 16,
        "analyze": 1,
        "all": 1,
        "total": 240,
    },
    # constant lr: shuffle only, final epoch only, no K-sweep: the default's DAG
    ("study-schedule", "study-constant"): {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 4,
        "fine_tune": 4,
        "round_checkpoint": 4,
        "evaluate_single": 8,
        "sample_losses": 8,
        "merge": 10,
        "evaluate_merged": 10,
        "sample_losses_merged": 6,
        "analyze": 1,
        "all": 1,
        "total": 58,
    },
}
STUDY_ARGS = {("study-replicate",): ["--config", "order_seed=1", "results_dir=results-study/seed1"]}
STUDY_RESULTS = {
    ("study",): "results",
    ("study-replicate",): "results-study/seed1",
    ("study-schedule",): "results-study/linear",
    ("study-schedule", "study-constant"): "results-study/constant",
}

# Jobs per rule, worked out by hand from each config (per model x task x scheme):
#   fine_tune / orders / evaluate_single: K; sample_losses: K x scored epochs;
#   merge: final-epoch merges (average once + every other method x seeds) + Fig. 4 merges (each method,
#   first seed, at the other scored epochs); evaluate_merged: the final-epoch merges;
#   sample_losses_merged: each method x scored epochs (first seed).
EXPECTED = {
    # K=8, 3 epochs (all scored), 5 paper methods x 5 seeds + 4 baselines (dare x 5 seeds, the rest
    # deterministic: 1 seed), 2 schemes
    # 2 tasks x 2 schemes x (K=8; 9 methods of which 4 deterministic: 4 + 5 x 5 seeds = 29 final merges,
    # + 9 x 2 Fig. 4 merges; K-sweep sizes 2/4/6/8 with 3/3/3/1 subsets x 2 methods); multitask: 11
    # merges (average once, select and resample1 x 5 seeds), each evaluated on both tasks
    "gpu": {
        "base_model": 1,
        "prepare_data": 2,
        "orders": 32,
        "fine_tune": 32,
        "evaluate_single": 32,
        "sample_losses": 96,
        "merge": 188,
        "evaluate_merged": 116,
        "sample_losses_merged": 108,
        "ksweep_merge": 80,
        "ksweep_evaluate": 80,
        "multitask_merge": 11,
        "evaluate_multitask": 22,
        "analyze": 1,
        "all": 1,
        "total": 802,
    },
    # K=8, 3 epochs, 3 methods x 5 seeds, 1 scheme
    "gpu-1b": {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 8,
        "fine_tune": 8,
        "evaluate_single": 8,
        "sample_losses": 24,
        "merge": 17,
        "evaluate_merged": 11,
        "sample_losses_merged": 9,
        "analyze": 1,
        "all": 1,
        "total": 89,
    },
    # K=20, 3 epochs, 3 methods x 5 seeds, 1 scheme
    "llama2-7b-gsm8k": {
        "base_model": 1,
        "prepare_data": 1,
        "orders": 20,
        "fine_tune": 20,
        "evaluate_single": 20,
        "sample_losses": 60,
        "merge": 17,
        "evaluate_merged": 11,
        "sample_losses_merged": 9,
        "analyze": 1,
        "all": 1,
        "total": 161,
    },
}


def dry_run(workdir: Path, configfile: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(configfile),
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "-n",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=300)


def job_stats(text: str) -> dict[str, int]:
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def resources_of(text: str, rule: str) -> set[str]:
    """The distinct `resources:` lines the dry-run prints for one rule's jobs."""
    return set(re.findall(rf"^rule {rule}:\n(?:    .*\n)*?    resources: (.*)$", text, re.M))


def test_every_config_has_expected_counts():
    assert {c.stem for c in CONFIGS} == set(EXPECTED), "add the new config's job counts to EXPECTED"


@pytest.mark.parametrize("overlays", STUDY, ids="+".join)
def test_study_overlays_plan_their_dags(overlays, tmp_path):
    files = [ROOT / "config.yaml", *(ROOT / "configs" / f"{o}.yaml" for o in overlays)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            str(BIN / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            *map(str, files),
            "-n",
            "--cores",
            "2",
            *STUDY_ARGS.get(overlays, []),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert job_stats(out) == STUDY[overlays]
    assert f" {STUDY_RESULTS[overlays]}/smollm2-135m/asdiv" in out  # each run in its own results_dir


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_plans_its_dag(config, tmp_path):
    cfg = load_config(config)
    assert cfg["runs"] >= 8 and cfg["train"]["epochs"] == 3
    proc = dry_run(tmp_path, config)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert job_stats(out) == EXPECTED[config.stem]
    # GPU jobs ask for one GPU each (a sharded fine-tune: its configured count); merges stream on the CPU
    for rule in ("fine_tune", "sample_losses", "evaluate_single", "evaluate_merged"):
        gpus = cfg["resources"][rule]["gpus"] if rule == "fine_tune" else 1
        lines = resources_of(out, rule)
        assert lines and all(re.search(rf"\bgpu={gpus}\b", line) for line in lines), (rule, lines)
    assert all("gpu=0" in line for line in resources_of(out, "merge"))
    ft = cfg["resources"]["fine_tune"]
    assert all(
        f"mem_mb={ft['mem_mb']}," in line and f"runtime={ft['runtime']}," in line
        for line in resources_of(out, "fine_tune")
    )
    assert not (tmp_path / cfg["results_dir"]).exists()  # a dry run writes nothing


# behind the GPU slot launcher, which runs them unchanged in a SLURM job (src/ordermerge/gpu_slots/)
@pytest.mark.parametrize(
    "config, launcher",
    [
        ("gpu", "Shell command: python -m ordermerge.gpu_slots --gpus 1 -- ordermerge fine-tune --threads "),
        (
            "llama2-7b-gsm8k",
            "Shell command: python -m ordermerge.gpu_slots --gpus 4 -- torchrun --standalone "
            "--nproc-per-node 4 -m ordermerge fine-tune --threads ",
        ),
    ],
)
def test_fine_tune_runs_one_process_per_gpu(config, launcher, tmp_path):
    proc = dry_run(tmp_path, ROOT / "configs" / f"{config}.yaml", "-p", "--until", "fine_tune")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    commands = [line for line in out.splitlines() if "fine-tune --" in line]
    assert commands and all(launcher in line for line in commands), commands[:1]


def test_paper_config_is_the_paper_setting():
    cfg = load_config(ROOT / "configs" / "llama2-7b-gsm8k.yaml")
    (model,) = cfg["models"].values()
    (task,) = cfg["tasks"].values()
    assert model["source"] == "meta-llama/Llama-2-7b-hf"
    assert (task["source"], task["path"], task["name"]) == ("hf", "gsm8k", "main")
    t = cfg["train"]
    assert (t["lr"], t["epochs"], t["batch_size"], t["compute_dtype"]) == (2e-5, 3, 64, "bfloat16")
    # 16 bytes per parameter of fp32 weights + grads + AdamW do not fit one 80 GB GPU: shard them
    assert t["method"] == "full" and t["parallel"] == "fsdp" and cfg["resources"]["fine_tune"]["gpus"] >= 2
    assert cfg["runs"] == 20 and len(cfg["merge"]["seeds"]) == 5 and "resample1" in cfg["merge"]["methods"]
    assert 800 <= task["max_length"] <= 1200


def test_a_config_run_from_the_repository_root_plans_only_its_own_model(tmp_path):
    shutil.copy2(ROOT / "config.yaml", tmp_path / "config.yaml")
    out = dry_run(tmp_path, ROOT / "configs" / "gpu-1b.yaml")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "smollm2-135m" not in out.stdout + out.stderr


def test_the_slurm_profile_lets_every_ready_job_of_a_rule_through_at_once():
    """With job arrays, snakemake-executor-plugin-slurm 2.8.0 never submits the part of a rule's ready
    jobs that `jobs` or `max-jobs-per-timespan` holds back, and the run hangs (its issue #473). So both
    must be at least every shipped config's job count of any one rule (as planned above)."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile.get("slurm-array-jobs"), "profiles/slurm submits no job arrays"
    count, span = profile["max-jobs-per-timespan"].split("/")
    assert span == "1s", "a longer timespan would hold back more"
    widest = {
        name: max(n for rule, n in jobs.items() if rule != "total")
        for name, jobs in [*EXPECTED.items(), *((" + ".join(k), v) for k, v in STUDY.items())]
    }
    too_wide = {name: n for name, n in widest.items() if n > min(profile["jobs"], int(count))}
    assert not too_wide, f"rules with more jobs than profiles/slurm lets through at once: {too_wide}"


def workflow_rules() -> tuple[set[str], set[str]]:
    """(every rule the rule files define, the local ones), read from workflow/rules/*.smk."""
    text = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    rules = set(re.findall(r"^rule (\w+):", text, re.M)) | set(re.findall(r"^use rule \w+ as (\w+) with:", text, re.M))
    local = {
        name
        for block in re.findall(r"^localrules:\n((?:    \w+,\n)+)", text, re.M)
        for name in re.findall(r"\w+", block)
    }
    return rules, local


def test_the_config_resources_keys_are_the_workflows_job_rules():
    """The schema's `resources` keys say which rules the config can size (ordermerge.resources applies them
    to exactly those): every rule that runs as a job, and no local rule, whose keys would be ignored."""
    from ordermerge.config import load_schema
    from ordermerge.resources import job_rules

    rules, local = workflow_rules()
    assert local == {"prepare_data", "orders", "analyze"}
    assert set(job_rules(load_schema())) == rules - local


def test_the_config_sizes_jobs_over_the_workflow_profile(tmp_path):
    """A rule the config leaves alone keeps the workflow profile's numbers (profiles/default); a config key
    wins over them, `resources.<rule>` over `resources.default`; cpus (else threads_per_job) are the threads."""
    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "smoke.yaml").read_text())
    cfg["threads_per_job"] = 2
    cfg["resources"] = {
        "default": {"mem_mb": 5000},
        "merge": {"mem_mb": 7000, "runtime": 45, "cpus": 1, "partition": "big"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            str(BIN / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(path),
            "-n",
            "-p",
            "--cores",
            "4",
            "--until",
            "merge",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ft, merge = resources_of(out, "fine_tune"), resources_of(out, "merge")
    assert ft and all("mem_mb=5000," in r and "runtime=120," in r and "gpu=0" in r for r in ft), ft
    assert merge and all("mem_mb=7000," in r and "runtime=45," in r and "slurm_partition=big" in r for r in merge)
    assert "slurm_partition" not in str(ft)
    assert re.search(r"ordermerge fine-tune --threads 2 ", out) and re.search(r"ordermerge merge .*--threads 1 ", out)
