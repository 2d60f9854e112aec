"""The merge methods: the ONE place that says what a method is called, what it takes and what it needs.

No torch here: the Snakefile, the config validation and the CLI's argument parser read this module,
and every Snakemake job re-parses the workflow. The implementation of method ``name`` is the module
``ordermerge.merging.methods.<name>`` (imported by the engine only when that method runs).

Everything else is derived from :data:`METHODS` and :data:`PARAMETERS`:
- the keys used in paths, configs and tables (``method_keys``, ``key_pattern``; ``select`` with
  ``resample = N`` is spelled ``resampleN``);
- the CLI's ``--method`` choices and parameter flags, their defaults and bounds (``check_params``);
- the config schema's enum and parameter keys (``schema_fragment``);
- which merges are built once and which once per merge seed (``merge_variants``);
- the command-line flags a workflow rule passes for a key (``cli_flags``);
- which need held-out data (``needs_data``), and how many inputs a method merges (``check_models``).

Adding a method: one file in ``methods/`` and one line in :data:`METHODS` (docs/adding-a-merge-method.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """A method parameter: ``--<name>`` on the CLI (underscores as dashes), ``merge.<name>`` in a config."""

    name: str
    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def bounds(self) -> str:
        """``in (0, 1]``, or ``> 0`` / ``>= 0`` for a half-line."""
        if self.high == math.inf and self.low != -math.inf:
            return (">" if self.low_open else ">=") + " " + _num(self.low)
        lo = ("(" if self.low_open else "[") + ("-inf" if self.low == -math.inf else _num(self.low))
        hi = ("inf" if self.high == math.inf else _num(self.high)) + (")" if self.high_open else "]")
        return f"in {lo}, {hi}"

    def check(self, value) -> float | int:
        """The value as this parameter's type, or a ValueError naming the flag and its bounds."""
        if self.integer and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError(f"{self.flag} must be an integer {self.bounds()}, got {value}")
        v = int(value) if self.integer else float(value)
        below = v <= self.low if self.low_open else v < self.low
        above = v >= self.high if self.high_open else v > self.high
        if below or above or v != v:
            raise ValueError(f"{self.flag} must be {self.bounds()}, got {value}")
        return v

    def schema(self) -> dict:
        out: dict = {"type": "integer" if self.integer else "number", "default": self.default, "description": self.help}
        if self.low != -math.inf:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high != math.inf:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Every parameter any method takes. Weights are normalised to sum 1, so scale = K adds the task vectors.
PARAMETERS = {
    p.name: p
    for p in (
        Param(
            "resample",
            0,
            0,
            8,
            integer=True,
            help="redraw exact-zero task-vector elements from all K up to N times (the key resampleN)",
        ),
        Param(
            "scale",
            1.0,
            0,
            math.inf,
            low_open=True,
            high_open=True,
            help="λ on the merged task vector (weights sum to 1, so 1.0 is the mean task vector)",
        ),
        Param(
            "density",
            0.2,
            0,
            1,
            low_open=True,
            help="fraction of each task vector's largest magnitudes kept, per tensor (TIES keeps 20 %)",
        ),
        Param(
            "drop_rate",
            0.9,
            0,
            1,
            high_open=True,
            help="probability of dropping each task-vector element, the rest rescaled by 1/(1-p) (DARE drops 90 %)",
        ),
        Param(
            "t", 0.5, 0, 1, help="interpolation from the first model (0) to the second (1), along the arc between them"
        ),
        Param(
            "max_iter", 10, 1, 1000, integer=True, help="iterations of the Karcher mean at most (mergekit's default 10)"
        ),
        Param(
            "tol",
            1e-5,
            0,
            1,
            low_open=True,
            help="Karcher mean: stop when the tangent step is shorter; angles and norms below it count as 0",
        ),
    )
}


@dataclass(frozen=True)
class Method:
    """One merge method. ``seeded``: it draws random numbers, so each merge seed gives another merge.
    ``needs_base``: it reads the base's values (task vectors). ``needs_data``: it scores candidate
    merges on held-out data (the ``heldout`` split,
    ``<data dir>/heldout.jsonl``, which Table 1 never scores). ``max_models``: it merges at most this
    many inputs (slerp: 2); every method merges at least 2."""

    name: str
    summary: str
    citation: str
    params: tuple[str, ...] = ()
    seeded: bool = False
    needs_base: bool = True
    needs_data: bool = False
    max_models: int | None = None
    key_param: str | None = None  # select: the key resampleN means resample = N
    key_prefix: str | None = None


