"""Streaming merge of K fine-tunes of one base, chunk by chunk, in parallel over chunks.

Memory holds K copies of one chunk per worker thread, never K models: a method that needs whole
tensors (an SVD) asks for one chunk per tensor, and then holds K copies of one tensor per worker.

The engine knows no method: it loads ``ordermerge.merging.methods.<name>`` (named in the registry,
:mod:`ordermerge.merging.registry`) and drives it through :class:`~ordermerge.merging.methods.MergeMethod`.

Output is a complete Hugging Face directory (sharded safetensors + index, the base's config and
tokenizer, a model card) plus ``merge.json`` provenance, written atomically.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ordermerge import __version__
from ordermerge.merging import digest_cache, registry
from ordermerge.merging.bits import CHUNK, INT_VIEW, normalized_weights
from ordermerge.merging.digests import Budget, StreamingDigest, sha256_of_dir  # noqa: F401  (sha256_of_dir: re-exported)
from ordermerge.merging.methods import MergeMethod, load
from ordermerge.storage.atomic import atomic_path
from ordermerge.storage.checkpoint import (
    CheckpointError,
    LazyCheckpoint,
    ShardedWriter,
    copy_sidecars,
    parse_size,
)
from ordermerge.storage.guards import refuse_duplicates
from ordermerge.storage.widening import widened_base

_DTYPE_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors -> config.json


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use --device cpu, which gives the same bytes"
        )


def _check_compatible(base: LazyCheckpoint, models: list[LazyCheckpoint]) -> None:
    names = base.keys()
    for m in models:
        if m.keys() != names:
            extra = sorted(set(m.keys()) ^ set(names))
            raise CheckpointError(
                f"{m.directory}: tensor names differ from the base {base.directory} (e.g. {extra[0]}); "
                "merge only fine-tunes of this base"
            )
        for name in names:
            if m.meta(name) != base.meta(name):
                raise CheckpointError(
                    f"{m.directory}: tensor {name} is {m.meta(name)} but the base has {base.meta(name)}; "
                    "save every fine-tune in the base's shapes and in one dtype: the base's, or one "
                    "that holds its values exactly (float32 for a bfloat16 or float16 base)"
                )


class MergeContext:
    """What a method sees: the open checkpoints, the writer, weights, seed, parameters and device;
    reads of one chunk (or one whole tensor) of the K inputs, with or without the base; per-tensor
    statistics from its ``prepare``; and, for methods that choose on data, ``data`` and ``task_spec``.
    """

    def __init__(
        self, base, models, writer, probs, seed, params=None, device="cpu", weights=None, data=None, task_spec=None
    ):
        self.base, self.models, self.writer = base, models, writer
        self.probs, self.seed, self.weights = probs, seed, weights
        self.params, self.device = params or {}, torch.device(device)
        self.data, self.task_spec = data, task_spec
        self.tensor_stats: dict[str, dict] = {}  # per-tensor quantities from prepare, for merge.json
        self.per_tensor: dict[str, object] = {}  # what the merge pass needs of them
        self._local = threading.local()

    def _buffer(self, nbytes: int) -> np.ndarray:
        # One buffer per worker thread, reused: no allocation (or page faults) per chunk.
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.size < nbytes:
            buf = self._local.buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes]

    def scratch(self, key: str, shape, dtype: torch.dtype, device=None) -> torch.Tensor:
        """An uninitialised tensor, reused by this worker thread for every chunk (per key): a method's
        temporaries cost no allocation, page faults or allocator growth per chunk."""
        device = torch.device(device or self.device)
        pool = getattr(self._local, "scratch", None)
        if pool is None:
            pool = self._local.scratch = {}
        numel = int(np.prod(shape))
        buf = pool.get((key, dtype, device))
        if buf is None or buf.numel() < numel:
            buf = pool[(key, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def read(self, name: str, start: int, count: int, k: int | None = None, with_base: bool = False) -> np.ndarray:
        """Raw bits (k [+ 1], count) of the first ``k`` inputs (default all) [and the base, last row]."""
        info = self.base.info(name)
        k = len(self.models) if k is None else k
        stack = self._buffer((k + with_base) * count * info.itemsize).view(INT_VIEW[info.itemsize])
        stack = stack.reshape(k + with_base, count)
        for i, m in enumerate(self.models[:k]):
            m.read_into(name, start, stack[i])
        if with_base:
            self.base.read_into(name, start, stack[k])
        return stack

    def rows(self, name: str, start: int, count: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, count) inputs and (count,) base of one chunk of a float tensor, on ``device``."""
        k = len(self.models)
        stack = self.read(name, start, count, with_base=True)
        rows = torch.from_numpy(stack).view(self.base.info(name).torch_dtype).to(device or self.device)
        return rows[:k], rows[k]


