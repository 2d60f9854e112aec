"""``ordermerge merge --config merge.yml``: mergekit YAML configs, written the way mergekit's own examples are
(examples/linear.yml, ties.yml, bio-merge.yml), on the merge tests' tiny checkpoints (helpers.merge_zoo)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from helpers import merge_zoo, read_weights
from ordermerge.cli import main
from ordermerge.merging import mergekit_config, registry
from ordermerge.merging.mergekit_config import ConfigError, translate


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A bf16 base and 3 fine-tunes in base/, ft0/ .. ft2/ beside the configs."""
    return merge_zoo(tmp_path_factory.mktemp("mk"), 3)


def _run(*args) -> None:
    main(["merge", *map(str, args)])


def _config(zoo, text: str, name: str = "merge.yml") -> Path:
    path = zoo["base"].parent / name
    path.write_text(text)
    return path


def _refusal(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        _run(*args)
    assert exc.value.code == 2
    return capsys.readouterr().err


LINEAR = """\
models:
  - model: ft0
    parameters:
      weight: 1.0
  - model: ft1
    parameters:
      weight: 0.3
  - model: ft2
    parameters:
      weight: 0.5
merge_method: linear
dtype: bfloat16
"""
TASK_ARITHMETIC = """\
models:
  - model: ft0
    parameters:
      weight: 1.0
  - model: ft1
    parameters:
      weight: 0.5
  - model: ft2
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: base
parameters:
  lambda: 0.8
dtype: bfloat16
"""
TIES = """\
models:
  - model: base
  - model: ft0
    parameters:
      density: 0.5
      weight: 0.5
  - model: ft1
    parameters:
      density: 0.5
      weight: 0.3
  - model: ft2
    parameters:
      density: 0.5
      weight: 0.2
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
out_dtype: bfloat16
"""
DARE_LINEAR = """\
models:
  - model: ft0
    parameters:
      weight: 1.0
      density: 0.1
  - model: ft1
    parameters:
      weight: 1.0
      density: 0.1
  - model: ft2
    parameters:
      weight: 1.0
      density: 0.1
merge_method: dare_linear
base_model: base
dtype: bfloat16
"""
MODEL_STOCK = """\
models:
  - model: ft0
  - model: ft1
  - model: ft2
merge_method: model_stock
base_model: base
dtype: bfloat16
"""
SELECT = """\
models:
  - model: ft0
  - model: ft1
  - model: ft2
merge_method: select
base_model: base
parameters:
  resample: 1
"""

# config, the same merge as flags (base and models are the zoo's), flags given beside --config
SAME = {
    "linear": (LINEAR, ["--base", "ft0", "--method", "average", "--weights", "1.0,0.3,0.5"], []),
    "task_arithmetic": (
        TASK_ARITHMETIC,
        ["--base", "base", "--method", "task_arithmetic", "--weights", "1,0.5,0.5", "--scale", "1.6"],
        [],
    ),
    "ties": (
        TIES,
        ["--base", "base", "--method", "ties", "--density", "0.5", "--scale", "1", "--weights", "0.5,0.3,0.2"],
        [],
    ),
    "dare_linear": (
        DARE_LINEAR,
        [
            "--base",
            "base",
            "--method",
            "dare",
            "--drop-rate",
            "0.9",
            "--scale",
            "3",
            "--weights",
            "1,1,1",
            "--seed",
            "5",
        ],
        ["--seed", "5"],
    ),
    "model_stock": (MODEL_STOCK, ["--base", "base", "--method", "model_stock"], []),
    "select": (SELECT, ["--base", "base", "--method", "select", "--resample", "1", "--seed", "2"], ["--seed", "2"]),
    "resample1": (
        SELECT.replace("merge_method: select", "merge_method: resample1").replace("parameters:\n  resample: 1\n", ""),
        ["--base", "base", "--method", "select", "--resample", "1"],
        [],
    ),
}


@pytest.mark.parametrize("case", list(SAME))
def test_config_gives_the_bytes_of_the_same_merge_as_flags(zoo, tmp_path, case):
    text, flags, beside = SAME[case]
    root = zoo["base"].parent
    config = _config(zoo, text, f"{case}.yml")
    _run("--config", config, "--out", tmp_path / "config", *beside)
    flags = [str(root / f) if f in ("base", "ft0") else f for f in flags]
    _run(*flags, "--out", tmp_path / "flags", *(root / f"ft{i}" for i in range(3)))
    a, b = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("config", "flags"))
    assert a == b
    record = json.loads((tmp_path / "config" / "merge.json").read_text())["config"]
    assert record["sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    assert record["parsed"] == yaml.safe_load(text)
    assert record["read_as"].split()[0] == ("mergekit" if case in mergekit_config.MERGEKIT else "ordermerge")
    assert "config" not in json.loads((tmp_path / "flags" / "merge.json").read_text())


def _fp32(zoo, name):
    return zoo["state"][name].float(), [ft[name].float() for ft in zoo["fts"]]


def test_mergekit_weights_and_lambda_mean_what_they_mean_there(zoo, tmp_path):
    """mergekit's normalize: false task arithmetic is base + λ Σ w_i τ_i (not a weighted mean): the same
    within one bf16 rounding; linear is Σ w_i θ_i / Σ w_i."""
    _run("--config", _config(zoo, TASK_ARITHMETIC), "--out", tmp_path / "ta")
    _run("--config", _config(zoo, LINEAR), "--out", tmp_path / "linear")
    ta, linear = read_weights(tmp_path / "ta"), read_weights(tmp_path / "linear")
    for name in ("model.layers.0.mlp.weight", "model.norm.weight"):
        base, fts = _fp32(zoo, name)
        expected = base + 0.8 * sum(w * (ft - base) for w, ft in zip((1.0, 0.5, 0.5), fts))
        torch.testing.assert_close(ta[name].float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)
        expected = sum(w * ft for w, ft in zip((1.0, 0.3, 0.5), fts)) / 1.8
        torch.testing.assert_close(linear[name].float(), expected.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6)


def test_ties_record_says_where_it_differs_from_mergekit(zoo, tmp_path):
    _run("--config", _config(zoo, TIES), "--out", tmp_path / "ties")
    record = json.loads((tmp_path / "ties" / "merge.json").read_text())["config"]
    notes = " ".join(record["differences_from_mergekit"])
    assert "floor(density·n)" in notes and "is base_model: left out" in notes
    assert "arithmetic in" not in notes  # dtype: float32 is what ordermerge computes in
    _run(
        "--config",
        _config(zoo, TIES.replace("dtype: float32\nout_dtype: bfloat16", "dtype: bfloat16")),
        "--out",
        tmp_path / "ties16",
    )
    record = json.loads((tmp_path / "ties16" / "merge.json").read_text())["config"]
    assert any("arithmetic in bfloat16" in n for n in record["differences_from_mergekit"])
    assert (tmp_path / "ties" / "model.safetensors").read_bytes() == (
        tmp_path / "ties16" / "model.safetensors"
    ).read_bytes()


REFUSED = {  # name: (edit of a config, the key the message must name)
    "slices": (lambda t: t + "slices:\n  - sources:\n      - model: ft0\n        layer_range: [0, 2]\n", "slices"),
    "tokenizer_source": (lambda t: t + "tokenizer_source: union\n", "tokenizer_source"),
    "chat_template": (lambda t: t + "chat_template: chatml\n", "chat_template"),
    "unknown top key": (lambda t: t + "merge_seed: 3\n", "merge_seed"),
    "density gradient": (
        lambda t: t.replace("density: 0.5\n      weight: 0.5", "density: [1, 0.7, 0.1]\n      weight: 0.5"),
        "models[1].parameters.density",
    ),
    "filtered weight": (
        lambda t: t.replace("weight: 0.3", "weight:\n        - filter: mlp\n          value: 0.5\n        - value: 0"),
        "models[2].parameters.weight",
    ),
    "per-model densities": (
        lambda t: t.replace("density: 0.5\n      weight: 0.3", "density: 0.3\n      weight: 0.3"),
        "one density for all inputs",
    ),
    "normalize false": (lambda t: t.replace("normalize: true", "normalize: false"), "parameters.normalize"),
    "rescale": (lambda t: t.replace("int8_mask: true", "rescale: true"), "parameters.rescale"),
    "negative weight": (lambda t: t.replace("weight: 0.3", "weight: -0.3"), "non-negative"),
    "nan weight": (lambda t: t.replace("weight: 0.3", "weight: .nan"), "finite number"),
    "string weight": (lambda t: t.replace("weight: 0.3", "weight: '0.3'"), "models[2].parameters.weight"),
    "unknown per-model key": (
        lambda t: t.replace("weight: 0.3", "weight: 0.3\n      gamma: 0.01"),
        "models[2].parameters.gamma",
    ),
    "dare_ties": (lambda t: t.replace("merge_method: ties", "merge_method: dare_ties"), "dare_ties"),
    "della": (lambda t: t.replace("merge_method: ties", "merge_method: della"), "della"),
    "unknown method": (lambda t: t.replace("merge_method: ties", "merge_method: frankenmerge"), "frankenmerge"),
    "lora": (lambda t: t.replace("model: ft1", "model: ft1+adapter"), "model+lora"),
    "revision": (lambda t: t.replace("model: ft1", "model: ft1@main"), "revision"),
    "hub id": (lambda t: t.replace("model: ft1", "model: HuggingFaceTB/SmolLM2-135M"), "models[2].model"),
    "layer_range": (
        lambda t: t.replace("  - model: ft1\n", "  - model: ft1\n    layer_range: [0, 2]\n"),
        "layer_range",
    ),
    "no base": (lambda t: t.replace("base_model: base\n", ""), "base_model"),
    "half-precision arithmetic": (lambda t: t.replace("dtype: float32", "dtype: float16"), "dtype: float16"),
    "float32 output": (lambda t: t.replace("out_dtype: bfloat16\n", ""), "out_dtype: bfloat16"),
    "python tag": (lambda t: t + "x: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "lambda zero": (lambda t: t.replace("int8_mask: true", "lambda: 0"), "parameters.lambda"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_it_cannot_honour_are_refused_by_name(zoo, tmp_path, capsys, case):
    edit, key = REFUSED[case]
    err = _refusal(capsys, "--config", _config(zoo, edit(TIES), "refused.yml"), "--out", tmp_path / "out")
    assert key in err, err
    assert not (tmp_path / "out").exists()


OTHER_REFUSALS = {
    "linear without weights": (
        LINEAR.replace("    parameters:\n      weight: 0.3\n", ""),
        "models[1].parameters.weight",
    ),
    "linear with a base it would merge": (LINEAR + "base_model: base\n", "base_model"),
    "linear unnormalised": (LINEAR + "parameters:\n  normalize: false\n", "parameters.normalize"),
    "task_arithmetic density": (TASK_ARITHMETIC.replace("lambda: 0.8", "density: 0.5"), "parameters.density"),
    "dare_linear no rescale": (DARE_LINEAR + "parameters:\n  rescale: false\n", "parameters.rescale"),
    "model_stock weights": (
        MODEL_STOCK.replace("  - model: ft1\n", "  - model: ft1\n    parameters:\n      weight: 2\n"),
        "weight",
    ),
    "model_stock filter_wise": (MODEL_STOCK + "parameters:\n  filter_wise: true\n", "parameters.filter_wise"),
    "select with mergekit's lambda": (SELECT.replace("resample: 1", "lambda: 1.0"), "parameters.lambda"),
    "resample key and parameter disagree": (
        SELECT.replace("merge_method: select", "merge_method: resample2"),
        "contradicts",
    ),
    "one model": (MODEL_STOCK.replace("  - model: ft1\n  - model: ft2\n", ""), "at least 2"),
}


@pytest.mark.parametrize("case", list(OTHER_REFUSALS))
def test_other_methods_refuse_what_they_cannot_express(zoo, tmp_path, capsys, case):
    text, key = OTHER_REFUSALS[case]
    err = _refusal(capsys, "--config", _config(zoo, text, "refused.yml"), "--out", tmp_path / "out")
    assert key in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "ties"],
        ["--density", "0.3"],
        ["--resample", "0"],
        ["--weights", "1,1,1"],
        ["--base", "base"],
        ["ft0"],
    ],
)
def test_flags_that_define_the_merge_are_refused_beside_config(zoo, tmp_path, capsys, flags):
    err = _refusal(capsys, "--config", _config(zoo, TIES), "--out", tmp_path / "out", *flags)
    assert "not both" in err and (flags[0] if flags[0].startswith("--") else "MODEL_DIR") in err