PAPER = "Ju et al., arXiv 2410.03743"
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("average", "θ = Σ w_i θ_i in fp32, stored in the inputs' dtype", f"{PAPER} (Eq. 1)", needs_base=False),
        Method(
            "select",
            "each element taken whole from one sub-model drawn with p_i = w_i; resampleN redraws "
            "exact-zero task-vector elements",
            f"{PAPER} (parameter selection, Eq. 2; resampling, Eq. 3)",
            params=("resample",),
            seeded=True,
            key_param="resample",
            key_prefix="resample",
        ),
        Method(
            "task_arithmetic", "θ_base + λ Σ w_i τ_i", "Ilharco et al., ICLR 2023 (task arithmetic)", params=("scale",)
        ),
        Method(
            "ties",
            "trim each τ_i to its top-density magnitudes per tensor, elect signs, mean of the agreeing",
            "Yadav et al., NeurIPS 2023 (TIES-merging)",
            params=("density", "scale"),
        ),
        Method(
            "dare",
            "drop τ elements with probability p, rescale by 1/(1-p), add",
            "Yu et al., ICML 2024 (DARE)",
            params=("drop_rate", "scale"),
            seeded=True,
        ),
        Method(
            "model_stock",
            "interpolate the average toward the base by the task vectors' angle, per tensor",
            "Jang et al., ECCV 2024 (Model Stock)",
        ),
        Method(
            "tsv",
            "per 2-D tensor: top 1/K singular triplets of each τ_i, decorrelated (Procrustes), summed; "
            "1-D: task arithmetic",
            "Gargiulo et al., CVPR 2025 (TSV-Merge)",
            params=("scale",),
        ),
        Method(
            "greedy_soup",
            "rank the K by held-out loss; add each to the uniform soup only if its held-out loss does not rise",
            "Wortsman et al., ICML 2022 (Model soups, greedy soup)",
            needs_base=False,
            needs_data=True,
        ),
        Method(
            "slerp",
            "per tensor: the arc between the 2 models' weights at t (lerp where their cosine exceeds 0.9995)",
            "Shoemake, SIGGRAPH 1985; mergekit's slerp (Goddard et al., EMNLP 2024)",
            params=("t",),
            needs_base=False,
            max_models=2,
        ),
        Method(
            "karcher",
            "per tensor: the weighted Karcher mean of the K weight directions on the sphere, times the mean norm",
            "Karcher, CPAM 1977; mergekit's karcher (Goddard et al., EMNLP 2024)",
            params=("max_iter", "tol"),
            needs_base=False,
        ),
    )
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def _keyed(m: Method) -> Param | None:
    return PARAMETERS[m.key_param] if m.key_param else None


def method_keys() -> list[str]:
    """Every key a config or path may use, e.g. average, select, resample1 ... resample8, ties."""
    keys = []
    for m in METHODS.values():
        keys.append(m.name)
        p = _keyed(m)
        if p is not None:
            keys += [f"{m.key_prefix}{n}" for n in range(int(p.low) + 1, int(p.high) + 1)]
    return keys


def key_pattern() -> str:
    """A regex (no anchors) matching exactly :func:`method_keys` (Snakemake's wildcard constraint)."""
    parts = []
    for m in METHODS.values():
        parts.append(re.escape(m.name))
        p = _keyed(m)
        if p is not None:
            lo, hi = int(p.low) + 1, int(p.high)
            parts.append(
                f"{re.escape(m.key_prefix)}[{lo}-{hi}]"
                if hi <= 9
                else "|".join(f"{m.key_prefix}{n}" for n in range(lo, hi + 1))
            )
    return "|".join(parts)


def parse_key(key: str) -> tuple[Method, dict]:
    """(method, the parameters the key fixes): ``resample2`` -> (select, {"resample": 2})."""
    if key in METHODS:
        return METHODS[key], {}
    for m in METHODS.values():
        if m.key_prefix and key.startswith(m.key_prefix) and key[len(m.key_prefix) :].isdigit():
            p = _keyed(m)
            n = int(key[len(m.key_prefix) :])
            if p.low < n <= p.high:
                return m, {p.name: n}
            raise ValueError(
                f"merge method {key!r}: {p.name} must be {int(p.low) + 1}..{int(p.high)}; "
                f"use {m.key_prefix}1 ... {m.key_prefix}{int(p.high)}, or {m.name}"
            )
    raise ValueError(f"unknown merge method {key!r}; use {describe_keys()}")