class _ChunkMerger:
    """Merges one chunk of one tensor through the method; non-float tensors are copied from the first input."""

    def __init__(self, ctx: MergeContext, method: MergeMethod):
        self.ctx, self.method, self.writer = ctx, method, ctx.writer

    def prepare(self, pool: ThreadPoolExecutor, tasks: list[tuple], progress: bool) -> None:
        floats = [t for t in tasks if self.ctx.base.info(t[0]).torch_dtype.is_floating_point]
        self.method.prepare(self.ctx, pool, floats, progress)

    def __call__(self, name: str, start: int, count: int):
        if not self.ctx.base.info(name).torch_dtype.is_floating_point:
            self.writer.write(name, start, self.ctx.read(name, start, count, k=1)[0])
            return None
        out, stats = self.method.merge_chunk(self.ctx, name, start, count)
        self.writer.write(name, start, out)
        return stats


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _bounded_heap() -> None:
    """glibc: allocations of 1 MiB and more always get their own mapping, returned when freed.

    By default glibc raises that threshold each time such a block is freed, after which chunk-sized
    temporaries of the two worker threads come from per-thread heaps that fragment: in some runs of
    the same ties merge (4x SmolLM2-135M, K = 4) peak RSS went from 0.3 GB to 1.1-2.5 GB. Fixed at
    1 MiB it stayed at 0.3 GB in every run (benchmarks/README.md). Process-wide, like glibc's own
    default (128 KiB, raised dynamically up to 32 MiB); nothing elsewhere (musl, macOS)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 << 20)  # else fixed at 128 KiB: heaps shrunk and regrown per chunk
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc handle, no mallopt
        pass


def _run_parallel(tasks: list[tuple], digests: list[StreamingDigest], merger: _ChunkMerger, progress: bool, desc: str):
    """Chunks and input digests on torch.get_num_threads() worker threads (numpy, torch and hashlib
    release the GIL). The digests are fed by the chunks' reads; what is left of them runs last,
    overlapping the output's sync."""
    _bounded_heap()
    workers = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over chunks instead: intra-op threads would oversubscribe
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        merger.prepare(pool, tasks, progress)
        chunks = [pool.submit(merger, *t) for t in tasks]
        for f in tqdm(as_completed(chunks), total=len(chunks), desc=desc, unit="chunk", disable=not progress):
            f.result()
        rest = [pool.submit(d.finish) for d in digests]
        merger.writer.close()
        return [f.result() for f in chunks], [f.result() for f in rest]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        merger.writer.close(sync=False)  # on failure: closes the files before the temporary directory goes
        torch.set_num_threads(workers)


def _file_order(checkpoint: LazyCheckpoint):
    """Sort key of (name, start, count) tasks: where the chunk lies in ``checkpoint``'s files, so
    that reads (and the digests fed by them) go through each file front to back."""
    files = {f: i for i, f in enumerate(sorted({checkpoint.info(n).file for n in checkpoint.keys()}))}

    def key(task):
        info = checkpoint.info(task[0])
        return files[info.file], info.offset, task[1]

    return key


