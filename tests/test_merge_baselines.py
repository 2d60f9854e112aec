"""The baselines on the streaming engine (task_arithmetic, ties, dare, model_stock) against plain
whole-tensor torch references, their determinism, their parameters' validation and --device."""

import json
import math

import numpy as np
import pytest
import torch

from helpers import lm_zoo, merge_cases, merge_request, merge_zoo
from helpers import read_weights as _weights
from ordermerge.cli import main
from ordermerge.merging import registry
from ordermerge.merging import task_vectors as tv
from ordermerge.merging.bits import CHUNK, chunk_rng, stored_bits, weighted_average
from ordermerge.merging.engine import merge_models

K = 3
WEIGHTS = [0.5, 0.3, 0.2]
F32 = np.float32


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and K fine-tunes (half of each model's elements moved), single-file and sharded."""
    return merge_zoo(tmp_path_factory.mktemp("baselines"), K, sharded=True)


def _merge(zoo, out, models=None, **kw):
    kw.setdefault("progress", False)
    return merge_models(zoo["base"], models or zoo["models"], out, **kw)


def _floats(zoo):
    return [(n, b, [ft[n] for ft in zoo["fts"]]) for n, b in zoo["state"].items() if b.is_floating_point()]


# --- plain references: whole tensors, the same fp32 ops in the same order -------------------------


def ref_task_arithmetic(tensors, base, weights, scale):
    acc = torch.zeros(base.shape)
    for t, w in zip(tensors, weights):
        acc = acc + (t.float() - base.float()) * float(F32(w))
    return (acc * float(F32(scale)) + base.float()).to(base.dtype)


def ref_ties(tensors, base, weights, scale, density):
    taus = [t.float() - base.float() for t in tensors]
    k = max(1, math.ceil(density * base.numel() - 1e-9))
    thresholds = [torch.sort(tau.abs().reshape(-1), descending=True).values[k - 1] for tau in taus]
    trimmed = [torch.where((tau.abs() >= thr) & (tau != 0), tau, 0.0) for tau, thr in zip(taus, thresholds)]
    weighted = [t * float(F32(w)) for t, w in zip(trimmed, weights)]
    elected = torch.zeros(base.shape)
    for x in weighted:
        elected = elected + x
    num, den = torch.zeros(base.shape), torch.zeros(base.shape)
    for x, t, w in zip(weighted, trimmed, weights):
        agree = (torch.sign(x) == torch.sign(elected)) & (t != 0)
        num = num + torch.where(agree, x, 0.0)
        den = den + torch.where(agree, float(F32(w)), 0.0)
    delta = torch.where(den > 0, num / den, 0.0)
    return (delta * float(F32(scale)) + base.float()).to(base.dtype), thresholds, trimmed


def ref_dare_keep(name, k, n, p, seed):
    """Chunk c's mask comes from chunk c's own stream: K rows of the chunk's length."""
    parts = [
        tv.dare_keep_mask(k, min(CHUNK, n - lo), p, chunk_rng(seed, name, c)) for c, lo in enumerate(range(0, n, CHUNK))
    ]
    return torch.from_numpy(np.concatenate(parts, axis=1))


def ref_dare(tensors, base, weights, scale, keep, p):
    acc = torch.zeros(base.numel())
    for t, w, kp in zip(tensors, weights, keep):
        tau = torch.where(kp, t.float().reshape(-1) - base.float().reshape(-1), 0.0) * float(F32(1 / (1 - p)))
        acc = acc + tau * float(F32(w))
    return (acc * float(F32(scale)) + base.float().reshape(-1)).to(base.dtype).reshape(base.shape)


def ref_model_stock_ratio(tensors, base):
    taus = [(t.double() - base.double()).reshape(-1) for t in tensors]
    cos = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i in range(K) for j in range(i + 1, K)]
    c = max(0.0, float(np.mean(cos)))
    return K * c / (1 + (K - 1) * c)


def ref_model_stock(tensors, base, ratio):
    avg = torch.zeros(base.shape)
    for t in tensors:
        avg = avg + t.float() * float(F32(1 / K))
    return (avg * float(F32(ratio)) + base.float() * float(F32(1 - ratio))).to(base.dtype)


def _same_bits(a, b, name):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert torch.equal(stored_bits(a), stored_bits(b)), name


# --- the engine equals the references -------------------------------------------------------------


def test_task_arithmetic_equals_reference_bit_for_bit(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="task_arithmetic", weights=WEIGHTS, scale=0.7)
    merged = _weights(tmp_path / "m")
    for name, b, tensors in _floats(zoo):
        _same_bits(merged[name], ref_task_arithmetic(tensors, b, WEIGHTS, 0.7), name)
    assert torch.equal(merged["model.position_ids"], zoo["fts"][0]["model.position_ids"])
    assert prov["method"] == prov["method_key"] == "task_arithmetic"
    assert prov["parameters"] == {"scale": 0.7} and prov["weights"] == pytest.approx(WEIGHTS)


