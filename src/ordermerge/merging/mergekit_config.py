"""``ordermerge merge --config merge.yml``: a mergekit YAML config, translated into an ordermerge merge.

mergekit users already have their merges as YAML (``merge_method``, ``base_model``, ``models: [{model,
parameters: {weight, density}}]``, ``parameters``, ``dtype``, ...). This module reads that schema and says
which ordermerge merge (registry method, parameters, weights, inputs) means the same thing, or refuses the
key it cannot honour, naming it and the fix. Nothing is dropped silently: where the result is the same
merge but not the same bytes as mergekit's (TIES's tie-breaking, DARE's random stream), the difference is
printed and recorded in ``merge.json``; docs/mergekit.md has the table.

- A name both tools have (``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``model_stock``, and
  ``slerp`` when the registry has it) means mergekit's method, with mergekit's defaults (TIES keeps every
  element unless ``density`` is given). :data:`MERGEKIT` is the table; a row names the registry method.
- Any other registry key (``average``, ``select``, ``resampleN``, ``dare``, ...) is ordermerge's own method,
  with the registry's parameter names under ``parameters`` and per-model ``weight``.
- Paths are relative to the YAML file's directory (mergekit: to the working directory), or absolute.

No torch here (the check of the inputs' dtypes imports the checkpoint reader when it runs).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ordermerge.merging import registry

DOCS = "docs/mergekit.md"


class ConfigError(ValueError):
    """A config key ordermerge cannot honour; the message names the key and the fix."""


@dataclass(frozen=True)
class Mergekit:
    """How one mergekit method maps onto a registry method.

    ``normalize``: mergekit's default for its ``normalize`` parameter (None: the method has none).
    ``unnormalized``: what ``normalize: false`` becomes here: ``"scale"`` (Σ w_i τ_i = Σw · Σ p_i τ_i, so
    the registry's ``scale`` takes λ·Σw), ``"unit_sum"`` (the same merge only when the weights sum to 1),
    or None (refused: TIES divides by the agreeing inputs' weights, which no parameter undoes). ``lambda``
    (λ) is taken where the registry method has ``scale``. ``density``: the registry parameter mergekit's
    per-model ``density`` becomes (``drop_rate`` is 1 − density). ``weights``: the per-model ``weight`` is
    required (as in mergekit) or refused (the method takes none). ``shared``: further mergekit parameters,
    one value for all inputs, by the registry's name. ``fixed``: mergekit parameters accepted at one value
    only (the one ordermerge's method implements). ``inert``: parameters that change nothing in the result
    (``int8_mask``: the dtype of mergekit's sign mask). ``task_vectors``: the base is no input of its own
    (mergekit skips it under ``models``) and mergekit does the arithmetic in ``dtype`` (ordermerge: float32).
    """

    method: str
    normalize: bool | None = None
    unnormalized: str | None = None
    density: str | None = None
    weights: bool = True
    base_required: bool = True
    shared: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    inert: tuple[str, ...] = ()
    task_vectors: bool = True
    differences: tuple[str, ...] = ()

    def keys(self) -> set[str]:
        """The mergekit parameter names this row reads."""
        scaled = self.normalize is not None and "scale" in registry.get(self.method).params
        return (
            ({"weight"} if self.weights else set())
            | ({"normalize"} if self.normalize is not None else set())
            | ({"lambda"} if scaled else set())
            | ({"density"} if self.density else set())
            | set(self.shared)
            | set(self.fixed)
            | set(self.inert)
        )


TIES_DIFFERENCE = (
    "trimming keeps ceil(density·n) elements per tensor plus every element tied with the k-th "
    "largest |τ| (mergekit: exactly max(1, floor(density·n)), ties broken by argsort order); "
    "where Σ w_i τ̂_i is exactly 0, ordermerge takes no input, mergekit elects +"
)
DARE_DIFFERENCE = (
    "random: ordermerge draws its keep mask from its own stream (--seed) and rescales the kept "
    "elements by 1/density (Yu et al.); mergekit draws torch.bernoulli (unseeded) and, with "
    "rescale: true, scales each tensor by its L1 norm before/after the drop (1/density on large "
    "tensors, larger and noisier on small ones such as norms): nearly the same distribution, "
    "never the same bytes"
)
STOCK_DIFFERENCE = (
    "a tensor whose task vectors have a negative mean cosine: ordermerge keeps the base (t = 0), "
    "mergekit extrapolates with t = K·cos / (1 + (K−1)·cos)"
)

# mergekit method -> ordermerge. Only rows whose registry method exists are offered (slerp: when added).
GTA = ("int8_mask",)  # mergekit's task-arithmetic family (GeneralizedTaskArithmeticMerge) takes these too
MERGEKIT: dict[str, Mergekit] = {
    "linear": Mergekit("average", normalize=True, unnormalized="unit_sum", base_required=False, task_vectors=False),
    "task_arithmetic": Mergekit(
        "task_arithmetic", normalize=False, unnormalized="scale", fixed={"rescale": False}, inert=GTA
    ),
    "ties": Mergekit(
        "ties", normalize=True, density="density", fixed={"rescale": False}, inert=GTA, differences=(TIES_DIFFERENCE,)
    ),
    "dare_linear": Mergekit(
        "dare",
        normalize=False,
        unnormalized="scale",
        density="drop_rate",
        fixed={"rescale": True},
        inert=GTA,
        differences=(DARE_DIFFERENCE,),
    ),
    "model_stock": Mergekit(
        "model_stock", weights=False, fixed={"filter_wise": False}, differences=(STOCK_DIFFERENCE,)
    ),
    "slerp": Mergekit("slerp", weights=False, shared={"t": "t"}, task_vectors=False),
}

# mergekit methods ordermerge has no equivalent for, and why (the refusal's text).
REFUSED_METHODS = {
    "dare_ties": "DARE's random drop followed by TIES's sign election; ordermerge has dare and ties, not the two "
    "combined: use merge_method: dare_linear or ties",
    "breadcrumbs": "drops the largest outliers as well as the smallest; ordermerge's ties trims the smallest only",
    "breadcrumbs_ties": "drops the largest outliers as well as the smallest; ordermerge's ties trims the smallest only",
    "della": "magnitude-ranked random drop; ordermerge's dare drops uniformly: use dare_linear",
    "della_linear": "magnitude-ranked random drop; ordermerge's dare drops uniformly: use dare_linear",
    "passthrough": "copies layers (used with slices); ordermerge merges whole models only",
}

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
REFUSED_TOP = {
    "slices": "layer ranges of different models stacked or merged per slice; ordermerge merges whole models of one "
    "base: list them under models:",
    "modules": "per-module merges; ordermerge merges whole models: list them under models:",
    "tokenizer_source": "a merged vocabulary; ordermerge copies the base's tokenizer and config and needs every "
    "input in the base's shapes: drop tokenizer_source",
    "tokenizer": "a merged vocabulary; ordermerge copies the base's tokenizer: drop tokenizer",
    "chat_template": "ordermerge copies the base's tokenizer files, chat template included: drop chat_template "
    "(edit tokenizer_config.json of the output afterwards)",
}
DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass
class Plan:
    """The ordermerge merge a config means: what ``merge_models`` takes, and what differs from mergekit."""

    path: Path
    sha256: str
    config: dict
    source: str  # "mergekit ties" or "ordermerge select"
    base: Path
    models: list[Path]
    method: str
    resample: int = 0
    weights: list[float] | None = None
    params: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    differences: list[str] = field(default_factory=list)

    def flags(self) -> list[str]:
        """The same merge as ``ordermerge merge`` flags (byte-identical output: tests/test_mergekit_config.py)."""
        out = ["--base", str(self.base), "--method", self.method]
        if self.resample:
            out += ["--resample", str(self.resample)]
        if self.weights is not None:
            out += ["--weights", ",".join(repr(float(w)) for w in self.weights)]
        for name, value in self.params.items():
            out += [registry.PARAMETERS[name].flag, repr(value)]
        return out + [str(m) for m in self.models]

    def record(self) -> dict:
        """What merge.json says about the config."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "parsed": self.config,
            "read_as": self.source,
            "equivalent_flags": self.flags(),
            "differences_from_mergekit": self.differences,
        }


def resolve(path: str | Path) -> Plan:
    """:func:`load`, then :func:`check_dtypes` against the base's stored dtypes: the plan ``merge --config`` runs."""
    plan = load(path)
    check_dtypes(plan)
    return plan


def load(path: str | Path) -> Plan:
    """Read ``path`` (YAML, safe_load only) and translate it; refuses what ordermerge cannot honour."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    raw = path.read_bytes()
    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping with merge_method, models, ...; got {type(config).__name__}"
        )
    plan = translate(config, path.resolve().parent)
    plan.path, plan.sha256 = path, hashlib.sha256(raw).hexdigest()
    return plan


def translate(config: dict, root: Path) -> Plan:
    """The merge ``config`` (a parsed mergekit YAML) means; relative paths are taken from ``root``."""
    for key in config:
        if key in REFUSED_TOP:
            raise ConfigError(f"{key}: {REFUSED_TOP[key]} ({DOCS})")
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: not a key ordermerge reads (it reads {', '.join(TOP_KEYS)}); drop it ({DOCS})")
    name = config.get("merge_method")
    if not isinstance(name, str):
        raise ConfigError(
            "merge_method: missing; give a mergekit method "
            f"({', '.join(offered())}) or an ordermerge one ({registry.describe_keys()})"
        )
    if name in REFUSED_METHODS or name in MERGEKIT and name not in offered():
        why = REFUSED_METHODS.get(name) or f"ordermerge has no {MERGEKIT[name].method} method (yet)"
        raise ConfigError(f"merge_method: {name}: {why} ({DOCS})")
    entries = _models(config.get("models"), root)
    shared = config.get("parameters") or {}
    if not isinstance(shared, dict):
        raise ConfigError("parameters: expected a mapping of parameter names to values")
    base = _path(config["base_model"], "base_model", root) if config.get("base_model") is not None else None
    if name in offered():
        plan = _from_mergekit(name, MERGEKIT[name], base, entries, shared)
    else:
        plan = _from_ordermerge(name, base, entries, shared)
    plan.config = config
    plan.dtype, plan.out_dtype = (_dtype(config, k) for k in ("dtype", "out_dtype"))
    return plan


def offered() -> list[str]:
    """The mergekit methods this ordermerge runs: rows of :data:`MERGEKIT` whose registry method exists."""
    return [name for name, row in MERGEKIT.items() if row.method in registry.METHODS]


# The two readings ---------------------------------------------------------------------------------------


def _from_mergekit(name: str, row: Mergekit, base: Path | None, entries: list, shared: dict) -> Plan:
    method = registry.get(row.method)
    differences = list(row.differences)
    known = row.keys()
    _known_keys(shared, known, "parameters", name)
    if base is None and row.base_required:
        raise ConfigError(f"base_model: mergekit's {name} needs one (the fine-tunes' common base); add base_model: DIR")
    if base is None:
        differences.append(
            "no base_model: config.json and the tokenizer are copied from models[0] (mergekit: from "
            "the first of its unordered set of models)"
        )
    if row.task_vectors:
        entries = _drop_base(entries, base, name, differences)
    elif base is not None and base.resolve() not in [p.resolve() for _, p, _ in entries]:
        raise ConfigError(
            f"base_model: mergekit's {name} merges a base that is not under models as one more input "
            "(with the top-level parameters); list it under models: (with its weight), or drop "
            "base_model"
        )
    for i, _, params in entries:
        _known_keys(params, {"weight", "density"} & known, f"models[{i}].parameters", name)
    if name == "slerp" and base is not None:
        # mergekit's slerp goes from base_model (t = 0) to the other model (t = 1); ordermerge's from its
        # first input to its second: the base first, whatever the order under models
        entries = sorted(entries, key=lambda e: e[1].resolve() != base.resolve())
    paths = [p for _, p, _ in entries]
    weights = _weights(entries, shared, required=row.weights, method=name)
    if not row.weights and weights is not None:
        raise ConfigError(f"weight: mergekit's {name} takes no weights (it averages the inputs uniformly); drop weight")
    scale = _scale(name, row, shared, weights) if row.normalize is not None else None  # checks normalize
    params = {"scale": scale} if "lambda" in known else {}  # average has no scale (and mergekit's linear no lambda)
    for key, only in row.fixed.items():
        if _flag(shared, key, only) != only:
            raise ConfigError(
                f"parameters.{key}: {str(not only).lower()}: ordermerge's {row.method} is mergekit's "
                f"{name} with {key}: {str(only).lower()} only; use that (the default) ({DOCS})"
            )
    for key in row.inert:
        _flag(shared, key, False)  # checked, and recorded in merge.json with the config; no effect on the result
    if row.density is not None:
        density = _density(entries, shared, name)
        params[row.density] = density if row.density == "density" else 1.0 - density
    for key, target in row.shared.items():
        if target not in method.params:
            raise ConfigError(f"parameters.{key}: ordermerge's {row.method} has no parameter {target}")
        if key in shared:
            params[target] = _number(shared, key, None)
    _check_count(method.name, paths)
    try:
        params = registry.check_params(method.name, params)
    except ValueError as exc:
        raise ConfigError(f"mergekit {name}: {exc}") from None
    return Plan(
        Path(),
        "",
        {},
        f"mergekit {name}",
        base if base is not None else paths[0],
        paths,
        method.name,
        0,
        weights,
        {k: v for k, v in params.items() if k != method.key_param},
        differences=differences,
    )


def _scale(name: str, row: Mergekit, shared: dict, weights: list[float]) -> float:
    """The registry's ``scale`` for mergekit's ``lambda`` and ``normalize``, or a refusal."""
    normalize = _flag(shared, "normalize", row.normalize)
    lam = _number(shared, "lambda", 1.0)
    if lam <= 0:
        raise ConfigError(f"parameters.lambda: {lam}: ordermerge's scale must be > 0")
    total = math.fsum(weights)
    if not normalize and row.unnormalized is None:
        raise ConfigError(
            f"parameters.normalize: false: mergekit's {name} then adds the agreeing weighted task "
            f"vectors without dividing by their weights; ordermerge's {row.method} always divides. "
            "Use normalize: true (the default)"
        )
    if not normalize and row.unnormalized == "unit_sum" and not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-12):
        raise ConfigError(
            f"parameters.normalize: false with weights summing to {total}: ordermerge's {row.method} "
            "always divides by the sum; use normalize: true, or weights that sum to 1"
        )
    return lam * (1.0 if normalize else total)


def _from_ordermerge(name: str, base: Path | None, entries: list, shared: dict) -> Plan:
    try:
        method, fixed = registry.parse_key(name)
    except ValueError as exc:
        raise ConfigError(f"merge_method: {exc}; or a mergekit method: {', '.join(offered())} ({DOCS})") from None
    _known_keys(shared, set(method.params), "parameters", name)
    for i, _, params in entries:
        _known_keys(
            params, {"weight"}, f"models[{i}].parameters", name
        )  # non-uniform weights: the method refuses them before reading
    if base is None:
        raise ConfigError(f"base_model: ordermerge's {name} needs the fine-tunes' base; add base_model: DIR")
    given = {p: _number(shared, p, None) for p in method.params if p in shared}
    for p, value in fixed.items():
        if p in given and given[p] != value:
            raise ConfigError(f"parameters.{p}: {given[p]} contradicts merge_method: {name} ({p} = {value}); drop one")
    given |= fixed
    try:
        params = registry.check_params(method.name, given)
    except ValueError as exc:
        raise ConfigError(f"parameters: {exc}") from None
    paths = [p for _, p, _ in entries]
    _check_count(method.name, paths)
    keyed = method.key_param
    return Plan(
        Path(),
        "",
        {},
        f"ordermerge {registry.method_key(method.name, params)}",
        base,
        paths,
        method.name,
        int(params.get(keyed, 0)) if keyed == "resample" else 0,
        _weights(entries, shared, required=False, method=name),
        {k: v for k, v in params.items() if k != keyed},
    )


# Pieces -------------------------------------------------------------------------------------------------


def _models(value, root: Path) -> list[tuple[int, Path, dict]]:
    """(index under models, directory, parameters) of each entry."""
    if not isinstance(value, list) or not value:
        raise ConfigError("models: missing or empty; list the fine-tunes as models: [{model: DIR, parameters: ...}]")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"models[{i}]: expected {{model: DIR, parameters: {{...}}}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            fix = "layer ranges need slices, which ordermerge refuses" if extra[0] == "layer_range" else "drop it"
            raise ConfigError(f"models[{i}].{extra[0]}: not a key of a models entry (model, parameters); {fix}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"models[{i}].parameters: expected a mapping, got {params!r}")
        out.append((i, _path(entry["model"], f"models[{i}].model", root), params))
    return out


def _path(value, where: str, root: Path) -> Path:
    """A local model directory: absolute, or relative to the YAML's directory. No hub ids, revisions or LoRAs."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r}: give the model as a directory path (a string)")
    if "+" in value:
        raise ConfigError(
            f"{where}: {value}: model+lora (mergekit applies the LoRA first); ordermerge merges full "
            "checkpoints: merge the adapter into its model first (peft merge_and_unload, "
            "save_pretrained) and give that directory"
        )
    if "@" in value:
        raise ConfigError(
            f"{where}: {value}: a hub revision; ordermerge reads local directories only: download "
            "that revision and give its directory"
        )
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise ConfigError(
            f"{where}: {value}: no such directory ({path}); paths are relative to the config file's "
            "directory. ordermerge never downloads: for a hub id, download it first "
            f"(huggingface-cli download {value} --local-dir DIR) and give DIR"
        )
    return path


def _drop_base(entries: list, base: Path, name: str, differences: list) -> list:
    """mergekit skips the base in a task-vector merge (its task vector is zero); so does ordermerge."""
    kept = []
    for i, path, params in entries:
        if path.resolve() == base.resolve():
            if params:
                raise ConfigError(
                    f"models[{i}].parameters: base_model {path} is listed with parameters, which "
                    f"mergekit's {name} ignores for the base; drop them (or the entry)"
                )
            differences.append(f"models[{i}] is base_model: left out of the merge, as mergekit does")
            continue
        kept.append((i, path, params))
    return kept


def _check_count(method: str, paths: list[Path]) -> None:
    if len(paths) < 2:
        raise ConfigError(f"models: {len(paths)} model(s) besides the base; {method} needs at least 2")


def _scalar(value, where: str, kind: type):
    """One value for every tensor: refuses mergekit's per-layer gradients ([0, 0.5, 1]) and filters."""
    if isinstance(value, (list, dict)):
        raise ConfigError(
            f"{where}: {value!r}: per-layer gradients and filtered values vary the parameter across "
            "tensors; ordermerge applies one value to every tensor: give a single value"
        )
    ok = (
        isinstance(value, bool)
        if kind is bool
        else (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    )
    if not ok:
        raise ConfigError(f"{where}: {value!r}: expected {'true or false' if kind is bool else 'a finite number'}")
    return value if kind is bool else float(value)


def _number(params: dict, key: str, default):
    return default if key not in params else _scalar(params[key], f"parameters.{key}", float)


def _flag(params: dict, key: str, default: bool) -> bool:
    return default if key not in params else _scalar(params[key], f"parameters.{key}", bool)


def _known_keys(params: dict, known: set, where: str, method: str) -> None:
    for key in params:
        if key not in known:
            takes = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"{where}.{key}: {method} (as ordermerge reads it) takes no {key} here "
                f"(it takes: {takes}); drop it ({DOCS})"
            )


def _per_model(entries: list, shared: dict, key: str) -> list:
    """Each model's value of ``key``: its own, else ``parameters``' (mergekit's precedence), else None."""
    out = []
    for i, _, params in entries:
        if key in params:
            out.append(_scalar(params[key], f"models[{i}].parameters.{key}", float))
        elif key in shared:
            out.append(_scalar(shared[key], f"parameters.{key}", float))
        else:
            out.append(None)
    return out


def _weights(entries: list, shared: dict, required: bool, method: str) -> list[float] | None:
    weights = _per_model(entries, shared, "weight")
    if all(w is None for w in weights):
        if required:
            raise ConfigError(
                f"weight: mergekit's {method} requires a weight for every model; add "
                "parameters: {weight: 1.0} to each (or once under the top-level parameters)"
            )
        return None
    missing = [i for (i, _, _), w in zip(entries, weights) if w is None]
    if missing:
        raise ConfigError(
            f"models[{missing[0]}].parameters.weight: missing while other models have one; give every "
            "model a weight (or one under the top-level parameters)"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"weight: {weights}: ordermerge takes non-negative weights with a positive sum "
            "(no negative task vectors); change the weights"
        )
    return weights


def _density(entries: list, shared: dict, method: str) -> float:
    values = _per_model(entries, shared, "density")
    values = [1.0 if d is None else d for d in values]  # mergekit's default: keep everything
    if len(set(values)) > 1:
        raise ConfigError(
            f"density: {values}: one density per model; ordermerge's {MERGEKIT[method].method} takes "
            "one density for all inputs: give them all the same value"
        )
    if not 0 < values[0] <= 1:
        raise ConfigError(f"density: {values[0]}: must be in (0, 1]")
    return values[0]


def _dtype(config: dict, key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    name = value[len("torch.") :] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise ConfigError(f"{key}: {value!r}: expected one of {', '.join(DTYPES)}")
    return name


def check_dtypes(plan: Plan) -> None:
    """ordermerge computes in float32 and writes each tensor in the inputs' stored dtype, so the output dtype
    mergekit would write (``out_dtype``, else ``dtype``, else the inputs') must be that dtype, and ``dtype``
    (mergekit's arithmetic) float32 or that dtype."""
    from ordermerge.storage.checkpoint import LazyCheckpoint

    base = LazyCheckpoint(plan.base)
    stored = sorted(
        {
            str(base.info(n).torch_dtype).removeprefix("torch.")
            for n in base.keys()
            if base.info(n).torch_dtype.is_floating_point
        }
    )
    out = plan.out_dtype or plan.dtype
    if out is not None and stored != [out]:
        raise ConfigError(
            f"{'out_dtype' if plan.out_dtype else 'dtype'}: {out}: ordermerge writes the inputs' own "
            f"dtype ({', '.join(stored)}) and converts nothing; set out_dtype: {stored[0]} "
            "(or drop dtype and out_dtype)"
            if len(stored) == 1
            else "drop dtype and out_dtype"
        )
    if plan.dtype is not None and plan.dtype != "float32" and [plan.dtype] != stored:
        raise ConfigError(
            f"dtype: {plan.dtype}: mergekit would cast the {', '.join(stored)} inputs to {plan.dtype} "
            "before merging; ordermerge computes in float32 from the stored values: use dtype: float32"
        )
    row = MERGEKIT.get(plan.source.removeprefix("mergekit ")) if plan.source.startswith("mergekit ") else None
    arithmetic = plan.dtype or (stored[0] if len(stored) == 1 else None)
    if row is not None and row.task_vectors and arithmetic not in (None, "float32"):
        plan.differences.append(
            f"mergekit does this method's arithmetic in {arithmetic} (dtype); ordermerge in "
            f"float32, rounded once to {arithmetic}: dtype: float32 makes mergekit do the same"
        )
