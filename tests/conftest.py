import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Tests never touch the network: any hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real run of tests/configs/smoke.yaml (minutes), shared by every test module that needs one."""
    from test_workflow import snakemake

    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir)
    return workdir