class _KnownDigest:
    """A checkpoint's digest taken from the digest cache (digest_cache.py): nothing to hash."""

    def __init__(self, value: str):
        self.value = value

    def finish(self) -> str:
        return self.value


def _digests(ctx: MergeContext, tasks: list[tuple], keys: list[str]) -> list[StreamingDigest | _KnownDigest]:
    """One digest per checkpoint (base first): from the digest cache when its files are unchanged
    (``keys``: their stat keys), else streaming, fed by every read of the merge: planned pieces are
    the float chunks of every checkpoint and the copied (non-float) chunks of the first input; the
    rest each digest reads itself."""
    budget = Budget(64 << 20)  # early pieces held at once, all digests together: memory flat in K
    root = digest_cache.cache_dir()
    out = []
    for i, checkpoint in enumerate([ctx.base, *ctx.models]):
        known = digest_cache.lookup(keys[i], root)
        if known is not None:
            out.append(_KnownDigest(known))
            continue
        planned: dict[str, list[tuple[int, int]]] = {}
        stored = getattr(checkpoint, "stored_info", checkpoint.info)  # a widened base reads its stored bytes
        for name, start, count in tasks:
            info = stored(name)
            if info.torch_dtype.is_floating_point or i == 1:
                planned.setdefault(info.file, []).append((info.offset + start * info.itemsize, count * info.itemsize))
        digest = StreamingDigest(checkpoint.directory, planned, budget)
        checkpoint.observer = digest.deliver
        out.append(digest)
    return out


def merge_models(
    base_dir: str | Path,
    model_dirs: list[str | Path],
    out_dir: str | Path,
    method: str = "select",
    seed: int = 0,
    weights: list[float] | None = None,
    shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    data: str | Path | None = None,
    task_spec: dict | None = None,
    config: dict | None = None,
    **params,
) -> dict:
    """Merge ``model_dirs`` (fine-tunes of ``base_dir``) into ``out_dir``; returns the provenance.

    ``params`` are the method's parameters as the registry defines them (None or absent: the default;
    one the method does not take, or out of its bounds, is refused); ``data`` (a JSONL file) and
    ``task_spec`` are for methods that choose on held-out data, and refused for the others.
    ``device="cuda"`` runs the float math on the GPU with the same bytes as the CPU (a method's random
    draws, and select's bit gathers, stay on the CPU).
    ``config``: what ``merge.json`` records of a config file the merge was read from (``merge --config``).
    """
    out_dir = Path(out_dir)
    params = _check_request(method, params, device, model_dirs, data, task_spec)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    probs = normalized_weights(weights, len(model_dirs))
    base = LazyCheckpoint(base_dir)
    models = [LazyCheckpoint(d) for d in model_dirs]
    try:
        base = widened_base(base, models)  # fp32 fine-tunes of a bf16 base: against the base's exact values
        _check_compatible(base, models)
        impl = load(method)
        ctx = MergeContext(base, list(models), None, list(probs), seed, params, device, weights, data, task_spec)
        impl.check(ctx)
        provenance = _write(ctx, impl, method, base_dir, model_dirs, out_dir, shard_size, progress, config)
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()
    return provenance


def _check_request(method, params, device, model_dirs, data, task_spec) -> dict:
    """Everything about the request that can be refused before reading a byte; returns the parameters."""
    m = registry.get(method)
    params = registry.check_params(method, params)
    _check_device(device)
    if len(model_dirs) < 2:
        raise ValueError(f"need at least 2 models to merge, got {len(model_dirs)}; pass K >= 2 MODEL_DIRs")
    if len(model_dirs) > 255:
        raise ValueError("at most 255 models can be merged at once")
    registry.check_models(method, len(model_dirs))
    if m.needs_data and (data is None or task_spec is None):
        raise ValueError(f"{method} chooses on held-out data: pass --data HELDOUT.jsonl and --task-spec JSON")
    if not m.needs_data and (data is not None or task_spec is not None):
        raise ValueError(f"{method} uses no data; drop --data and --task-spec")
    return params