def test_task_arithmetic_with_uniform_weights_and_unit_scale_is_the_average(zoo, tmp_path):
    _merge(zoo, tmp_path / "ta", method="task_arithmetic")
    merged = _weights(tmp_path / "ta")
    for name, _b, tensors in _floats(zoo):
        avg = weighted_average(tensors, [1 / K] * K)
        # base + mean(θ_i − base) and mean(θ_i) differ only by fp32 rounding: at most 1 bf16 ulp, rarely
        ulps = (stored_bits(merged[name]).int() - stored_bits(avg).int()).abs()
        assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01, name


def test_ties_equals_reference_bit_for_bit(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="ties", weights=WEIGHTS, density=0.3, scale=0.9)
    merged = _weights(tmp_path / "m")
    for name, b, tensors in _floats(zoo):
        expected, thresholds, trimmed = ref_ties(tensors, b, WEIGHTS, 0.9, 0.3)
        _same_bits(merged[name], expected, name)
        stats = prov["per_tensor"][name]
        # the streamed radix select finds each input's exact k-th largest |τ| over the whole tensor
        assert stats["threshold"] == [float(t) for t in thresholds], name
        assert stats["kept_fraction"] == [int((t != 0).sum()) / b.numel() for t in trimmed], name
    assert prov["parameters"] == {"density": 0.3, "scale": 0.9}


def _radix_thresholds(taus: torch.Tensor, density: float, chunk: int) -> tuple[torch.Tensor, bool]:
    """ties' per-tensor thresholds from the radix select over chunks of (K, n) task vectors, through
    the functions methods/ties.py calls; and whether the low-bits pass was needed."""
    rank = torch.full((taus.shape[0],), tv.ties_rank(taus.shape[1], density))
    parts = [taus[:, lo : lo + chunk].contiguous() for lo in range(0, taus.shape[1], chunk)]
    keys = sum(tv.key_histogram(p.clone()) for p in parts)
    assert torch.equal(
        tv.high_from_keys(keys), sum(tv.high_histogram(p) for p in parts)
    )  # pass 1 of the plain radix select
    high, left, need = tv.first_pass(keys, rank)
    low = tv.top_bin(sum(tv.low_histogram(p.clone(), high) for p in parts), left)[0] if need else torch.zeros_like(high)
    return tv.magnitude_threshold(high, low), need


@pytest.mark.parametrize("case", ["bf16 steps", "fp32", "ties at the threshold", "crossing exponents"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 1.0])
def test_radix_thresholds_are_the_exact_kth_largest_with_or_without_the_second_pass(case, density):
    """The first pass's count of elements with low bits lets the second pass be skipped (task vectors
    of bf16 weights that moved within one binade have none); the threshold is exact either way."""
    g = torch.Generator().manual_seed(7)
    k, n = 3, 5000
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    if case == "bf16 steps":  # one bf16 ulp up or down: τ is exactly representable in 8 bits
        ulp = torch.ldexp(torch.ones(n), torch.frexp(base.float()).exponent - 8)
        steps = torch.randint(-2, 3, (k, n), generator=g).float()
        rows = (base.float() + steps * ulp).to(torch.bfloat16)
        taus = rows.float() - base.float()
    elif case == "fp32":
        taus = torch.randn(k, n, generator=g) * 1e-3
    elif case == "ties at the threshold":
        taus = torch.randint(-3, 4, (k, n), generator=g).float() * 0.125
    else:  # bf16 weights moved across a power of two: τ needs more than 8 bits
        rows = (base.float() * 1.7 + 0.3).to(torch.bfloat16).expand(k, n) + torch.randn(k, n, generator=g).to(
            torch.bfloat16
        ) * 0.01
        taus = rows.to(torch.bfloat16).float() - base.float()
    rank = tv.ties_rank(n, density)
    expected = torch.sort(taus.abs(), dim=1, descending=True).values[:, rank - 1]
    for chunk in (n, 777):
        got, need = _radix_thresholds(taus, density, chunk)
        assert torch.equal(got, expected), (case, density, chunk)
        if case == "bf16 steps":
            assert not need, "bf16 task vectors within one binade have no low bits: one pass is enough"
        if case == "fp32" and density < 1.0:
            assert need, "fp32 task vectors have low bits: the second pass must run"


