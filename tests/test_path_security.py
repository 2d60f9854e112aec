"""Security of paths and remote code, beyond the config catalogue (tests/test_config.py):

- model and task names become directories and Snakemake wildcards; every way to leave the results
  dir through one (``..``, ``/``, an absolute path, a hidden name, a wildcard) is rejected for both
  sections (the catalogue has 'a/b' for models and '../x' for tasks; the rest are here);
- ``trust_remote_code`` reaches the base-model command only when the config key is true, and then
  with the pinned revision the config requires (the command used to drop the revision).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ordermerge.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = yaml.safe_load((ROOT / "tests" / "configs" / "smoke.yaml").read_text())
ESCAPES = ["..", "../../etc", "/etc", "a/../../b", "a\\..\\b", ".hidden", ".", "{run}", "x*", "~root"]
ALREADY_IN_CATALOGUE = {("models", "a/b"), ("tasks", "../x")}
# Counted by tests/reliability_counts.py (configs rejected, with the catalogue).
PATH_ESCAPE_CASES = [
    (section, name)
    for section in ("models", "tasks")
    for name in ESCAPES
    if (section, name) not in ALREADY_IN_CATALOGUE
]


@pytest.mark.parametrize("section, name", PATH_ESCAPE_CASES, ids=[f"{s}:{n}" for s, n in PATH_ESCAPE_CASES])
def test_names_that_would_leave_the_results_dir_are_rejected(section, name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = copy.deepcopy(SMOKE)
    cfg[section] = {name: next(iter(cfg[section].values()))}
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert f"{section}: {name!r}" in str(info.value) and "not a valid" in str(info.value), str(info.value)


def test_a_plain_name_is_accepted(monkeypatch):
    """The rejections above are about the names, not about the config they sit in."""
    monkeypatch.chdir(ROOT)
    cfg = copy.deepcopy(SMOKE)
    cfg["tasks"] = {"gsm-2_b": next(iter(cfg["tasks"].values()))}
    assert "gsm-2_b" in validate_config(cfg)["tasks"]


def test_remote_code_only_by_the_config_key_and_with_its_revision(tmp_path):
    """A dry run prints the base-model commands of a trusted (pinned) and a default model."""
    cfg = copy.deepcopy(SMOKE)
    revision = "0123456789abcdef0123456789abcdef01234567"
    cfg["models"] = {
        "trusted": {"source": "org/trusted", "trust_remote_code": True, "revision": revision},
        "plain": {"source": "org/plain"},
    }
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            str(bin_dir / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(path),
            "-n",
            "-p",
            "--cores",
            "1",
            "results/trusted/base",
            "results/plain/base",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "ordermerge base-model" in line]
    trusted = [c for c in commands if "org/trusted" in c]
    plain = [c for c in commands if "org/plain" in c]
    assert len(trusted) == 1 and len(plain) == 1, commands
    assert f"--trust-remote-code --revision {revision}" in trusted[0]
    assert "--trust-remote-code" not in plain[0] and "--revision" not in plain[0]
    assert not (tmp_path / "results").exists()