def _write(
    ctx: MergeContext, impl: MergeMethod, method, base_dir, model_dirs, out_dir, shard_size, progress, config=None
) -> dict:
    """Runs the merge into a temporary directory that becomes ``out_dir`` only when complete."""
    base, names = ctx.base, ctx.base.keys()
    tasks = []
    for name in names:
        info = base.info(name)
        size = impl.chunk_size(info) if info.torch_dtype.is_floating_point else CHUNK
        tasks += [(name, lo, min(size, info.numel - lo)) for lo in range(0, info.numel, size)]
    tasks.sort(key=_file_order(base))  # chunks of a tensor stay in order: per-tensor sums keep their order
    key = registry.method_key(method, ctx.params)
    with atomic_path(out_dir, directory=True) as tmp:
        ctx.writer = ShardedWriter(tmp, parse_size(shard_size), [(n, *base.meta(n)) for n in names])
        weights = list(ctx.probs)
        dirs = [base.directory, *(m.directory for m in ctx.models)]
        keys = [digest_cache.stat_key(d) for d in dirs]
        streams = _digests(ctx, tasks, keys)
        results, digests = _run_parallel(tasks, streams, _ChunkMerger(ctx, impl), progress, f"merge {key}")
        hashed = [i for i, d in enumerate(streams) if isinstance(d, StreamingDigest)]
        for i in hashed:  # only when the files did not change while they were read
            if digest_cache.stat_key(dirs[i]) == keys[i]:
                digest_cache.store(keys[i], digests[i], digest_cache.cache_dir())
        if progress:
            print(
                f"inputs' sha256 (merge.json): {len(streams) - len(hashed)} of {len(streams)} from the digest cache, "
                f"{len(hashed)} hashed while read",
                file=sys.stderr,
            )
        refuse_duplicates("ordermerge merge", model_dirs, digests[1:])  # nothing is renamed into place
        floats = {base.info(n).dtype for n in names if base.info(n).torch_dtype.is_floating_point}
        copy_sidecars(Path(base_dir), tmp, _DTYPE_NAME.get(floats.pop()) if len(floats) == 1 else None)
        stats, per_tensor, extra = impl.summary(ctx, tasks, results)
        provenance = _provenance(base_dir, model_dirs, method, key, ctx.seed, weights, digests)
        provenance["stats"] = {"elements": sum(base.info(n).numel for n in names), **stats}
        provenance["per_tensor"] = per_tensor
        provenance.update({"parameters": ctx.params, "device": str(ctx.device), **extra})
        if config is not None:
            provenance["config"] = config
        (tmp / "merge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(provenance))
    return provenance


def _provenance(base_dir, model_dirs, method, key, seed, probs, digests) -> dict:
    return {
        "tool": f"ordermerge {__version__}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "method": method,
        "method_key": key,
        "seed": seed,
        "weights": probs,
        "rng": f"numpy PCG64 per (seed, tensor, chunk of {CHUNK} elements)",
        "base": {"path": str(base_dir), "sha256": digests[0]},
        "inputs": [{"path": str(d), "sha256": h} for d, h in zip(model_dirs, digests[1:])],
    }


def _model_card(p: dict) -> str:
    lines = [
        "---",
        "tags: [ordermerge, merge]",
        "---",
        "",
        f"# Merged model ({p['method_key']})",
        "",
        f"Merged by {p['tool']} from {len(p['inputs'])} fine-tunes of `{p['base']['path']}` "
        f"with method `{p['method']}`, seed={p['seed']}, parameters {p['parameters']}.",
        f"Method: {registry.get(p['method']).citation}.",
        "",
        "Inputs:",
        *[f"- `{i['path']}` (sha256 {i['sha256'][:16]}…)" for i in p["inputs"]],
        "",
        "Full provenance and per-tensor statistics: `merge.json`.",
        "",
    ]
    return "\n".join(lines)