def test_paths_are_relative_to_the_config_file(zoo, tmp_path, monkeypatch):
    sub = zoo["base"].parent / "configs"
    sub.mkdir(exist_ok=True)
    config = sub / "ta.yml"
    config.write_text(
        TASK_ARITHMETIC.replace("model: ft", "model: ../ft").replace("base_model: base", "base_model: ../base")
    )
    monkeypatch.chdir(tmp_path)  # nothing named ft0 here: only the config's directory can resolve them
    _run("--config", config, "--out", tmp_path / "rel")
    record = json.loads((tmp_path / "rel" / "merge.json").read_text())
    assert Path(record["base"]["path"]).resolve() == zoo["base"].resolve()


def test_output_over_the_config_is_refused_even_with_force(zoo, tmp_path, capsys):
    folder = tmp_path / "job"
    folder.mkdir()
    config = folder / "merge.yml"
    config.write_text(
        TASK_ARITHMETIC.replace("model: ft", f"model: {zoo['base'].parent}/ft").replace(
            "base_model: base", f"base_model: {zoo['base']}"
        )
    )
    err = _refusal(capsys, "--config", config, "--out", folder, "--force")
    assert "--config" in err and config.exists()


def test_slerp_is_offered_exactly_when_the_registry_has_it(monkeypatch):
    """The mergekit table's slerp row is live only while registry.METHODS has a slerp (one line to add)."""
    assert ("slerp" in mergekit_config.offered()) == ("slerp" in registry.METHODS)
    # a registry without slerp: a copy, so the real one keeps its order (the docs' method table follows it)
    monkeypatch.setattr(registry, "METHODS", {k: v for k, v in registry.METHODS.items() if k != "slerp"})
    assert "slerp" not in mergekit_config.offered()
    with pytest.raises(ConfigError, match="merge_method: slerp: ordermerge has no slerp method"):
        translate({"merge_method": "slerp", "models": ["a", "b"]}, Path("/"))


