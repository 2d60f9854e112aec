"""The digest cache (src/ordermerge/merging/digest_cache.py): later merges of unchanged inputs hash
nothing and record the same sha256; a changed input is hashed again, however it was changed."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import merge_zoo
from ordermerge.merging import digest_cache
from ordermerge.merging import digests as digests_module
from ordermerge.merging.engine import merge_models, sha256_of_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(digest_cache.ENV, str(root))
    return root / "digests"


@pytest.fixture
def hashed(monkeypatch):
    """The directories a merge hashed itself (a StreamingDigest made for them)."""
    made = []
    real = digests_module.StreamingDigest.__init__

    def init(self, directory, planned, budget):
        made.append(os.path.realpath(directory))
        real(self, directory, planned, budget)

    monkeypatch.setattr(digests_module.StreamingDigest, "__init__", init)
    return made


def merge(zoo, out, models=None, method="average"):
    models = zoo["models"] if models is None else models
    merge_models(zoo["base"], models, out, method=method, force=True, progress=False)
    return json.loads((out / "merge.json").read_text())


def recorded(provenance) -> list[str]:
    return [provenance["base"]["sha256"], *(i["sha256"] for i in provenance["inputs"])]


def test_a_second_merge_hashes_nothing_and_records_the_same_digests(tmp_path, cache, hashed):
    zoo = merge_zoo(tmp_path / "zoo", 3)
    first = merge(zoo, tmp_path / "m1")
    assert len(hashed) == 4  # base + 3 inputs, hashed while read
    truth = [sha256_of_dir(d) for d in [zoo["base"], *zoo["models"]]]
    assert recorded(first) == truth
    assert len(list(cache.rglob("*"))) >= 4
    hashed.clear()
    second = merge(zoo, tmp_path / "m2", method="select")
    assert hashed == []
    assert recorded(second) == truth
    # the cache changes no byte of the output
    again = merge(zoo, tmp_path / "m3")
    assert (tmp_path / "m3" / "model.safetensors").read_bytes() == (tmp_path / "m1" / "model.safetensors").read_bytes()
    assert again["inputs"] == first["inputs"]


def test_an_input_changed_in_place_is_hashed_again_even_with_its_mtime_put_back(tmp_path, cache, hashed):
    zoo = merge_zoo(tmp_path / "zoo", 2)
    merge(zoo, tmp_path / "m1")
    target = next(zoo["models"][1].glob("*.safetensors"))
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: same size
    with open(target, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time put back
    assert target.stat().st_size == st.st_size and target.stat().st_ino == st.st_ino
    hashed.clear()
    after = merge(zoo, tmp_path / "m2")
    assert hashed == [os.path.realpath(zoo["models"][1])]  # only the changed one
    assert after["inputs"][1]["sha256"] == sha256_of_dir(zoo["models"][1])


def test_a_replaced_or_renamed_input_is_hashed_again(tmp_path, cache, hashed):
    zoo = merge_zoo(tmp_path / "zoo", 2)
    merge(zoo, tmp_path / "m1")
    moved = tmp_path / "zoo" / "moved"
    shutil.copytree(zoo["models"][0], moved)  # same bytes, another place: another key
    hashed.clear()
    after = merge(zoo, tmp_path / "m2", models=[moved, zoo["models"][1]])
    assert hashed == [os.path.realpath(moved)]
    assert after["inputs"][0]["sha256"] == sha256_of_dir(zoo["models"][0])


def test_off_and_unwritable_caches_only_cost_time(tmp_path, monkeypatch, hashed):
    zoo = merge_zoo(tmp_path / "zoo", 2)
    monkeypatch.setenv(digest_cache.ENV, digest_cache.OFF)
    assert digest_cache.cache_dir() is None
    merge(zoo, tmp_path / "m1")
    merge(zoo, tmp_path / "m2")
    assert len(hashed) == 6  # no cache: every merge hashes all three
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv(digest_cache.ENV, str(blocker))
    hashed.clear()
    provenance = merge(zoo, tmp_path / "m3")
    assert len(hashed) == 3 and provenance["inputs"][0]["sha256"] == sha256_of_dir(zoo["models"][0])


def test_a_damaged_entry_is_ignored(tmp_path, cache, hashed):
    zoo = merge_zoo(tmp_path / "zoo", 2)
    merge(zoo, tmp_path / "m1")
    for entry in cache.rglob("*"):
        if entry.is_file():
            entry.write_text("not a digest\n")
    hashed.clear()
    provenance = merge(zoo, tmp_path / "m2")
    assert len(hashed) == 3 and provenance["base"]["sha256"] == sha256_of_dir(zoo["base"])


def test_the_default_location_follows_xdg(tmp_path):
    assert digest_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "ordermerge" / "digests"
    assert digest_cache.cache_dir({digest_cache.ENV: str(tmp_path / "c")}) == tmp_path / "c" / "digests"
