"""Streaming merge of K fine-tunes of one base, chunk by chunk, in parallel over chunks.

Memory holds K copies of one chunk per worker thread, never K models (nor K whole tensors).

Output is a complete Hugging Face directory (sharded safetensors + index, the base's config and
tokenizer, a model card) plus ``merge.json`` provenance, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import platform
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ordermerge import __version__
from ordermerge.merging import task_vectors as tv
from ordermerge.storage.atomic import atomic_path
from ordermerge.storage.checkpoint import CheckpointError, LazyCheckpoint, ShardedWriter, copy_sidecars, parse_size
from ordermerge.merging.bits import (CHUNK, INT_VIEW, SelectStats, chunk_rng, normalized_weights, select_bits, stored_bits,
                         weighted_average)

METHODS = ("average", "select", *tv.TASK_VECTOR_METHODS)
# The baselines' parameters, their defaults (TIES keeps the top 20 %, DARE drops 90 %, as in
# their papers) and what is valid; weights are normalised to sum 1, so scale = K is Σ τ_i.
PARAMETERS = {"task_arithmetic": ("scale",), "ties": ("density", "scale"), "dare": ("drop_rate", "scale"),
              "model_stock": ()}
DEFAULTS = {"scale": 1.0, "density": 0.2, "drop_rate": 0.9}
_VALID = {"scale": (lambda x: 0 < x < float("inf"), "> 0"), "density": (lambda x: 0 < x <= 1, "in (0, 1]"),
          "drop_rate": (lambda x: 0 <= x < 1, "in [0, 1)")}
CITATIONS = {
    "average": "Ju et al., arXiv 2410.03743 (Eq. 1)",
    "select": "Ju et al., arXiv 2410.03743 (parameter selection, Eq. 2; resampling, Eq. 3)",
    "task_arithmetic": "Ilharco et al., ICLR 2023 (task arithmetic)",
    "ties": "Yadav et al., NeurIPS 2023 (TIES-merging)",
    "dare": "Yu et al., ICML 2024 (DARE)",
    "model_stock": "Jang et al., ECCV 2024 (Model Stock)",
}


def method_key(method: str, resample: int = 0) -> str:
    """The name used in paths and tables: average, select, resample1, ..., ties, dare, ..."""
    return f"resample{resample}" if method == "select" and resample > 0 else method


def parse_method_key(key: str) -> tuple[str, int]:
    if key.startswith("resample"):
        return "select", int(key[len("resample"):])
    if key in METHODS:
        return key, 0
    raise ValueError(f"unknown merge method {key!r}; use average, select, resampleN (N = 1..8), "
                     "task_arithmetic, ties, dare or model_stock")


def method_parameters(method: str, scale: float | None = None, density: float | None = None,
                      drop_rate: float | None = None) -> dict[str, float]:
    """The method's parameters (defaults filled in), refusing ones it does not use or out of range."""
    given = {"scale": scale, "density": density, "drop_rate": drop_rate}
    wanted = PARAMETERS.get(method, ())
    for name, value in given.items():
        if value is not None and name not in wanted:
            users = ", ".join(m for m, names in PARAMETERS.items() if name in names)
            raise ValueError(f"--{name.replace('_', '-')} applies to {users} only, not {method}; drop it")
    params = {name: DEFAULTS[name] if given[name] is None else float(given[name]) for name in wanted}
    for name, value in params.items():
        ok, bounds = _VALID[name]
        if not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {bounds}, got {value}")
    return params


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "use --device cpu, which gives the same bytes")


