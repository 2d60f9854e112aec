"""Guards that run before a command writes anything: no command may overwrite what it reads.

``ordermerge merge --force --out run0 run0 run1`` used to replace the trained checkpoint ``run0``
by the merge. Every writing command now names its inputs and outputs (see ``cli.py``), and
:func:`refuse_overlap` stops it, before any byte is written, when an output is, contains, or lies
inside one of its inputs — after resolving symlinks and ``..``, so ``./a/../run0`` or a link to
``run0`` are caught too. :func:`refuse_duplicates` stops a merge given the same model twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


class OverlapError(ValueError):
    """An output would overwrite, contain or sit inside an input; nothing was written."""


def resolved(path: str | os.PathLike) -> Path:
    """Absolute, symlinks and ``..`` resolved (also for paths that do not exist yet)."""
    return Path(path).expanduser().resolve(strict=False)


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def _flatten(named: Mapping[str, object]) -> list[tuple[str, str]]:
    out = []
    for label, value in named.items():
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        out += [(label, str(v)) for v in values if v not in (None, "")]
    return out


def refuse_overlap(command: str, outputs: Mapping[str, object], inputs: Mapping[str, object]) -> None:
    """Raise :class:`OverlapError` naming both paths and the fix if any output overlaps any input.

    ``outputs`` and ``inputs`` map a label (the flag, e.g. ``--out``) to a path or a list of paths.
    """
    problems = []
    for out_label, out in _flatten(outputs):
        for in_label, inp in _flatten(inputs):
            relation = _relation(resolved(out), resolved(inp))
            if relation:
                problems.append(f"the output {out_label} {out} {relation} the input {in_label} {inp}")
    if problems:
        raise OverlapError(
            f"{command}: refusing to write: " + "; ".join(problems) + ". Nothing was written "
            "and no input was touched; choose an output path outside every input "
            "(--force never allows replacing an input)."
        )


def refuse_duplicates(label: str, paths: Iterable[str | os.PathLike], digests: Iterable[str] | None = None) -> None:
    """Refuse the same input given twice: the same resolved path, or (with ``digests``) the same content."""
    paths = [str(p) for p in paths]
    groups: dict[object, list[str]] = {}
    for p in paths:
        groups.setdefault(resolved(p), []).append(p)
    same = [g for g in groups.values() if len(g) > 1]
    what = "the same directory"
    if not same and digests is not None:
        groups = {}
        for p, d in zip(paths, digests):
            groups.setdefault(d, []).append(p)
        same = [g for g in groups.values() if len(g) > 1]
        what = "identical weights (same sha256)"
    if same:
        listed = "; ".join(" = ".join(g) for g in same)
        raise OverlapError(
            f"{label}: {listed} are {what}. Merging K copies of one run is a mistake, not a "
            "merge: pass each fine-tune once (check the run numbers in the paths)."
        )
