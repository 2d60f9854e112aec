"""Determinism end to end: two runs of the smoke config in two directories give the same bytes.

Every file under ``results/`` is compared by sha256: orders, checkpoints (CPU), merges, per-sample
losses, metrics JSON, tables and figures. Only wall-clock measurements are dropped before hashing,
because they measure the machine, not the result:
- ``seconds`` in each evaluation's metrics JSON (how long the evaluation took);
- the ``seconds`` and ``tokens_per_s`` columns of ``steps.csv`` (per-step timing).
Nothing else is excluded; a new non-deterministic field makes this test fail until it is named here.

The first run is the session's local smoke run; the second is the session's SLURM run of the same
config where the session has one (tests/smoke_runs.py: job arrays, a merge re-run alone, a cancelled
and resumed fine-tune; only the wrapper's ``summary.txt`` is not the workflow's and is left out),
else one more local run here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from helpers import snakemake
from smoke_runs import SUMMARY

TIMING_JSON_KEYS = {"seconds"}
TIMING_CSV_COLUMNS = {"seconds", "tokens_per_s"}  # = ordermerge.train.loop.TIMING_COLUMNS
# Every kind of artefact must be among the compared files, or the test proves nothing about it.
REQUIRED = [
    "/orders/run0.npy",
    "/runs/run0/epoch2/model.safetensors",
    "/runs/run1/steps.csv",
    "/runs/run0/bf16/epoch2/model.safetensors",
    "/runs/run1/bf16/epoch1/round.json",
    "/fp32/merged/epoch2/average/seed0/model.safetensors",
    "/bf16/merged/epoch2/select/seed1/merge.json",
    "/bf16/merged/epoch2/resample1/seed0/model.safetensors",
    "/fp32/merged/epoch2/resample1/seed0/merge.json",
    "/fp32/eval/single/run0.json",
    "/bf16/eval/merged/select/seed0.json",
    "/bf16/harness/single/run0.json",
    "/fp32/harness/merged/select/seed0.samples.jsonl",
    "tables/harness_agreement.csv",
    "tables/table1.csv",
    "tables/imbalance.csv",
    "tables/metrics.csv",
    "tables/storage.csv",
    "figures/fig1_",
    "figures/storage_",
]


def normalised(path: Path) -> bytes:
    """The file's bytes, with wall-clock timing fields removed (see the module docstring)."""
    data = path.read_bytes()
    if path.suffix == ".json" and path.name not in ("merge.json", "checkpoint.json"):
        obj = json.loads(data)
        if isinstance(obj, dict) and TIMING_JSON_KEYS & obj.keys():
            return json.dumps({k: v for k, v in obj.items() if k not in TIMING_JSON_KEYS}, sort_keys=True).encode()
    if path.name == "steps.csv":
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        return json.dumps([{k: v for k, v in r.items() if k not in TIMING_CSV_COLUMNS} for r in rows]).encode()
    return data


def digests(workdir: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    results = workdir / "results"
    return {
        str(p.relative_to(results)): hashlib.sha256(normalised(p)).hexdigest()
        for p in sorted(results.rglob("*"))
        if p.is_file() and str(p.relative_to(workdir)) not in leave_out
    }


def test_normalisation_drops_only_timing(tmp_path):
    """The exclusions above are narrow: a changed loss or metric still changes the digest."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, seconds, loss in ((a, 1.5, 0.25), (b, 9.0, 0.25)):
        d.mkdir()
        (d / "m.json").write_text(json.dumps({"val_loss": loss, "seconds": seconds}))
        (d / "steps.csv").write_text(f"step,loss,seconds,tokens_per_s\n1,{loss},{seconds},{seconds * 10}\n")
    assert normalised(a / "m.json") == normalised(b / "m.json")
    assert normalised(a / "steps.csv") == normalised(b / "steps.csv")
    (b / "m.json").write_text(json.dumps({"val_loss": 0.26, "seconds": 9.0}))
    (b / "steps.csv").write_text("step,loss,seconds,tokens_per_s\n1,0.26,9.0,90.0\n")
    assert normalised(a / "m.json") != normalised(b / "m.json")
    assert normalised(a / "steps.csv") != normalised(b / "steps.csv")


def test_two_runs_of_the_smoke_config_are_bit_identical(smoke_runs, tmp_path_factory):
    first = digests(smoke_runs.local)  # before anything else can touch the shared run
    if smoke_runs.slurm is not None:
        second, how = digests(smoke_runs.slurm.wf, leave_out=(SUMMARY,)), "a local and a SLURM run"
    else:
        again = tmp_path_factory.mktemp("smoke-again")
        snakemake(again)
        second, how = digests(again), "two local runs"
    for part in REQUIRED:
        assert any(part in name for name in first), f"no compared file matches {part!r}"
    assert sorted(first) == sorted(second), (
        f"{how} wrote different files: only the first "
        f"{sorted(set(first) - set(second))}, only the second {sorted(set(second) - set(first))}"
    )
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, f"{len(differing)} of {len(first)} files differ between {how}:\n  " + "\n  ".join(differing)
    print(f"determinism: {len(first)} files identical across {how}")
    # Paths from the config stay inside the workflow's directories (results_dir, logs, Snakemake's own).
    local = smoke_runs.local
    outside = [
        str(p.relative_to(local))
        for p in local.rglob("*")
        if p.is_file() and p.relative_to(local).parts[0] not in ("results", "logs", ".snakemake")
    ]
    assert not outside, f"the run wrote outside results/, logs/ and .snakemake/: {outside[:10]}"