def sha256_of_dir(directory: Path) -> str:
    """Digest of a model's weight files (names and bytes), for provenance."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)  # reused and cache-sized: hashing is most of a merge's CPU time
    view = memoryview(buf)
    for path in sorted(directory.glob("*.safetensors")):
        h.update(path.name.encode())
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def _check_compatible(base: LazyCheckpoint, models: list[LazyCheckpoint]) -> None:
    names = base.keys()
    for m in models:
        if m.keys() != names:
            extra = sorted(set(m.keys()) ^ set(names))
            raise CheckpointError(f"{m.directory}: tensor names differ from the base {base.directory} (e.g. {extra[0]}); "
                                  "merge only fine-tunes of this base")
        for name in names:
            if m.meta(name) != base.meta(name):
                raise CheckpointError(f"{m.directory}: tensor {name} is {m.meta(name)} but the base has {base.meta(name)}; "
                                      "save every fine-tune in the base's shapes and dtype")


class _ChunkMerger:
    """Merges one chunk of one tensor: reads it from all K inputs, computes, writes it out.

    ``ties`` and ``model_stock`` need whole-tensor quantities first (a magnitude threshold, a
    cosine); :meth:`prepare` computes them in passes over the same chunks before the merge pass.
    """

    def __init__(self, base, models, writer, method, probs, seed, resample, params=None, device="cpu"):
        self.base, self.models, self.writer = base, models, writer
        self.method, self.probs, self.seed, self.resample = method, probs, seed, resample
        self.params, self.device = params or {}, torch.device(device)
        self.tensor_stats: dict[str, dict] = {}  # per-tensor quantities from prepare, for merge.json
        self._per_tensor: dict[str, object] = {}  # what the merge pass needs of them
        self._local = threading.local()

    def _buffer(self, nbytes: int) -> np.ndarray:
        # One buffer per worker thread, reused: no allocation (or page faults) per chunk.
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = self._local.buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes]

    def _rows(self, name: str, start: int, count: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, count) inputs and (count,) base of one chunk of a float tensor, on ``device``."""
        info = self.base.info(name)
        k = len(self.models)
        stack = self._buffer((k + 1) * count * info.itemsize).view(INT_VIEW[info.itemsize]).reshape(k + 1, count)
        for i, m in enumerate(self.models):
            m.read_into(name, start, stack[i])
        self.base.read_into(name, start, stack[k])
        rows = torch.from_numpy(stack).view(info.torch_dtype).to(device or self.device)
        return rows[:k], rows[k]

    def _task_vector_chunk(self, name: str, start: int, count: int) -> tuple[np.ndarray, tv.KeptCounts | None]:
        rows, base = self._rows(name, start, count)
        p, kept = self.params, None
        if self.method == "task_arithmetic":
            out = tv.task_arithmetic(rows, base, self.probs, p["scale"])
        elif self.method == "dare":
            keep = tv.dare_keep_mask(len(self.models), count, p["drop_rate"], chunk_rng(self.seed, name, start // CHUNK))
            out, kept = tv.dare(rows, base, self.probs, p["scale"], torch.from_numpy(keep).to(self.device),
                                p["drop_rate"])
        elif self.method == "ties":
            out, kept = tv.ties(rows, base, self.probs, p["scale"], self._per_tensor[name])
        else:
            out = tv.model_stock(rows, base, self._per_tensor[name])
        return stored_bits(out).cpu().numpy(), None if kept is None else tv.KeptCounts(kept, count)

    def prepare(self, pool: ThreadPoolExecutor, tasks: list[tuple], progress: bool) -> None:
        floats = [t for t in tasks if self.base.info(t[0]).torch_dtype.is_floating_point]
        if self.method == "ties":
            self._ties_thresholds(pool, floats, progress)
        elif self.method == "model_stock":
            self._model_stock_ratios(pool, floats, progress)

    def _ties_thresholds(self, pool, tasks, progress) -> None:
        """Each input's exact k-th largest |τ| per tensor, by a two-pass radix select on its fp32 bits.

        Memory: per worker, one chunk of K inputs + base and its (K, CHUNK) fp32 task vectors; per
        tensor in flight, K x 2^16 int64 histogram counts (4 MB at K = 8), never a whole tensor.
        """
        k = len(self.models)
        chunks = _chunks_per_tensor(tasks)
        rank = {n: torch.full((k,), tv.ties_rank(self.base.info(n).numel, self.params["density"]))
                for n in chunks}
        high = _TensorSums(chunks, lambda n, hist: tv.top_bin(hist, rank[n]))
        _gather(pool, lambda n, lo, c: high.add(n, tv.high_histogram(tv.task_vectors(*self._rows(n, lo, c)))),
                tasks, progress, "ties thresholds 1/2")
        low = _TensorSums(chunks, lambda n, hist: tv.top_bin(hist, high.done[n][1])[0])
        _gather(pool, lambda n, lo, c: low.add(n, tv.low_histogram(tv.task_vectors(*self._rows(n, lo, c)),
                                                                   high.done[n][0])),
                tasks, progress, "ties thresholds 2/2")
        for n in chunks:
            self._per_tensor[n] = tv.magnitude_threshold(high.done[n][0], low.done[n])
            self.tensor_stats[n] = {"threshold": self._per_tensor[n].tolist()}

    def _model_stock_ratios(self, pool, tasks, progress) -> None:
        """Per tensor: the Gram matrix of task vectors, summed over chunks in chunk order (fp64, CPU)."""
        grams = _gather(pool, lambda n, lo, c: tv.gram_fp64(*self._rows(n, lo, c, device="cpu")),
                        tasks, progress, "model_stock angles")
        total: dict[str, np.ndarray] = {}
        for (name, _, _), gram in zip(tasks, grams):  # tasks are in chunk order within a tensor
            total[name] = total[name] + gram if name in total else gram
        for name, gram in total.items():
            ratio, cosine = tv.model_stock_ratio(gram)
            self._per_tensor[name] = ratio
            self.tensor_stats[name] = {"ratio": ratio, "cosine": cosine}

    def __call__(self, name: str, start: int, count: int) -> SelectStats | tv.KeptCounts | None:
        info = self.base.info(name)
        floating = info.torch_dtype.is_floating_point
        if floating and self.method in tv.TASK_VECTOR_METHODS:
            out, kept = self._task_vector_chunk(name, start, count)
            self.writer.write(name, start, out)
            return kept
        k = len(self.models) if floating else 1  # non-float tensors are copied from the first model
        with_base = floating and self.method == "select" and self.resample > 0
        buf = self._buffer((k + with_base) * count * info.itemsize)
        stack = buf.view(INT_VIEW[info.itemsize]).reshape(k + with_base, count)
        for i, m in enumerate(self.models[:k]):
            m.read_into(name, start, stack[i])
        stats = None
        if not floating:
            out = stack[0]
        elif self.method == "average":
            rows = torch.from_numpy(stack).view(info.torch_dtype).to(self.device)
            out = stored_bits(weighted_average(rows, self.probs)).cpu().numpy()
        else:
            if with_base:
                self.base.read_into(name, start, stack[k])
            rng = chunk_rng(self.seed, name, start // CHUNK)
            out, stats = select_bits(stack[:k], self.probs, rng, stack[k] if with_base else None, self.resample)
        self.writer.write(name, start, out)
        return stats


def _chunks_per_tensor(tasks: list[tuple]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, _, _ in tasks:
        counts[name] = counts.get(name, 0) + 1
    return counts


class _TensorSums:
    """Per-tensor sums of per-chunk integer counts, reduced by ``finish`` once a tensor's last chunk is in.

    Integer sums do not depend on the order chunks finish, and memory holds only the tensors in flight.
    """

    def __init__(self, chunks: dict[str, int], finish):
        self._left, self._finish = dict(chunks), finish
        self._sums: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.done: dict[str, object] = {}

    def add(self, name: str, part: torch.Tensor) -> None:
        with self._lock:
            self._sums[name] = self._sums[name].add_(part) if name in self._sums else part
            self._left[name] -= 1
            if not self._left[name]:
                self.done[name] = self._finish(name, self._sums.pop(name))


def _gather(pool: ThreadPoolExecutor, fn, tasks: list[tuple], progress: bool, desc: str) -> list:
    """``fn(*task)`` for every task on the pool; results in task order."""
    futures = [pool.submit(fn, *t) for t in tasks]
    for f in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="chunk", disable=not progress):
        f.result()
    return [f.result() for f in futures]


def _run_parallel(tasks: list[tuple], hash_dirs: list[Path], merger: _ChunkMerger, progress: bool, desc: str):
    """Chunks and input digests on torch.get_num_threads() worker threads (numpy and torch release the GIL)."""
    workers = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: intra-op threads would oversubscribe
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        merger.prepare(pool, tasks, progress)
        chunks = [pool.submit(merger, *t) for t in tasks]
        digests = [pool.submit(sha256_of_dir, d) for d in hash_dirs]  # last: they overlap the output's sync
        for f in tqdm(as_completed(chunks), total=len(chunks), desc=desc, unit="chunk", disable=not progress):
            f.result()
        merger.writer.close()
        return [f.result() for f in chunks], [f.result() for f in digests]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        merger.writer.close(sync=False)  # on failure: closes the files before the temporary directory goes
        torch.set_num_threads(workers)


def merge_models(
    base_dir: str | Path,
    model_dirs: list[str | Path],
    out_dir: str | Path,
    method: str = "select",
    resample: int = 0,
    seed: int = 0,
    weights: list[float] | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
    scale: float | None = None,
    density: float | None = None,
    drop_rate: float | None = None,
    device: str = "cpu",
) -> dict:
    """Merge ``model_dirs`` (fine-tunes of ``base_dir``) into ``out_dir``; returns the provenance.

    ``scale``, ``density`` and ``drop_rate`` are the baselines' parameters (None: the default);
    ``device="cuda"`` runs the float math on the GPU with the same bytes as the CPU (select's bit
    gathers stay on the CPU, where its random draws are made).
    """
    out_dir = Path(out_dir)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    params = method_parameters(method, scale, density, drop_rate)
    if method == "model_stock" and weights is not None and len(set(weights)) > 1:
        raise ValueError("model_stock averages the inputs uniformly (Jang et al.); drop --weights")
    _check_device(device)
    if not 0 <= resample <= 8:
        raise ValueError(f"resample must be in 0..8, got {resample}")
    if resample and method != "select":
        raise ValueError("resample applies to method 'select' only")
    if len(model_dirs) < 2:
        raise ValueError(f"need at least 2 models to merge, got {len(model_dirs)}; pass K >= 2 MODEL_DIRs")
    if len(model_dirs) > 255:
        raise ValueError("at most 255 models can be merged at once")
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    probs = normalized_weights(weights, len(model_dirs))
    base = LazyCheckpoint(base_dir)
    models = [LazyCheckpoint(d) for d in model_dirs]
    _check_compatible(base, models)
    names = base.keys()
    tasks = [(name, lo, min(CHUNK, base.info(name).numel - lo))
             for name in names for lo in range(0, base.info(name).numel, CHUNK)]
    key = method_key(method, resample)
    try:
        with atomic_path(out_dir, directory=True) as tmp:
            writer = ShardedWriter(tmp, parse_size(shard_size), [(n, *base.meta(n)) for n in names])
            merger = _ChunkMerger(base, models, writer, method, probs, seed, resample, params, device)
            results, digests = _run_parallel(tasks, [Path(base_dir), *map(Path, model_dirs)], merger,
                                             progress, f"merge {key}")
            copy_sidecars(Path(base_dir), tmp)
            provenance = _provenance(base_dir, model_dirs, method, resample, seed, probs, digests,
                                     sum(base.info(n).numel for n in names), tasks, results)
            provenance.update(_baseline_provenance(method, params, device, tasks, results, merger.tensor_stats))
            (tmp / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
            (tmp / "README.md").write_text(_model_card(provenance))
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()
    return provenance


def _baseline_provenance(method, params, device, tasks, results, tensor_stats) -> dict:
    """Parameters, and for the baselines per-tensor kept fractions, thresholds or ratios."""
    out = {"parameters": params, "device": device}
    if method not in tv.TASK_VECTOR_METHODS:
        return out
    kept: dict[str, tv.KeptCounts] = {}
    for (name, _, _), stats in zip(tasks, results):
        if stats is not None:
            kept[name] = kept[name] + stats if name in kept else stats
    per_tensor = {name: dict(tensor_stats.get(name, {})) for name in sorted({*kept, *tensor_stats})}
    for name, counts in kept.items():
        per_tensor[name]["kept_fraction"] = counts.fractions()
    out["per_tensor"] = per_tensor
    if kept:  # ties and dare: the share of each task vector that entered the merge
        out["kept_fraction"] = sum(kept.values(), tv.KeptCounts.zero(len(next(iter(kept.values())).kept))).fractions()
    return out


def _provenance(base_dir, model_dirs, method, resample, seed, probs, digests, elements, tasks, results) -> dict:
    per_tensor: dict[str, SelectStats] = {}
    for (name, _, _), stats in zip(tasks, results):
        if isinstance(stats, SelectStats):
            per_tensor[name] = per_tensor[name] + stats if name in per_tensor else stats
    total = SelectStats([0] * len(model_dirs), [0] * resample)
    for stats in per_tensor.values():
        total = total + stats
    selected = sum(total.counts)
    return {
        "tool": f"ordermerge {__version__}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "method": method,
        "method_key": method_key(method, resample),
        "resample": resample,
        "seed": seed,
        "weights": probs,
        "rng": f"numpy PCG64 per (seed, tensor, chunk of {CHUNK} elements)",
        "base": {"path": str(base_dir), "sha256": digests[0]},
        "inputs": [{"path": str(d), "sha256": h} for d, h in zip(model_dirs, digests[1:])],
        "stats": {
            "elements": elements,
            # over the elements that were selected (integer tensors are copied, not selected)
            "fraction_from": [c / max(1, selected) for c in total.counts] if method == "select" else None,
            "resampled_per_round": total.resampled,
            "zero_task_vector_after": total.zero_after,
        },
        "per_tensor": {
            name: {"fraction_from": [c / max(1, sum(s.counts)) for c in s.counts],
                   "resampled": s.resampled, "zero_after": s.zero_after}
            for name, s in sorted(per_tensor.items())
        },
    }


def _model_card(p: dict) -> str:
    lines = [
        "---", "tags: [ordermerge, merge]", "---", "",
        f"# Merged model ({p['method_key']})", "",
        f"Merged by {p['tool']} from {len(p['inputs'])} fine-tunes of `{p['base']['path']}` "
        f"with method `{p['method']}`, resample={p['resample']}, seed={p['seed']}, parameters {p['parameters']}.",
        f"Method: {CITATIONS[p['method']]}.", "",
        "Inputs:", *[f"- `{i['path']}` (sha256 {i['sha256'][:16]}…)" for i in p["inputs"]], "",
        "Full provenance and per-tensor statistics: `merge.json`.", "",
    ]
    return "\n".join(lines)
