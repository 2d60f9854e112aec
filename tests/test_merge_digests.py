"""The input digests merge.json records are computed from the bytes the merge reads (no second
pass), and equal hashlib's sha256 of each directory's weight files, whatever the order, budget or
repeats of the pieces."""

import hashlib
import json
import random

import numpy as np
import pytest

from helpers import lm_zoo, merge_cases, merge_request, merge_zoo
from ordermerge.merging import registry
from ordermerge.merging.digests import Budget, StreamingDigest, sha256_of_dir
from ordermerge.merging.engine import merge_models
from ordermerge.storage.checkpoint import LazyCheckpoint


def _reference(directory) -> str:
    """sha256 over the *.safetensors files in name order: each file's name, then its bytes."""
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    # input 1 in 2 shards whose tensors alternate between the files (reads jump between them)
    return merge_zoo(tmp_path_factory.mktemp("digests"), 3, model_shards=lambda i: 2 if i == 1 else 1)


@pytest.fixture(scope="module")
def lm(tiny_base, tmp_path_factory):
    """Loadable models and held-out data, for the methods that score candidates on data."""
    return lm_zoo(tmp_path_factory.mktemp("digests-lm"), tiny_base, 3)


@pytest.mark.parametrize("key", merge_cases())  # every registered method: a new one is tested here too
def test_recorded_digests_are_the_sha256_of_the_input_files(zoo, tmp_path, key, request, monkeypatch):
    monkeypatch.setenv("ORDERMERGE_CACHE_DIR", "off")  # hashed by this merge, not taken from the cache
    z = request.getfixturevalue("lm") if registry.parse_key(key)[0].needs_data else zoo
    kw = merge_request(key, z)
    merge_models(z["base"], out_dir=tmp_path / "m", progress=False, **kw)
    p = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert p["base"]["sha256"] == _reference(z["base"])
    assert [i["sha256"] for i in p["inputs"]] == [_reference(d) for d in kw["model_dirs"]]


def test_the_inputs_are_hashed_while_read_not_in_a_second_pass(zoo, tmp_path, monkeypatch):
    """Of an input's tensor data the digest reads nothing itself: only headers (and the base, for
    ``average``, which never reads it)."""
    import ordermerge.merging.digests as digests

    read = {}
    original = digests.StreamingDigest._read_and_hash

    def spy(self, file, offset, length):
        read[self.directory.name] = read.get(self.directory.name, 0) + length
        return original(self, file, offset, length)

    monkeypatch.setattr(digests.StreamingDigest, "_read_and_hash", spy)
    monkeypatch.setenv("ORDERMERGE_CACHE_DIR", "off")  # the module's other merges cached these digests
    merge_models(zoo["base"], zoo["models"], tmp_path / "m", method="average", progress=False)
    for d in zoo["models"]:
        size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        assert read.get(d.name, 0) < 0.01 * size, (d.name, read.get(d.name), size)
    base_size = sum(p.stat().st_size for p in zoo["base"].glob("*.safetensors"))
    assert read["base"] > 0.9 * base_size


@pytest.mark.parametrize("budget", [0, 1 << 30])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_digest_equals_sha256_for_any_delivery_order(zoo, budget, seed):
    for directory in [zoo["base"], zoo["models"][1]]:
        ckpt = LazyCheckpoint(directory)
        pieces = []
        for name in ckpt.keys():
            info = ckpt.info(name)
            n = info.numel
            step = max(1, n // 3)
            for lo in range(0, n, step):
                count = min(step, n - lo)
                pieces.append((name, info.file, info.offset + lo * info.itemsize, lo, count, info.itemsize))
        planned = {}
        for _, file, offset, _, count, size in pieces[: len(pieces) - 1]:  # the last one is never delivered
            planned.setdefault(file, []).append((offset, count * size))
        digest = StreamingDigest(directory, planned, Budget(budget))
        ckpt.observer = digest.deliver
        order = pieces * 2  # every piece twice: repeats are ignored
        random.Random(seed).shuffle(order)
        for name, _, _, lo, count, size in order:
            ckpt.read_into(name, lo, np.empty(count * size, np.uint8))
        assert digest.finish() == _reference(directory) == sha256_of_dir(directory)
        ckpt.close()


def test_every_written_byte_range_is_handed_to_the_disk_while_the_merge_runs(zoo, tmp_path, monkeypatch):
    """The writer starts writeback of each range it writes (Linux sync_file_range), so the final
    fsync finds little left: every tensor byte of every output shard is covered, nothing twice."""
    import os
    import sys

    import ordermerge.storage.checkpoint as checkpoint

    if not sys.platform.startswith("linux"):
        pytest.skip("sync_file_range is Linux's")
    assert checkpoint._START_WRITEBACK is not None, "this Linux's libc has no sync_file_range"
    started: dict[int, list[tuple[int, int]]] = {}
    real = checkpoint._START_WRITEBACK

    def spy(fd, offset, nbytes):
        started.setdefault(os.readlink(f"/proc/self/fd/{fd}"), []).append((offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(checkpoint, "_START_WRITEBACK", spy)
    merge_models(zoo["base"], zoo["models"], tmp_path / "m", method="average", shard_size="40KB", progress=False)
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1
    by_name = {os.path.basename(k): v for k, v in started.items()}
    for shard in shards:
        header = int.from_bytes(shard.read_bytes()[:8], "little") + 8
        covered = 0
        for offset, nbytes in sorted(by_name[shard.name]):
            assert offset == header + covered, f"{shard.name}: a gap or overlap at byte {offset}"
            covered += nbytes
        assert header + covered == shard.stat().st_size
