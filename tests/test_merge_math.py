import numpy as np
import pytest
import torch

from ordermerge.merging.bits import normalized_weights, select, stored_bits, weighted_average


def _models(k=4, shape=(64, 32), dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) + 10 * i for i in range(k)]


def test_select_takes_every_element_whole_from_one_model():
    models = _models()
    out, stats = select(models, [0.25] * 4, 0)
    stack = torch.stack(models)
    matches = stored_bits(stack) == stored_bits(out).unsqueeze(0)
    assert bool(matches.any(0).all())
    assert sum(stats.counts) == out.numel()
    assert out.dtype == torch.bfloat16 and out.shape == models[0].shape


def test_select_draws_uniformly():
    models = _models(k=4, shape=(200, 200), dtype=torch.float32)
    _, stats = select(models, [0.25] * 4, 1)
    freq = np.array(stats.counts) / 40000
    # 4 sd of a binomial proportion with n = 40000 is 0.0087
    assert np.all(np.abs(freq - 0.25) < 0.0087)


def test_select_respects_weights():
    models = _models(k=3, shape=(300, 300), dtype=torch.float32)
    _, stats = select(models, normalized_weights([1, 2, 7], 3), 2)
    freq = np.array(stats.counts) / 90000
    assert np.allclose(freq, [0.1, 0.2, 0.7], atol=0.006)


def test_select_is_deterministic_per_generator_seed():
    models = _models()
    a, _ = select(models, [0.25] * 4, 5)
    b, _ = select(models, [0.25] * 4, 5)
    c, _ = select(models, [0.25] * 4, 6)
    assert torch.equal(stored_bits(a), stored_bits(b))
    assert not torch.equal(stored_bits(a), stored_bits(c))


def test_weighted_average_is_exact_fp32_mean_cast_to_dtype():
    models = _models(k=3, dtype=torch.bfloat16)
    out = weighted_average(models, [1 / 3] * 3)
    exact = sum(m.double() / 3 for m in models)
    ref = exact.to(torch.bfloat16)
    # fp32 accumulation then one rounding to bf16: equal to the exact mean rounded once, except
    # for rare double-rounding ties, which are off by at most one bf16 ulp
    ulp_diff = (stored_bits(out).int() - stored_bits(ref).int()).abs()
    assert int(ulp_diff.max()) <= 1
    assert float((ulp_diff > 0).float().mean()) < 0.01
    w = normalized_weights([1, 0, 0], 3)
    assert torch.equal(weighted_average(models, w), models[0])


def test_resample_only_redraws_where_the_drawn_task_vector_is_zero():
    k, n = 4, 20000
    base = torch.randn(n).to(torch.bfloat16)
    models = []
    g = torch.Generator().manual_seed(3)
    for i in range(k):
        m = base.clone()
        changed = torch.rand(n, generator=g) < 0.5  # half of each model's elements moved
        m[changed] = (base[changed].float() + 1.0 + i).to(torch.bfloat16)
        models.append(m)
    plain, s0 = select(models, [0.25] * k, 9)
    res, s1 = select(models, [0.25] * k, 9, base=base, resample=1)
    zero_plain = stored_bits(plain) == stored_bits(base)
    # same first draw: elements whose first draw was non-zero are untouched by resampling
    assert torch.equal(stored_bits(res)[~zero_plain], stored_bits(plain)[~zero_plain])
    assert s1.resampled == [int(zero_plain.sum())]
    # Every draw is from ALL K (the same model included), so an element where z of the K models
    # are unchanged stays zero after r redraws with probability (z/K)^(r+1).
    z = sum((stored_bits(m) == stored_bits(base)).double() for m in models)
    for rounds, stats in ((0, s0), (1, s1)):
        expected = float(((z / k) ** (rounds + 1)).sum())
        zeros = stats.zero_after if rounds else int(zero_plain.sum())
        assert abs(zeros - expected) < 4 * expected**0.5 + 1
    _, s3 = select(models, [0.25] * k, 9, base=base, resample=3)
    expected = float(((z / k) ** 4).sum())
    assert abs(s3.zero_after - expected) < 4 * expected**0.5 + 1
    assert len(s3.resampled) == 3 and s3.resampled[0] == s1.resampled[0]


def test_resample_compares_stored_bits_not_values():
    base = torch.tensor([0.0, 1.0], dtype=torch.bfloat16)
    neg_zero = torch.tensor([-0.0, 1.0], dtype=torch.bfloat16)
    other = torch.tensor([5.0, 7.0], dtype=torch.bfloat16)
    # -0.0 == 0.0 as values, but its bits differ: it counts as changed, so it is kept
    _, stats = select([neg_zero, other], [1.0, 0.0], 0, base=base, resample=2)
    assert stats.resampled[0] == 1  # only element 1 (exactly the base's bits) is redrawn


def test_resample_needs_base():
    with pytest.raises(ValueError, match="base"):
        select(_models(), [0.25] * 4, 0, resample=1)


def test_weights_must_match_k():
    with pytest.raises(ValueError, match="one weight per model"):
        normalized_weights([1, 2], 3)
