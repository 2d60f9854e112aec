"""Config validation: the JSON schema (with defaults) plus the cross-key rules a schema cannot say.

Called by the Snakefile before any job runs, and by the CLI. Every error names the key, the bad
value and the fix; unknown keys get a "did you mean".
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    pass


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _fill_defaults(schema: dict, instance: dict) -> None:
    """Insert schema defaults, recursing into objects and per-entry (additionalProperties) objects."""
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, instance[key])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}) and isinstance(value, dict):
                _fill_defaults(extra, value)


def _explain(error, schema: dict) -> str:
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extras = [k for k in error.instance if k not in allowed]
        hints = []
        for k in extras:
            close = difflib.get_close_matches(k, allowed, n=1)
            hints.append(f"unknown key '{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return f"{where}: {'; '.join(hints)}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        close = difflib.get_close_matches(str(error.instance), [str(v) for v in error.validator_value], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: {error.instance!r} is not one of {error.validator_value}{hint}"
    if error.validator == "required":
        return f"{where}: {error.message}; add it (see config.yaml for an example)"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum"):
        return f"{where}: {error.instance!r} is out of range ({error.validator} {error.validator_value}); set a value within it"
    if error.validator == "type":
        return f"{where}: {error.instance!r} has the wrong type, expected {error.validator_value}"
    return f"{where}: {error.message}"


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Return the config with defaults filled; raise ConfigError listing every problem found."""
    import jsonschema

    schema = schema or load_schema()
    config = copy.deepcopy(config) if config else {}
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_explain(e, schema) for e in errors))
    _fill_defaults(schema, config)
    problems = semantic_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def semantic_problems(cfg: dict) -> list[str]:
    """Rules across keys, checked before any job runs."""
    out = []
    k, train, merge = cfg["runs"], cfg["train"], cfg["merge"]
    if k < 2:
        out.append(f"runs: {k} — merging needs at least 2 runs; set runs >= 2")
    for name, task in cfg["tasks"].items():
        if task["n_train"] < train["batch_size"]:
            out.append(f"tasks.{name}.n_train: {task['n_train']} is smaller than train.batch_size "
                       f"{train['batch_size']}; lower the batch size or add samples")
        if task["source"] == "hf" and not task.get("path"):
            out.append(f"tasks.{name}.path: required for source 'hf' (a dataset id, or 'json' with data_files)")
        pool = task.get("pool_size")
        need = task["n_train"] + task["n_val"] + task["n_test"]
        if pool is not None and pool < need:
            out.append(f"tasks.{name}.pool_size: {pool} < n_train + n_val + n_test = {need}; raise pool_size")
    micro = train.get("micro_batch_size")
    if micro and train["batch_size"] % micro:
        out.append(f"train.micro_batch_size: {micro} does not divide train.batch_size {train['batch_size']}")
    if merge["epoch"] is not None and merge["epoch"] > train["epochs"]:
        out.append(f"merge.epoch: {merge['epoch']} > train.epochs {train['epochs']}; use an epoch that is trained")
    if cfg["analysis"]["anchor_run"] >= k:
        out.append(f"analysis.anchor_run: {cfg['analysis']['anchor_run']} but runs are 0..{k - 1}")
    for name, model in cfg["models"].items():
        src = model["source"]
        if src.startswith((".", "/")) and not Path(src).exists():
            out.append(f"models.{name}.source: local path {src} does not exist; fix the path or use a hub id")
    return out


def load_config(path: str | Path) -> dict:
    with open(path) as fh:
        return validate_config(yaml.safe_load(fh) or {})
