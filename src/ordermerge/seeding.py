"""Seeds derived from named tuples, never from global state.

Every random draw in ordermerge comes from a generator seeded by (global seed, purpose, ...), so
results do not depend on job order, tensor order, sharding or parallelism.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of printable parts; stable across processes and platforms."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def numpy_rng(*parts: object) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derive_seed(*parts)))
