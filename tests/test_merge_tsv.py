"""TSV-Merge (Gargiulo et al., CVPR 2025): the streaming engine gives the bytes of a plain whole-tensor
reference, the merged task vector has the rank the method promises, and the CLI runs it."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import merge_zoo, read_weights
from ordermerge.cli import main
from ordermerge.merging.methods.tsv import tsv_delta

K = 3
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return merge_zoo(tmp_path_factory.mktemp("tsv"), K, model_shards=lambda i: 1 + i % 2)


def reference(base: dict, states: list[dict], weights: list[float], scale: float) -> dict:
    """TSV on whole tensors, written plainly: one SVD per task vector, Procrustes per stack."""
    out = {}
    lam = float(torch.tensor(scale, dtype=torch.float32))
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = states[0][name]
            continue
        taus = [s[name].float() - b.float() for s in states]
        if b.dim() != 2:
            acc = torch.zeros(b.shape)
            for t, w in zip(taus, weights):
                acc = acc + t * float(torch.tensor(w, dtype=torch.float32))
            out[name] = (acc * lam + b.float()).to(b.dtype)
            continue
        k = max(1, min(b.shape) // len(taus))
        us, ss, vs = [], [], []
        for t in taus:
            u, s, vh = torch.linalg.svd(t, full_matrices=False)
            us, ss, vs = us + [u[:, :k]], ss + [s[:k]], vs + [vh[:k].T]
        pu, _, qu = torch.linalg.svd(torch.cat(us, 1), full_matrices=False)
        pv, _, qv = torch.linalg.svd(torch.cat(vs, 1), full_matrices=False)
        delta = ((pu @ qu) * torch.cat(ss)) @ (pv @ qv).T
        out[name] = (delta * lam + b.float()).to(b.dtype)
    return out


def _tsv(zoo, out, *extra):
    main(["merge", "--base", str(zoo["base"]), "--method", "tsv", *extra, "--out", str(out), *map(str, zoo["models"])])
    return read_weights(out), json.loads((out / "merge.json").read_text())


def test_engine_gives_the_reference_bytes(zoo, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine's workers: one intra-op thread, one LAPACK order
    try:
        want = reference(zoo["state"], zoo["fts"], WEIGHTS, 1.5)
    finally:
        torch.set_num_threads(threads)
    got, prov = _tsv(zoo, tmp_path / "m", "--scale", "1.5", "--weights", ",".join(map(str, WEIGHTS)))
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(
            got[name].view(torch.int16 if got[name].dtype == torch.bfloat16 else got[name].dtype),
            want[name].view(torch.int16 if want[name].dtype == torch.bfloat16 else want[name].dtype),
        ), name
    assert (prov["method"], prov["parameters"]) == ("tsv", {"scale": 1.5})
    assert "Gargiulo" in (tmp_path / "m" / "README.md").read_text()


def test_same_bytes_again_and_with_other_thread_counts(zoo, tmp_path):
    a, _ = _tsv(zoo, tmp_path / "a")
    b, _ = _tsv(zoo, tmp_path / "b", "--threads", "1")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_merged_task_vector_has_rank_k_times_top_1_over_k():
    g = torch.Generator().manual_seed(0)
    taus = torch.randn(3, 12, 8, generator=g)
    delta = tsv_delta(taus)
    assert delta.shape == (12, 8)
    assert torch.linalg.matrix_rank(delta).item() == 3 * (8 // 3)  # K·k = 6 < min(m, n) = 8


def test_orthogonal_low_rank_task_vectors_are_summed_exactly():
    """Task vectors of rank k with mutually orthogonal singular vectors: Procrustes changes nothing,
    so TSV is exactly their sum (K = 4, min(m, n) = 8, so k = 2)."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(10, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    taus = torch.stack(
        [sum(torch.outer(u[:, j], v[:, j]) * (j + 1) for j in (2 * i, 2 * i + 1)) for i in range(4)]
    ).float()
    assert torch.allclose(tsv_delta(taus), taus.sum(0), atol=1e-5)


def test_tsv_takes_scale_only(zoo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "merge",
                "--base",
                str(zoo["base"]),
                "--method",
                "tsv",
                "--density",
                "0.5",
                "--out",
                str(tmp_path / "x"),
                *map(str, zoo["models"]),
            ]
        )
    assert "--density applies to ties only, not tsv" in capsys.readouterr().err
