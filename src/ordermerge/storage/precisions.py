"""Storage precisions: the ONE place that says which stored forms of a fine-tune exist and how each is made.

No torch here: the Snakefile, the config validation and the CLI read this module. A fine-tune is trained
once, with fp32 master weights, and saved in ``train.save_dtype``. Every precision named in the config's
``precisions`` list is a stored form of those same checkpoints: the saved one itself, or its rounding to a
narrower dtype (``ordermerge round``, :mod:`ordermerge.storage.rounding`). Merges, evaluations, per-sample
losses, figures and tables are made once per precision, so one training answers the question in each.

Why this matters: bf16 storage rounds most small fine-tuning updates back to the base's value (81 % of the
task-vector elements of the default's runs are exactly zero in bf16, 0.14 % in fp32), and resampling
(``resampleN``) acts on exactly those zeros. A merge's effect measured in bf16 mixes merging with rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes per element of the dtypes checkpoints are saved in (config train.save_dtype, models.<m>.dtype).
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """A stored form of a checkpoint: ``dtype`` reached from the saved checkpoint by ``rounding``."""

    name: str  # used in paths, configs and tables
    dtype: str  # torch dtype name
    rounding: str  # nearest (IEEE round-to-nearest-even, what .to(dtype) does) | stochastic
    help: str

    @property
    def random(self) -> bool:
        """Whether the stored values are a seeded random draw (stochastic rounding)."""
        return self.rounding == "stochastic"


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", "float32", "nearest", "the fp32 checkpoint as trained: nothing lost to rounding"),
        Precision(
            "bf16",
            "bfloat16",
            "nearest",
            "each fp32 checkpoint rounded to nearest bf16 (what save_dtype: "
            "bfloat16 stores): small updates round back to the base",
        ),
        Precision("fp16", "float16", "nearest", "each fp32 checkpoint rounded to nearest fp16"),
        Precision(
            "bf16sr",
            "bfloat16",
            "stochastic",
            "each fp32 checkpoint rounded to bf16 stochastically (seeded "
            "per run and tensor): an update below half a bf16 step survives with probability |update| / step, "
            "so the stored task vector is unbiased",
        ),
    )
}


def get(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}") from None


def is_saved_form(name: str, save_dtype: str) -> bool:
    """Whether precision ``name`` is the checkpoint as ``train.save_dtype`` stores it (no rounding job)."""
    p = get(name)
    return p.rounding == "nearest" and p.dtype == save_dtype


def reachable(name: str, save_dtype: str) -> bool:
    """Whether precision ``name`` can be made from checkpoints saved in ``save_dtype``: the saved form
    itself, or a rounding of fp32 checkpoints to a narrower dtype (a narrow checkpoint cannot be widened
    back to what was trained)."""
    return is_saved_form(name, save_dtype) or (save_dtype == "float32" and ITEMSIZE[get(name).dtype] < 4)


def schema_fragment() -> dict:
    """The config schema's item for ``precisions`` (ordermerge.config.load_schema injects it)."""
    return {"enum": list(PRECISIONS), "description": "; ".join(f"{p.name}: {p.help}" for p in PRECISIONS.values())}
