"""The file layer and the ``ordermerge merge`` command, on tiny HF-style directories built here."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import fine_tuned_state as _fine_tune
from helpers import merge_base_state as _base_state
from helpers import read_weights as _weights
from helpers import save_model_dir as _save
from ordermerge.cli import main
from ordermerge.merging.bits import CHUNK, chunk_rng, draw_indices, select, stored_bits, weighted_average
from ordermerge.merging.engine import merge_models
from ordermerge.storage.checkpoint import INDEX_NAME, CheckpointError, LazyCheckpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and K=4 fine-tunes, single-file and sharded (same tensors)."""
    root = tmp_path_factory.mktemp("zoo")
    base = _base_state()
    fts = [_fine_tune(base, i) for i in range(4)]
    return {
        "state": base,
        "fts": fts,
        "base": _save(root / "base", base),
        "models": [_save(root / f"ft{i}", s) for i, s in enumerate(fts)],
        "sharded": [_save(root / f"ft{i}-sharded", s, shards=3) for i, s in enumerate(fts)],
    }


def _merge(zoo, out, models=None, **kw):
    kw.setdefault("progress", False)
    return merge_models(zoo["base"], models or zoo["models"], out, **kw)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "ordermerge", "merge", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_same_seed_same_bytes_other_seed_differs(zoo, tmp_path):
    r = _cli(
        "--base",
        zoo["base"],
        "--method",
        "select",
        "--resample",
        "2",
        "--seed",
        3,
        "--out",
        tmp_path / "cli",
        *zoo["models"],
    )
    assert r.returncode == 0, r.stderr
    assert "resampled per round" in r.stdout
    _merge(zoo, tmp_path / "api", method="select", resample=2, seed=3)
    _merge(zoo, tmp_path / "other", method="select", resample=2, seed=4)
    runs = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("cli", "api", "other")}
    assert runs["cli"] == runs["api"]
    assert runs["cli"] != runs["other"]