def method_key(name: str, params: dict | None = None) -> str:
    """The key of a method run with ``params``: select with resample 2 is resample2."""
    m = get(name)
    p = _keyed(m)
    if p is not None and (params or {}).get(p.name):
        return f"{m.key_prefix}{int(params[p.name])}"
    return m.name


def describe_keys() -> str:
    """The keys in words, for error messages."""
    out = []
    for m in METHODS.values():
        out.append(m.name)
        p = _keyed(m)
        if p is not None:
            out.append(f"{m.key_prefix}N (N = {int(p.low) + 1}..{int(p.high)})")
    return ", ".join(out)


def check_params(name: str, given: dict) -> dict:
    """The method's parameters with defaults filled in; refuses ones it does not take, or out of bounds.

    ``given`` maps parameter names to values or None (not given).
    """
    m = get(name)
    for pname, value in given.items():
        if value is not None and pname not in m.params:
            users = ", ".join(x.name for x in METHODS.values() if pname in x.params) or "no method"
            raise ValueError(f"{PARAMETERS[pname].flag} applies to {users} only, not {name}; drop it")
    return {p: PARAMETERS[p].check(PARAMETERS[p].default if given.get(p) is None else given[p]) for p in m.params}


def check_models(name: str, k: int) -> None:
    """Refuses ``k`` inputs for method ``name`` when it merges fewer (slerp: exactly 2)."""
    m = get(name)
    if m.max_models is not None and k > m.max_models:
        raise ValueError(
            f"{name} merges at most {m.max_models} models, got {k}; pass {m.max_models} MODEL_DIRs, "
            f"or use a method that merges any K ({', '.join(any_k_methods())})"
        )


def any_k_methods() -> list[str]:
    return [m.name for m in METHODS.values() if m.max_models is None]


def is_seeded(key: str) -> bool:
    return parse_key(key)[0].seeded


def needs_data(key: str) -> bool:
    return parse_key(key)[0].needs_data


def merge_variants(keys: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(key, seed) pairs to build: a method that draws nothing at random is built for the first seed only."""
    return [(k, s) for k in keys for s in (seeds if is_seeded(k) else seeds[:1])]


def cli_flags(key: str, merge_cfg: dict) -> str:
    """``ordermerge merge`` flags for a key, its parameters taken from the config's ``merge`` section."""
    m, fixed = parse_key(key)
    flags = [f"--method {m.name}"]
    for p in m.params:
        value = fixed.get(p, merge_cfg.get(p, PARAMETERS[p].default))
        if p in fixed or p != m.key_param:
            flags.append(f"{PARAMETERS[p].flag} {value}")
    return " ".join(flags)


def workflow_params() -> list[str]:
    """The parameters a config sets under ``merge:`` (the keyed one comes from the key instead)."""
    keyed = {m.key_param for m in METHODS.values()}
    return [p for p in PARAMETERS if p not in keyed]


def schema_fragment() -> dict:
    """What the config schema says about methods: the key pattern and the ``merge.<param>`` properties."""
    return {"pattern": f"^({key_pattern()})$", "params": {p: PARAMETERS[p].schema() for p in workflow_params()}}


def markdown_table() -> str:
    """The table of methods in docs/methods.md (tests/test_registry.py keeps the page equal to this)."""
    rows = ["| method | what | parameters | per merge seed | needs | source |", "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        name = f"`{m.name}`" + (f", `{m.key_prefix}N`" if m.key_prefix else "")
        params = ", ".join(f"`{PARAMETERS[p].flag}` ({PARAMETERS[p].default})" for p in m.params) or "—"
        needs = (
            ", ".join(
                w
                for w, flag in (
                    ("base", m.needs_base),
                    ("held-out data", m.needs_data),
                    (f"K = {m.max_models}", m.max_models),
                )
                if flag
            )
            or "—"
        )
        what = m.summary.replace("|", "\\|")
        rows.append(
            f"| {name} | {what} | {params} | {'yes' if m.seeded else 'no (built once)'} | {needs} | {m.citation} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