def test_ties_density_one_keeps_every_nonzero_task_vector_element(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="ties", density=1.0)
    merged = _weights(tmp_path / "m")
    for name, b, tensors in _floats(zoo):
        _same_bits(merged[name], ref_ties(tensors, b, [1 / K] * K, 1.0, 1.0)[0], name)
        changed = [int((stored_bits(t) != stored_bits(b)).sum()) / b.numel() for t in tensors]
        assert prov["per_tensor"][name]["kept_fraction"] == pytest.approx(changed, abs=1e-12), name


def test_dare_equals_reference_bit_for_bit(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="dare", weights=WEIGHTS, drop_rate=0.6, scale=1.3, seed=5)
    merged = _weights(tmp_path / "m")
    for name, b, tensors in _floats(zoo):
        keep = ref_dare_keep(name, K, b.numel(), 0.6, 5)
        _same_bits(merged[name], ref_dare(tensors, b, WEIGHTS, 1.3, keep, 0.6), name)
        assert prov["per_tensor"][name]["kept_fraction"] == [c / b.numel() for c in keep.sum(1).tolist()]
    assert prov["seed"] == 5 and prov["parameters"] == {"drop_rate": 0.6, "scale": 1.3}


def test_dare_without_drops_is_task_arithmetic(zoo, tmp_path):
    _merge(zoo, tmp_path / "dare", method="dare", drop_rate=0.0, seed=1)
    _merge(zoo, tmp_path / "ta", method="task_arithmetic")
    assert (tmp_path / "dare" / "model.safetensors").read_bytes() == (
        tmp_path / "ta" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_dare_drops_each_element_with_probability_p(p):
    k, n = 4, 100_000
    keep = tv.dare_keep_mask(k, n, p, chunk_rng(0, "t", 0))
    dropped = 1 - keep.mean(1)
    sd = math.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(dropped - p) < 4 * sd), (dropped, p)
    # independent across inputs and positions: pairs of inputs agree as often as chance says
    both = (~keep[0] & ~keep[1]).mean()
    assert abs(both - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / n)


def test_dare_kept_fraction_over_the_model_is_one_minus_p(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="dare", drop_rate=0.9, seed=2)
    n = sum(b.numel() for _, b, _ in _floats(zoo))
    sd = math.sqrt(0.9 * 0.1 / n)
    assert all(abs(f - 0.1) < 4 * sd for f in prov["kept_fraction"]), prov["kept_fraction"]
    other = _merge(zoo, tmp_path / "other", method="dare", drop_rate=0.9, seed=3)
    assert other["kept_fraction"] != prov["kept_fraction"]  # the seed picks the drops


def test_model_stock_matches_the_paper_ratio_and_reference(zoo, tmp_path):
    prov = _merge(zoo, tmp_path / "m", method="model_stock")
    merged = _weights(tmp_path / "m")
    for name, b, tensors in _floats(zoo):
        ratio = prov["per_tensor"][name]["ratio"]
        # fp64 sums in another order: equal to ~1e-12, not bit for bit
        assert ratio == pytest.approx(ref_model_stock_ratio(tensors, b), rel=1e-9), name
        assert 0 < ratio < 1
        _same_bits(merged[name], ref_model_stock(tensors, b, ratio), name)


def test_model_stock_ratio_edge_cases():
    same = np.array([[4.0, 4.0], [4.0, 4.0]])  # identical task vectors: cos 1, t = 1 (the average)
    assert tv.model_stock_ratio(same) == (1.0, 1.0)
    zero = np.array([[0.0, 0.0], [0.0, 4.0]])  # one input unchanged: cos 0, t = 0 (the base)
    assert tv.model_stock_ratio(zero) == (0.0, 0.0)
    opposite = np.array([[1.0, -1.0], [-1.0, 1.0]])  # anti-aligned: clamped to the base
    assert tv.model_stock_ratio(opposite)[0] == 0.0


# --- determinism ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_base, tmp_path_factory):
    """Loadable models and held-out data, for the methods that score candidates on data."""
    return lm_zoo(tmp_path_factory.mktemp("baselines-lm"), tiny_base, K, sharded=True)


def _zoo_for(key, zoo, request):
    return request.getfixturevalue("lm") if registry.parse_key(key)[0].needs_data else zoo


