"""slerp (K = 2) and karcher (K >= 2), the merges on the sphere, on the streaming engine: their
endpoints and special cases to the byte, and direct torch ports of mergekit's formulas
(mergekit/merge_methods/slerp.py, karcher.py) within one rounding of the stored dtype. What every
method must satisfy (digests, threads, shards, CUDA) is tested for them by the registry-wide tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from helpers import ROOT, merge_base_state, merge_shapes, read_weights, save_model_dir
from ordermerge.cli import main
from ordermerge.config import ConfigError, validate_config
from ordermerge.merging.bits import stored_bits
from ordermerge.merging.engine import merge_models
from ordermerge.merging.methods.karcher import karcher_coefficients
from ordermerge.merging.methods.slerp import slerp_coefficients


def _random_state(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {n: (torch.randn(s, generator=g) * scale).to(torch.bfloat16) for n, s in merge_shapes().items()}
    state["model.position_ids"] = torch.arange(16, dtype=torch.int64) + seed
    return state


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and two unrelated models (cos θ ≈ 0: the arc, not the lerp); model a holds −0.0 elements."""
    root = tmp_path_factory.mktemp("sphere")
    a, b = _random_state(1), _random_state(2, scale=0.5)
    a["model.layers.0.mlp.weight"][0, :5] = -0.0
    return {
        "base": save_model_dir(root / "base", merge_base_state()),
        "states": [a, b],
        "models": [save_model_dir(root / "a", a), save_model_dir(root / "b", b, shards=2)],
        "root": root,
    }


def _merge(base, models, out, **kw):
    merge_models(base, models, out, progress=False, **kw)
    return read_weights(out), json.loads((out / "merge.json").read_text())


def _floats(state):
    return {n: t for n, t in state.items() if t.is_floating_point()}


def _within_one_rounding(got: torch.Tensor, expected: torch.Tensor, inputs: list, name: str, share: float = 0.01):
    """bf16 ``got`` is ``expected`` but for one rounding: at most one bf16 ulp apart, plus 1e-6 of the
    inputs' magnitudes (where the terms cancel, fp32 coefficients and sums move the result by more
    than its own ulp), and equal in all but ``share`` of the elements."""
    g, e = got.double(), expected.double()
    ulp = torch.ldexp(torch.ones_like(e), torch.frexp(e).exponent - 8)  # bf16 keeps 8 significant bits
    slack = 1e-6 * sum(x.double().abs() for x in inputs)
    assert bool(torch.all((g - e).abs() <= ulp + slack)), (name, float(((g - e).abs() - ulp - slack).max()))
    assert float((stored_bits(got) != stored_bits(expected)).float().mean()) < share, name


# --- direct ports of mergekit's functions (torch, whole tensors) ------------------------------------


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit.merge_methods.slerp.slerp in torch fp32, as mergekit runs it on (cast) tensors."""
    a, b = v0.float(), v1.float()

    def normalize(v):
        n = torch.linalg.norm(v)
        return v / n if n > eps else v

    dot = torch.sum(normalize(a) * normalize(b))
    if torch.abs(dot) > dot_threshold:
        res = (1 - t) * a + t * b
    else:
        theta_0 = torch.arccos(dot)
        theta_t = theta_0 * t
        res = torch.sin(theta_0 - theta_t) / torch.sin(theta_0) * a + torch.sin(theta_t) / torch.sin(theta_0) * b
    return res.to(v0.dtype)


def mergekit_karcher(tensors, alphas, max_iter=10, tol=1e-5):
    """mergekit.merge_methods.karcher.karcher_merge_tensors, line for line, on fp64 tensors."""
    norms, units = [], []
    for t in tensors:
        n = torch.linalg.norm(t).item()
        norms.append(n)
        units.append(torch.zeros_like(t) if n == 0.0 else t / n)
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    vu = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, vu))
    norm_u = torch.linalg.norm(u).item()
    u = vu[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        T = torch.zeros_like(u)
        for ai, ui in zip(a, vu):
            dot = torch.clamp(torch.dot(u.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            T += ai * (theta / torch.sin(theta)) * (ui - dot * u)
        norm_t = torch.linalg.norm(T)
        if norm_t.item() < tol:
            break
        u = torch.cos(norm_t) * u + torch.sin(norm_t) * (T / norm_t)
        if torch.linalg.norm(u).item() > tol:
            u = u / torch.linalg.norm(u)
    return sum(al * n for al, n in zip(alphas, norms)) * u


# --- slerp ----------------------------------------------------------------------------------------


def test_slerp_at_0_and_1_gives_the_inputs_bytes(pair, tmp_path):
    for t, which in ((0.0, 0), (1.0, 1)):
        merged, prov = _merge(pair["base"], pair["models"], tmp_path / f"t{t}", method="slerp", t=t)
        for name, expected in _floats(pair["states"][which]).items():
            assert torch.equal(stored_bits(merged[name]), stored_bits(expected)), (t, name)  # -0.0 too
            assert not prov["per_tensor"][name]["lerp"]
        assert torch.equal(merged["model.position_ids"], pair["states"][0]["model.position_ids"])
        assert prov["parameters"] == {"t": t} and prov["method_key"] == "slerp"


@pytest.mark.parametrize("t", [0.3, 0.5, 0.85])
def test_slerp_equals_mergekits_formula_within_one_rounding(pair, tmp_path, t):
    merged, prov = _merge(pair["base"], pair["models"], tmp_path / "m", method="slerp", t=t)
    a, b = (_floats(s) for s in pair["states"])
    for name in a:
        _within_one_rounding(merged[name], mergekit_slerp(t, a[name], b[name]), [a[name], b[name]], name)
        cos = float(
            torch.nn.functional.cosine_similarity(a[name].double().reshape(1, -1), b[name].double().reshape(1, -1))
        )
        assert prov["per_tensor"][name]["cos"] == pytest.approx(cos, abs=1e-12)
    assert prov["stats"]["slerp_tensors"] == len(a) and prov["stats"]["lerp_tensors"] == 0


def test_slerp_of_colinear_tensors_at_half_is_the_linear_mean(pair, tmp_path):
    """Bit for bit ``average``'s bytes (model b: ``average`` sums from +0, so of two −0.0 it makes +0.0)."""
    a = pair["states"][1]
    twice = {n: (t * 2 if t.is_floating_point() else t) for n, t in a.items()}  # exact in bf16: colinear
    models = [pair["models"][1], save_model_dir(tmp_path / "twice", twice)]
    merged, prov = _merge(pair["base"], models, tmp_path / "slerp", method="slerp", t=0.5)
    mean, _ = _merge(pair["base"], models, tmp_path / "avg", method="average")
    for name in _floats(a):
        assert prov["per_tensor"][name]["lerp"] and prov["per_tensor"][name]["cos"] == pytest.approx(1.0)
        assert torch.equal(stored_bits(merged[name]), stored_bits(mean[name])), name
    assert prov["stats"]["lerp_tensors"] == len(_floats(a))


