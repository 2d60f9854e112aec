"""The merge registry is the one source of truth: the CLI, the config schema and its messages, and the
engine's dispatch are all derived from it, and every registered method has its one module."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from helpers import fine_tuned_state, merge_base_state, save_model_dir
from ordermerge.cli import build_parser
from ordermerge.config import ConfigError, load_schema, validate_config
from ordermerge.merging import registry

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def _merge_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["merge"]


def test_every_method_has_one_module_with_a_merger():
    from ordermerge.merging.methods import MergeMethod, load

    for name in registry.METHODS:
        assert importlib.util.find_spec(f"ordermerge.merging.methods.{name}") is not None
        assert isinstance(load(name), MergeMethod)


def test_engine_names_no_method():
    """Dispatch goes through the registry and methods/<name>.py: no per-method string in the engine."""
    source = (ROOT / "src/ordermerge/merging/engine.py").read_text()
    for name in registry.METHODS:
        assert not re.search(rf"(==|!=|\bin\b)\s*\(?[^\n]*[\"']{name}[\"']", source), name  # no switch on it


def test_cli_choices_and_flags_come_from_the_registry():
    actions = {a.dest: a for a in _merge_parser()._actions}
    assert list(actions["method"].choices) == list(registry.METHODS)
    for p in registry.PARAMETERS.values():
        flag = actions[p.name]
        assert flag.option_strings == [p.flag]
        assert p.bounds() in flag.help
        assert flag.default is None  # the engine fills the registry's default; None: not given (--config refuses it)
    assert "data" in actions and "task_spec" in actions


def test_schema_gets_keys_and_parameters_from_the_registry():
    schema = load_schema()
    merge = schema["properties"]["merge"]["properties"]
    assert merge["methods"]["items"]["pattern"] == f"^({registry.key_pattern()})$"
    for name in registry.workflow_params():
        assert merge[name] == registry.PARAMETERS[name].schema()
    yaml_text = (ROOT / "workflow/schemas/config.schema.yaml").read_text()
    assert "model_stock" not in yaml_text.split("description")[0]  # the pattern is not restated in the YAML
    heldout = schema["properties"]["tasks"]["additionalProperties"]["properties"]["n_heldout"]
    assert heldout["minimum"] == 0 and heldout["default"] == 0


def test_key_pattern_matches_exactly_the_keys():
    pattern = re.compile(f"^({registry.key_pattern()})$")
    for key in registry.method_keys():
        assert pattern.match(key)
    for bad in ("resample0", "resample9", "tie", "select1", ""):
        assert not pattern.match(bad)


def test_methods_that_choose_on_data_need_heldout_samples(monkeypatch):
    """The cross-key rule: a needs_data method in merge.methods requires tasks.<name>.n_heldout >= 1."""
    chooser = registry.Method("chooser", "test only", "none", needs_data=True, needs_base=False)
    monkeypatch.setitem(registry.METHODS, "chooser", chooser)
    cfg = yaml.safe_load(yaml.safe_dump(DEFAULT))
    cfg["merge"]["methods"] = ["average", "chooser"]
    task = next(iter(cfg["tasks"]))
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as err:
        validate_config(yaml.safe_load(yaml.safe_dump(cfg)))
    [line] = [p for p in err.value.problems if "n_heldout" in p]
    assert line.startswith(f"tasks.{task}.n_heldout: 0") and "chooser" in line and "n_heldout >= 1" in line
    for t in cfg["tasks"].values():
        t["n_heldout"] = 8
    assert validate_config(cfg)["tasks"][task]["n_heldout"] == 8


def test_default_config_has_n_heldout_zero(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = validate_config(yaml.safe_load(yaml.safe_dump(DEFAULT)))
    assert all(t["n_heldout"] == 0 for t in cfg["tasks"].values())


def test_data_flags_refused_for_methods_that_use_no_data(tmp_path):
    from ordermerge.merging.engine import merge_models

    base = merge_base_state()
    b = save_model_dir(tmp_path / "base", base)
    models = [save_model_dir(tmp_path / f"m{i}", fine_tuned_state(base, i)) for i in range(2)]
    with pytest.raises(ValueError, match="average uses no data; drop --data and --task-spec"):
        merge_models(
            b, models, tmp_path / "out", method="average", data=tmp_path / "x.jsonl", task_spec={}, progress=False
        )
    assert not (tmp_path / "out").exists()


def test_methods_page_table_is_the_registry():
    """One fact, one place: the method table in docs/methods.md is generated from the registry."""
    import re
    from pathlib import Path

    from ordermerge.merging.registry import markdown_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    block = re.search(r"<!-- methods:begin.*?-->\n(.*?)<!-- methods:end -->", page, re.S)
    assert block, "docs/methods.md lacks the generated method table"
    assert block.group(1).strip() == markdown_table().strip(), (
        "docs/methods.md's method table is stale: replace it by the output of `python -m ordermerge.merging.registry`"
    )