@pytest.mark.parametrize("key", merge_cases())  # every registered method: a new one is tested here too
def test_bytes_do_not_depend_on_threads_input_shards_or_output_shards(zoo, tmp_path, key, request):
    z = _zoo_for(key, zoo, request)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        merge_models(z["base"], out_dir=tmp_path / "one", seed=4, progress=False, **merge_request(key, z))
        torch.set_num_threads(3)
        merge_models(
            z["base"],
            out_dir=tmp_path / "many",
            seed=4,
            shard_size="300KB" if z is zoo else "20KB",
            progress=False,
            **merge_request(key, z, z["sharded"]),
        )
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) >= 2
    one, many = _weights(tmp_path / "one"), _weights(tmp_path / "many")
    assert sorted(one) == sorted(many)
    for name in one:
        _same_bits(one[name], many[name], name)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible to torch: GPU bytes == CPU bytes unchecked"
)
@pytest.mark.parametrize("key", merge_cases())  # every registered method: a new one is tested here too
def test_cuda_gives_the_cpu_bytes(zoo, tmp_path, key, request):
    z = _zoo_for(key, zoo, request)
    kw = merge_request(key, z)
    weights = WEIGHTS[: len(kw["model_dirs"])]
    try:  # weighted where the method takes weights (a method that weighs its inputs itself refuses them)
        merge_models(z["base"], out_dir=tmp_path / "cpu", weights=weights, seed=3, progress=False, **kw)
    except ValueError as exc:
        assert "drop --weights" in str(exc)
        weights = None
        merge_models(z["base"], out_dir=tmp_path / "cpu", seed=3, progress=False, **kw)
    merge_models(z["base"], out_dir=tmp_path / "gpu", weights=weights, seed=3, device="cuda", progress=False, **kw)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == (
        tmp_path / "gpu" / "model.safetensors"
    ).read_bytes()


# --- names, parameters and bad input --------------------------------------------------------------


def test_method_keys_round_trip():
    for key in registry.method_keys():
        method, fixed = registry.parse_key(key)
        assert registry.method_key(method.name, registry.check_params(method.name, fixed)) == key
    assert registry.parse_key("resample3") == (registry.METHODS["select"], {"resample": 3})
    assert registry.method_key("select", {"resample": 0}) == "select"
    with pytest.raises(ValueError, match="unknown merge method 'tie'") as err:  # names every key, from the registry
        registry.parse_key("tie")
    assert all(m in str(err.value) for m in [*registry.METHODS, "resampleN"])


def test_parameters_default_and_apply_to_their_methods_only():
    assert registry.check_params("ties", {}) == {"density": 0.2, "scale": 1.0}
    assert registry.check_params("dare", {"drop_rate": 0.5}) == {"drop_rate": 0.5, "scale": 1.0}
    assert registry.check_params("select", {}) == {"resample": 0}  # a parameter like any other, keyed or not
    assert registry.check_params("average", {}) == {} and registry.check_params("model_stock", {}) == {}


BAD = [
    (["--method", "ties", "--density", "0"], "--density must be in (0, 1], got 0.0"),
    (["--method", "ties", "--density", "1.5"], "--density must be in (0, 1], got 1.5"),
    (["--method", "dare", "--drop-rate", "1"], "--drop-rate must be in [0, 1), got 1.0"),
    (["--method", "dare", "--drop-rate", "-0.1"], "--drop-rate must be in [0, 1), got -0.1"),
    (["--method", "task_arithmetic", "--scale", "0"], "--scale must be > 0, got 0.0"),
    (["--method", "ties", "--scale", "nan"], "--scale must be > 0, got nan"),
    (["--method", "dare", "--density", "0.5"], "--density applies to ties only, not dare"),
    (
        ["--method", "select", "--scale", "2"],  # every method taking scale is named, from the registry
        f"--scale applies to {', '.join(m.name for m in registry.METHODS.values() if 'scale' in m.params)} "
        "only, not select",
    ),
    (["--method", "model_stock", "--weights", "1,2,3"], "model_stock averages the inputs uniformly"),
]
if not torch.cuda.is_available():
    BAD.append((["--method", "ties", "--device", "cuda"], "--device cuda: torch sees no CUDA GPU"))


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a[1:]) for a, _ in BAD])
def test_bad_parameters_fail_with_one_line(zoo, tmp_path, capsys, args, message):
    out = tmp_path / "results" / "merged"
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--base", str(zoo["base"]), *args, "--out", str(out), *map(str, zoo["models"])])
    err = capsys.readouterr().err.strip()
    assert exc.value.code != 0
    assert len(err.splitlines()) == 1 and err.startswith("ordermerge merge: error: ") and message in err, err
    assert not (tmp_path / "results").exists()


def test_provenance_and_model_card_name_the_method_and_its_parameters(zoo, tmp_path):
    main(
        [
            "merge",
            "--base",
            str(zoo["base"]),
            "--method",
            "dare",
            "--drop-rate",
            "0.3",
            "--scale",
            "2",
            "--seed",
            "9",
            "--out",
            str(tmp_path / "m"),
            *map(str, zoo["models"]),
        ]
    )
    prov = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert (prov["method"], prov["method_key"], prov["seed"]) == ("dare", "dare", 9)
    assert prov["parameters"] == {"drop_rate": 0.3, "scale": 2.0} and prov["device"] == "cpu"
    card = (tmp_path / "m" / "README.md").read_text()
    assert "DARE" in card and "drop_rate" in card