def test_threads_do_not_change_bytes(zoo, tmp_path):
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            _merge(zoo, tmp_path / f"t{n}", method="select", resample=3, seed=1)
            assert torch.get_num_threads() == n  # restored after the merge
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "t1" / "model.safetensors").read_bytes() == (tmp_path / "t3" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method,kw", [("average", {}), ("select", {}), ("select", {"resample": 2})])
def test_streaming_merge_equals_whole_tensor_math(zoo, tmp_path, method, kw):
    prov = _merge(zoo, tmp_path / "m", method=method, seed=7, **kw)
    resample = kw.get("resample", 0)
    merged = _weights(tmp_path / "m")
    for name, b in zoo["state"].items():
        tensors = [ft[name] for ft in zoo["fts"]]
        if not b.is_floating_point():
            expected = tensors[0]
        elif method == "average":
            expected = weighted_average(tensors, [0.25] * 4)
        else:
            expected, stats = select(tensors, [0.25] * 4, 7, name, base=b, resample=resample)
            assert prov["per_tensor"][name]["resampled"] == stats.resampled
        assert torch.equal(stored_bits(merged[name]), stored_bits(expected)), name
        assert merged[name].dtype == b.dtype and merged[name].shape == b.shape


def test_sharded_inputs_merge_like_single_file(zoo, tmp_path):
    _merge(zoo, tmp_path / "single", method="select", resample=1, seed=2)
    _merge(zoo, tmp_path / "sharded", models=zoo["sharded"], method="select", resample=1, seed=2)
    assert (tmp_path / "single" / "model.safetensors").read_bytes() == (
        tmp_path / "sharded" / "model.safetensors"
    ).read_bytes()


def test_small_shard_size_writes_shards_and_a_valid_index(zoo, tmp_path):
    _merge(zoo, tmp_path / "one", method="average")
    r = _cli(
        "--base",
        zoo["base"],
        "--method",
        "average",
        "--shard-size",
        "200KB",
        "--out",
        tmp_path / "many",
        *zoo["models"],
    )
    assert r.returncode == 0, r.stderr
    shards = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (tmp_path / "many" / "model.safetensors").exists()
    index = json.loads((tmp_path / "many" / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in zoo["state"].values())
    for shard in shards:  # each shard is a file the reference reader accepts
        with safe_open(str(shard), "pt") as f:
            assert all(index["weight_map"][k] == shard.name for k in f.keys())
    back, one = LazyCheckpoint(tmp_path / "many"), _weights(tmp_path / "one")
    assert back.keys() == sorted(one)
    for name in back.keys():
        assert torch.equal(stored_bits(back.get(name)), stored_bits(one[name]))


def test_output_is_a_complete_directory(zoo, tmp_path):
    out = tmp_path / "out"
    _merge(zoo, out, method="select", resample=1, seed=0)
    assert (out / "config.json").read_text() == (zoo["base"] / "config.json").read_text()
    prov = json.loads((out / "merge.json").read_text())
    for entry, directory in zip([prov["base"], *prov["inputs"]], [zoo["base"], *zoo["models"]]):
        h = hashlib.sha256(b"model.safetensors" + (directory / "model.safetensors").read_bytes())
        assert entry == {"path": str(directory), "sha256": h.hexdigest()}
    floats = sorted(n for n, t in zoo["state"].items() if t.is_floating_point())
    assert sorted(prov["per_tensor"]) == floats
    for name in floats:
        stats = prov["per_tensor"][name]
        assert abs(sum(stats["fraction_from"]) - 1) < 1e-9 and len(stats["resampled"]) == 1
    assert prov["stats"]["elements"] == sum(t.numel() for t in zoo["state"].values())
    card = (out / "README.md").read_text()
    assert "resample1" in card and "merge.json" in card
    assert torch.equal(_weights(out)["model.position_ids"], zoo["fts"][0]["model.position_ids"])
    assert not list(tmp_path.glob(".tmp-*"))


def _corrupt(zoo, tmp_path, case):
    """Inputs broken in one way; returns (cli args, substrings the error must contain)."""
    good = [str(m) for m in zoo["models"]]
    base = str(zoo["base"])
    broken = tmp_path / "broken"
    state = dict(zoo["fts"][1])
    if case == "names":
        state["model.extra.weight"] = torch.zeros(3, dtype=torch.bfloat16)
        return [base, good[0], str(_save(broken, state))], [str(broken), "names differ", "fine-tunes of this base"]
    if case == "shape":
        state["model.norm.weight"] = torch.zeros(47, dtype=torch.bfloat16)
        return [base, good[0], str(_save(broken, state))], [str(broken), "model.norm.weight", "shapes and in one dtype"]
    if case == "dtype":
        state["model.norm.weight"] = state["model.norm.weight"].float()
        return [base, good[0], str(_save(broken, state))], [str(broken), "F32", "shapes and in one dtype"]
    if case == "truncated":
        path = _save(broken, state) / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-1000])
        return [base, good[0], str(broken)], [str(path), "truncated", "re-create"]
    if case == "header":
        path = _save(broken, state) / "model.safetensors"
        raw = bytearray(path.read_bytes())
        raw[8:20] = b"{not json!!!"
        path.write_bytes(bytes(raw))
        return [base, good[0], str(broken)], [str(path), "bad header", "re-create"]
    if case == "missing-shard":
        d = _save(broken, state, shards=3)
        (d / "model-00002-of-00003.safetensors").unlink()
        return [base, good[0], str(d)], [str(d / "model-00002-of-00003.safetensors"), "missing", "re-copy"]
    if case == "bin-only":
        broken.mkdir()
        (broken / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return [base, good[0], str(broken)], [str(broken), "never unpickles", "safe_serialization=True"]
    if case == "one-model":
        return [base, good[0]], ["at least 2 models", "K >= 2"]
    if case == "weights":
        return [base, *good, "--weights", "1,2"], ["2 weights for 4 models", "one weight per model"]
    raise AssertionError(case)


CASES = ["names", "shape", "dtype", "truncated", "header", "missing-shard", "bin-only", "one-model", "weights"]


def _run_main(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(["merge", *argv])
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_fail_with_one_line_naming_file_and_fix(zoo, tmp_path, capsys, case):
    (base, *models), expected = _corrupt(zoo, tmp_path, case)
    out = tmp_path / "results" / "merged"
    # the CLI in a subprocess for a few cases; in process (same code path) for the rest
    if case in ("truncated", "bin-only", "one-model"):
        r = _cli("--base", base, "--method", "select", "--out", out, *models)
        code, err = r.returncode, r.stderr
    else:
        code, err = _run_main(["--base", base, "--method", "select", "--out", str(out), *models], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ordermerge merge: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "results").exists()  # refused before anything was created


def test_existing_output_is_kept_without_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli("--base", zoo["base"], "--method", "average", "--out", out, *zoo["models"])
    assert r.returncode != 0
    assert r.stderr.strip() == f"ordermerge merge: error: {out} exists; pass --force to replace it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".tmp-*"))
    _merge(zoo, out, method="average", force=True)
    assert (out / "merge.json").exists() and not (out / "keep.txt").exists()


def test_failure_mid_merge_leaves_nothing(zoo, tmp_path, monkeypatch):
    import ordermerge.merging.methods.select as merge_module

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(merge_module, "select_bits", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        _merge(zoo, tmp_path / "out", method="select")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_errors_are_checkpoint_errors(zoo, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        LazyCheckpoint(tmp_path / "nope")
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(CheckpointError, match="not a valid index"):
        LazyCheckpoint(tmp_path)


def _distinct_zoo(tmp_path, k):
    """Fine-tunes that differ from each other in every element, so the source of each is recoverable."""
    base = _base_state()
    fts = [_fine_tune(base, i, changed=1.0) for i in range(k)]
    return base, fts, _save(tmp_path / "base", base), [_save(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)]


def test_select_takes_about_one_kth_from_each_model_over_the_whole_model(tmp_path):
    k = 5
    base, fts, base_dir, dirs = _distinct_zoo(tmp_path, k)
    prov = merge_models(base_dir, dirs, tmp_path / "out", method="select", seed=11, progress=False)
    merged = _weights(tmp_path / "out")
    counts = np.zeros(k, dtype=np.int64)
    for name, b in base.items():
        if b.is_floating_point():
            source = torch.stack([stored_bits(ft[name]) == stored_bits(merged[name]) for ft in fts])
            assert bool((source.sum(0) == 1).all()), name  # every element from exactly one model
            counts += source.reshape(k, -1).sum(1).numpy()
    n = counts.sum()
    assert prov["stats"]["fraction_from"] == pytest.approx((counts / n).tolist(), abs=1e-12)
    # 4 sd of a binomial proportion
    assert np.all(np.abs(counts / n - 1 / k) < 4 * np.sqrt((1 / k) * (1 - 1 / k) / n))


def _reference_select(stack: np.ndarray, base: np.ndarray, seed: int, name: str, rounds: int):
    """The paper's resampling written plainly, on the same random stream (per chunk: one draw for
    every element, then per round one fresh draw for every element, taken where the current is zero)."""
    k, n = stack.shape
    outs, counts, redrawn = [], np.zeros(k, dtype=np.int64), np.zeros(rounds, dtype=np.int64)
    for c, lo in enumerate(range(0, n, CHUNK)):
        part = stack[:, lo : lo + CHUNK]
        rng = chunk_rng(seed, name, c)
        idx = draw_indices(part.shape[1], [1 / k] * k, rng)
        cols = np.arange(part.shape[1])
        for r in range(rounds):
            zero = part[idx, cols] == base[lo : lo + CHUNK]
            redrawn[r] += zero.sum()
            idx = np.where(zero, draw_indices(part.shape[1], [1 / k] * k, rng), idx)
        outs.append(part[idx, cols])
        counts += np.bincount(idx, minlength=k)
    return np.concatenate(outs), counts, redrawn


def test_resample_counts_in_merge_json_match_a_recount(zoo, tmp_path):
    rounds, seed = 3, 5
    prov = _merge(zoo, tmp_path / "res", method="select", resample=rounds, seed=seed)
    plain = _merge(zoo, tmp_path / "plain", method="select", seed=seed)
    merged, first = _weights(tmp_path / "res"), _weights(tmp_path / "plain")
    total_redrawn, total_counts, zeros_after, zeros_plain = np.zeros(rounds, np.int64), np.zeros(4, np.int64), 0, 0
    for name, b in zoo["state"].items():
        if not b.is_floating_point():
            continue
        stack = torch.stack([stored_bits(ft[name]).reshape(-1) for ft in zoo["fts"]]).numpy()
        base_bits = stored_bits(b).reshape(-1).numpy()
        out, counts, redrawn = _reference_select(stack, base_bits, seed, name, rounds)
        assert np.array_equal(stored_bits(merged[name]).reshape(-1).numpy(), out), name
        assert prov["per_tensor"][name]["resampled"] == redrawn.tolist()
        total_redrawn += redrawn
        total_counts += counts
        zeros_after += int((out == base_bits).sum())
        # round 1 redraws exactly the elements where plain select (same seed) kept the base's value
        zeros_plain += int((stored_bits(first[name]).reshape(-1).numpy() == base_bits).sum())
    assert prov["stats"]["resampled_per_round"] == total_redrawn.tolist()
    assert prov["stats"]["resampled_per_round"][0] == zeros_plain
    assert prov["stats"]["zero_task_vector_after"] == zeros_after
    assert prov["stats"]["fraction_from"] == pytest.approx((total_counts / total_counts.sum()).tolist())
    assert plain["stats"]["resampled_per_round"] == []


def test_reader_and_writer_round_trip_every_dtype(tmp_path):
    from ordermerge.storage.checkpoint import save_state_dict_dir

    g = torch.Generator().manual_seed(0)
    state = {
        "a.bf16": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "b.f16": torch.randn(5, generator=g).to(torch.float16),
        "c.f32": torch.randn(3, 3, generator=g),
        "d.i64": torch.arange(9, dtype=torch.int64),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }
    save_state_dict_dir(state, tmp_path / "m", sidecar_source=None, shard_size=100)
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    back = LazyCheckpoint(tmp_path / "m")
    reference = _weights(tmp_path / "m")  # the safetensors library reads every shard too
    for name, t in state.items():
        for got in (back.get(name), reference[name]):
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