def test_slerp_coefficients_on_the_unit_circle():
    ca, cb, cos, lerp = slerp_coefficients(np.eye(2), 0.5)  # orthogonal unit vectors: 45° each
    assert (ca, cb, cos, lerp) == (pytest.approx(math.sqrt(0.5)), pytest.approx(math.sqrt(0.5)), 0.0, False)
    ca, cb, _, _ = slerp_coefficients(np.eye(2) * 9.0, 1 / 3)  # the norms do not change the angle's split
    assert (ca, cb) == (pytest.approx(math.cos(math.pi / 6)), pytest.approx(math.sin(math.pi / 6)))
    assert slerp_coefficients(np.array([[1.0, -1.0], [-1.0, 1.0]]), 0.25)[3]  # antipodal: |cos| 1, lerp
    assert slerp_coefficients(np.array([[4.0, 2.0 * 0.9996], [2.0 * 0.9996, 1.0]]), 0.3)[:2] == (0.7, 0.3)
    assert slerp_coefficients(np.array([[0.0, 0.0], [0.0, 1.0]]), 0.5)[2] == 0.0  # a zero tensor: 90°


# --- karcher --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trio(pair):
    """Three unrelated models of different norms."""
    c = _random_state(3, scale=2.0)
    return {
        "base": pair["base"],
        "states": [*pair["states"], c],
        "models": [*pair["models"], save_model_dir(pair["root"] / "c", c)],
    }


@pytest.mark.parametrize("k", [2, 3, 4])
def test_karcher_of_identical_models_is_that_model(pair, tmp_path, k):
    a = pair["states"][0]
    copies = [
        save_model_dir(tmp_path / f"copy{i}", {**a, "model.position_ids": a["model.position_ids"] + i})
        for i in range(k)
    ]  # float weights identical; the files differ (the engine refuses duplicates)
    merged, prov = _merge(pair["base"], copies, tmp_path / "m", method="karcher")
    for name, expected in _floats(pair["states"][0]).items():
        assert torch.equal(stored_bits(merged[name]), stored_bits(expected)), name
    assert prov["stats"] == {"elements": prov["stats"]["elements"], "most_steps": 0, "not_converged_tensors": 0}


def test_karcher_equals_mergekits_algorithm_within_one_rounding(trio, tmp_path):
    merged, prov = _merge(trio["base"], trio["models"], tmp_path / "m", method="karcher", max_iter=20, tol=1e-7)
    for name in _floats(trio["states"][0]):
        tensors = [s[name].double() for s in trio["states"]]
        expected = mergekit_karcher(tensors, [1 / 3] * 3, max_iter=20, tol=1e-7).to(torch.bfloat16)
        _within_one_rounding(merged[name], expected, tensors, name)
        assert prov["per_tensor"][name]["converged"] and prov["per_tensor"][name]["steps"] >= 1
    assert prov["parameters"] == {"max_iter": 20, "tol": 1e-7}


