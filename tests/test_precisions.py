"""Storage precisions: one training, every stored form made from the fp32 checkpoint (``ordermerge round``),
and merges of fp32 fine-tunes against a bf16 base's exact values."""

import json

import pytest
import torch

from helpers import merge_base_state, read_weights, save_model_dir
from ordermerge.cli import main
from ordermerge.config import ConfigError, validate_config
from ordermerge.merging.engine import merge_models
from ordermerge.storage import precisions
from ordermerge.storage.rounding import ROUND_JSON, round_checkpoint, stochastic_bf16


def fp32_fine_tune(base: dict, i: int) -> dict:
    """fp32 weights: the bf16 base plus updates of every size, many below half a bf16 step."""
    g = torch.Generator().manual_seed(200 + i)
    out = {}
    for name, t in base.items():
        if not t.is_floating_point():
            out[name] = t
            continue
        scale = torch.logspace(-6, -1, t.numel())[torch.randperm(t.numel(), generator=g)].reshape(t.shape)
        out[name] = t.float() * (1 + scale * torch.randn(t.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("precisions")
    base = merge_base_state()
    fts = [fp32_fine_tune(base, i) for i in range(3)]

    def save(directory, state, dtype):  # config.json states the stored dtype, as the workflow's models do
        out = save_model_dir(directory, state)
        (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "dtype": dtype}))
        return out

    base_dir = save(root / "base", base, "bfloat16")
    return {
        "base_state": base,
        "fts": fts,
        "base": base_dir,
        "base32": save_model_dir(
            root / "base32", {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
        ),
        "models": [save(root / f"ft{i}", s, "float32") for i, s in enumerate(fts)],
        "root": root,
    }


def test_nearest_twin_is_exactly_the_rounding_of_fp32(zoo, tmp_path):
    out = tmp_path / "bf16"
    summary = round_checkpoint(zoo["models"][0], zoo["base"], "bf16", 0, out)
    got = read_weights(out)
    for name, t in zoo["fts"][0].items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert got[name].dtype == want.dtype and torch.equal(got[name].view(-1), want.view(-1)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the storage-loss statistics, recomputed here from the tensors
    changed = erased = 0
    lost = norm = 0.0
    for name, t in zoo["fts"][0].items():
        if t.is_floating_point():
            b = zoo["base_state"][name].double()
            tau, tau_r = t.double() - b, t.to(torch.bfloat16).double() - b
            changed += int((tau != 0).sum())
            erased += int(((tau != 0) & (tau_r == 0)).sum())
            lost, norm = lost + float(((tau - tau_r) ** 2).sum()), norm + float((tau**2).sum())
    assert summary["changed_fp32"] == changed and summary["erased"] == erased > 0
    assert summary["relative_norm_lost"] == pytest.approx((lost / norm) ** 0.5, rel=1e-9)
    assert json.loads((out / ROUND_JSON).read_text())["erased"] == erased


def test_round_twin_equals_a_fine_tune_saved_in_bf16(tmp_path):
    """The workflow's bf16 precision is what `train.save_dtype: bfloat16` stores, bit for bit: one tiny
    fine-tune saved both ways (same seed, order and training) against the fp32 save rounded."""
    from helpers import build_tiny_base, fine_tune_cmd, run_cli, train_cfg, write_train
    from ordermerge.data.orders import make_order, save_order

    base = build_tiny_base(tmp_path / "base")
    train = write_train(tmp_path / "train.jsonl", n=8)
    order = tmp_path / "order.npy"
    save_order(make_order(8, 1, "shuffle", 4, 0, "t", 0), order)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = tmp_path / dtype
        run_cli(fine_tune_cmd(base, train, order, outs[dtype], train_cfg(epochs=1, batch_size=4, save_dtype=dtype)))
    twin = tmp_path / "twin"
    main(
        [
            "round",
            "--model-dir",
            str(outs["float32"] / "epoch1"),
            "--base",
            str(base),
            "--precision",
            "bf16",
            "--seed",
            "0",
            "--out",
            str(twin),
        ]
    )
    a, b = read_weights(twin), read_weights(outs["bfloat16"] / "epoch1")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(
            a[name].view(torch.int16) if a[name].dtype == torch.bfloat16 else a[name],
            b[name].view(torch.int16) if b[name].dtype == torch.bfloat16 else b[name],
        ), name


def test_stochastic_rounding_is_unbiased_seeded_and_between_neighbours():
    x = torch.full((200_000,), 1 + 3 * 2**-10)  # 3/8 of the way from 1 to the next bf16 value, 1 + 2**-7
    r = stochastic_bf16(x, 5).float()
    lo, hi = torch.tensor(1.0), torch.tensor(1 + 2**-7)
    assert bool(((r == lo) | (r == hi)).all())
    assert (r == hi).float().mean().item() == pytest.approx(3 / 8, abs=0.005)
    assert torch.equal(stochastic_bf16(-x, 5).float(), -r)  # sign-magnitude: the same draw, mirrored
    assert torch.equal(stochastic_bf16(x, 5).view(torch.int16), stochastic_bf16(x, 5).view(torch.int16))
    assert not torch.equal(stochastic_bf16(x, 6), stochastic_bf16(x, 5))
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), -float("inf"), 3.0e38])
    assert torch.equal(stochastic_bf16(exact, 1)[:5].float(), exact[:5])
    assert torch.isfinite(stochastic_bf16(torch.tensor([3.3895e38] * 64), 1)).all()  # no carry into inf