def test_every_row_names_a_registry_method_or_waits_for_one():
    """One fact, one place: the table's targets and parameters are the registry's."""
    for name, row in mergekit_config.MERGEKIT.items():
        if row.method not in registry.METHODS:
            assert name not in mergekit_config.offered()
            continue
        params = registry.get(row.method).params
        assert row.density is None or row.density in params
        assert all(target in params for target in row.shared.values())
        assert replace(row).keys() == row.keys()


def test_without_config_the_merge_flags_are_still_required(tmp_path, capsys):
    err = _refusal(capsys, "--out", tmp_path / "out", "--method", "average")
    assert "--base, MODEL_DIR (or --config merge.yml)" in err


@pytest.mark.parametrize("t", [0.0, 1.0, 0.3])
def test_slerp_goes_from_base_model_to_the_other_as_in_mergekit(zoo, tmp_path, t):
    """mergekit's slerp: t = 0 is base_model, t = 1 the other model, whatever their order under models."""
    root = zoo["base"].parent
    config = _config(
        zoo,
        f"models:\n  - model: ft1\n  - model: ft0\nmerge_method: slerp\nbase_model: ft0\nparameters:\n  t: {t}\n"
        "dtype: bfloat16\n",
        "slerp.yml",
    )
    _run("--config", config, "--out", tmp_path / "config")
    _run("--base", root / "ft0", "--method", "slerp", "--t", t, "--out", tmp_path / "flags", root / "ft0", root / "ft1")
    got = (tmp_path / "config" / "model.safetensors").read_bytes()
    assert got == (tmp_path / "flags" / "model.safetensors").read_bytes()
    if t in (0.0, 1.0):  # the ends are the inputs' own bytes
        end = read_weights(root / ("ft0" if t == 0.0 else "ft1"))
        merged = read_weights(tmp_path / "config")
        assert all(torch.equal(merged[k], end[k]) for k in end if end[k].is_floating_point())  # ints: first input's
