import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Tests never touch the network: any hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402

from helpers import build_tiny_base, snakemake  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real run of tests/configs/smoke.yaml (minutes), shared by every test module that needs one."""
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny offline Llama (tests/helpers.py), built once per session and dtype; read-only for tests
    (copy it before breaking it). Call with the dtype: ``tiny_models("float32")``."""
    built: dict[str, Path] = {}

    def get(dtype: str = "bfloat16") -> Path:
        if dtype not in built:
            built[dtype] = build_tiny_base(tmp_path_factory.mktemp(f"tiny-{dtype}") / "base", dtype=dtype)
        return built[dtype]

    return get


@pytest.fixture(scope="session")
def tiny_base(tiny_models) -> Path:
    """The tiny Llama stored in bfloat16 (as the fine-tune stage's inputs are)."""
    return tiny_models("bfloat16")


@pytest.fixture(scope="session")
def tiny_base_f32(tiny_models) -> Path:
    """The tiny Llama stored in float32 (exact batched-vs-reference comparisons)."""
    return tiny_models("float32")