def test_karcher_of_two_models_of_equal_norm_is_slerp_at_half(pair, tmp_path):
    """The geodesic midpoint: for equal norms slerp(0.5) and the Karcher mean coincide (not otherwise:
    slerp interpolates the raw weights, karcher the directions, then scales by the mean norm)."""
    g = torch.Generator().manual_seed(5)
    a = pair["states"][0]
    shuffled = {
        n: (t.reshape(-1)[torch.randperm(t.numel(), generator=g)].reshape(t.shape) if t.is_floating_point() else t)
        for n, t in a.items()
    }  # the same values: the same norm
    models = [pair["models"][0], save_model_dir(tmp_path / "shuffled", shuffled)]
    karcher, _ = _merge(pair["base"], models, tmp_path / "k", method="karcher")
    slerp, _ = _merge(pair["base"], models, tmp_path / "s", method="slerp", t=0.5)
    for name in _floats(a):
        _within_one_rounding(karcher[name], slerp[name], [a[name], shuffled[name]], name)


def test_karcher_does_not_depend_on_the_inputs_order(trio, tmp_path):
    ordered, p1 = _merge(trio["base"], trio["models"], tmp_path / "abc", method="karcher")
    reordered, p2 = _merge(trio["base"], trio["models"][::-1], tmp_path / "cba", method="karcher")
    for name in _floats(trio["states"][0]):
        inputs = [s[name] for s in trio["states"]]
        _within_one_rounding(ordered[name], reordered[name], inputs, name)  # sums in another order: rounding only
        c1, c2 = p1["per_tensor"][name]["coefficients"], p2["per_tensor"][name]["coefficients"]
        assert c1 == pytest.approx(c2[::-1], rel=1e-12)


def test_karcher_weights_pick_the_mean():
    """One-hot weights give that input (exactly, in coefficients); zero inputs leave the direction."""
    gram = np.array([[4.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 0.0]])
    c, steps, converged = karcher_coefficients(gram, [0.0, 1.0, 0.0], 10, 1e-5)
    assert c.tolist() == [0.0, 1.0, 0.0] and steps == 0 and converged
    c, _, _ = karcher_coefficients(gram, [0.5, 0.5, 0.0], 10, 1e-5)
    assert c[2] == 0.0 and c[0] > 0 and c[1] > 0
    assert karcher_coefficients(np.zeros((2, 2)), [0.5, 0.5], 10, 1e-5)[0].tolist() == [0.0, 0.0]


# --- the command line and the workflow config -----------------------------------------------------


def test_cli_slerp_with_t(pair, tmp_path, capsys):
    main(
        [
            "merge",
            "--base",
            str(pair["base"]),
            "--method",
            "slerp",
            "--t",
            "0.3",
            "--out",
            str(tmp_path / "m"),
            *map(str, pair["models"]),
        ]
    )
    out = capsys.readouterr().out
    assert "(slerp, seed 0)" in out and "slerp tensors: 3; lerp tensors: 0" in out
    prov = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert prov["parameters"] == {"t": 0.3} and "slerp" in (tmp_path / "m" / "README.md").read_text()


BAD = [
    (["--method", "slerp", "--t", "1.5"], 2, "--t must be in [0, 1], got 1.5"),
    (
        ["--method", "slerp"],
        3,
        "slerp merges at most 2 models, got 3; pass 2 MODEL_DIRs, or use a method that merges any K",
    ),
    (["--method", "slerp", "--weights", "1,3"], 2, "slerp weighs the 2 models by --t, not by weights; drop --weights"),
    (["--method", "average", "--t", "0.3"], 2, "--t applies to slerp only, not average; drop it"),
    (["--method", "karcher", "--max-iter", "0"], 2, "--max-iter must be in [1, 1000], got 0"),
    (["--method", "karcher", "--tol", "0"], 2, "--tol must be in (0, 1], got 0.0"),
]


@pytest.mark.parametrize("args,k,message", BAD, ids=[" ".join(a[1:]) for a, _, _ in BAD])
def test_bad_requests_fail_with_one_line_before_writing(trio, tmp_path, capsys, args, k, message):
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(trio["base"]), *args, "--out", str(tmp_path / "m"), *map(str, trio["models"][:k])])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m").exists()


def test_workflow_takes_slerp_with_two_runs_only(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "smoke.yaml").read_text())
    cfg["merge"]["methods"] = ["average", "slerp", "karcher"]
    cfg["merge"]["t"] = 0.3
    assert cfg["runs"] == 2 and validate_config(yaml.safe_load(yaml.safe_dump(cfg)))["merge"]["t"] == 0.3
    cfg["runs"] = 3
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    [line] = [p for p in err.value.problems if "slerp" in p]
    assert line.startswith("merge.methods[1]: 'slerp' — merges at most 2 models, but runs is 3; set runs: 2"), line