def test_stochastic_twin_keeps_small_updates_that_nearest_erases(zoo, tmp_path):
    near = round_checkpoint(zoo["models"][0], zoo["base"], "bf16", 0, tmp_path / "near")
    sr = round_checkpoint(zoo["models"][0], zoo["base"], "bf16sr", 3, tmp_path / "sr")
    again = round_checkpoint(zoo["models"][0], zoo["base"], "bf16sr", 3, tmp_path / "sr2")
    assert sr["erased"] < near["erased"]
    assert read_weights(tmp_path / "sr").keys() == read_weights(tmp_path / "sr2").keys()
    for name, t in read_weights(tmp_path / "sr").items():
        assert torch.equal(t, read_weights(tmp_path / "sr2")[name])
    assert sr == {**again, "source": sr["source"]} or sr["erased"] == again["erased"]


@pytest.mark.parametrize("method", ["average", "select", "resample1", "ties"])
def test_fp32_fine_tunes_merge_against_the_bf16_base_widened(zoo, tmp_path, method):
    """A bf16 base widens exactly: merging fp32 fine-tunes against it equals merging against its fp32 copy."""
    name, params = {"resample1": ("select", {"resample": 1})}.get(method, (method, {}))
    a = merge_models(zoo["base"], zoo["models"], tmp_path / "a", method=name, seed=1, progress=False, **params)
    b = merge_models(zoo["base32"], zoo["models"], tmp_path / "b", method=name, seed=1, progress=False, **params)
    wa, wb = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name
    assert wa["model.norm.weight"].dtype == torch.float32
    # config.json says what is stored, so from_pretrained and the loaders' dtype check read it as it is
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((zoo["base"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert a["stats"] == b["stats"]


def test_a_base_that_does_not_widen_exactly_is_refused(zoo, tmp_path):
    from ordermerge.storage.checkpoint import CheckpointError

    fp16 = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in zoo["fts"][0].items()}
    m16 = save_model_dir(tmp_path / "m16", fp16)
    with pytest.raises(CheckpointError, match="holds its values exactly"):
        merge_models(zoo["base"], [m16, m16], tmp_path / "out", method="average", progress=False)


def test_round_refuses_widening_and_never_writes_over_its_input(zoo, tmp_path):
    with pytest.raises(SystemExit):
        main(
            [
                "round",
                "--model-dir",
                str(zoo["models"][0]),
                "--base",
                str(zoo["base"]),
                "--precision",
                "bf16",
                "--seed",
                "0",
                "--out",
                str(zoo["models"][0]),
            ]
        )
    from ordermerge.storage.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="cannot be widened"):
        round_checkpoint(zoo["base"], zoo["base"], "fp32", 0, tmp_path / "w")


def _cfg(**over):
    import yaml

    from ordermerge.config import SCHEMA_PATH

    cfg = yaml.safe_load((SCHEMA_PATH.parents[2] / "config.yaml").read_text())
    for key, value in over.items():
        section, _, leaf = key.partition(".")
        if leaf:
            cfg[section][leaf] = value
        else:
            cfg[section] = value
    return cfg


def test_config_precisions_come_from_the_registry_and_must_be_reachable():
    assert validate_config(_cfg())["precisions"] == ["fp32", "bf16"]
    with pytest.raises(
        ConfigError,
        match=r"precisions\[0\]: fp32 — cannot be made from checkpoints saved in "
        r"bfloat16.*set train.save_dtype: float32",
    ):
        validate_config(_cfg(**{"train.save_dtype": "bfloat16"}))
    assert validate_config(_cfg(**{"train.save_dtype": "bfloat16", "precisions": ["bf16"]}))["precisions"] == ["bf16"]
    with pytest.raises(ConfigError, match="bf17"):
        validate_config(_cfg(precisions=["bf17"]))
    with pytest.raises(ConfigError, match="does not widen exactly"):
        validate_config(_cfg(precisions=["fp16"]))  # the base is bf16
    assert set(precisions.schema_fragment()["enum"]) == set(precisions.PRECISIONS)
