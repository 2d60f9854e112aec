"""Helpers shared by the test modules (test modules import this, never each other).

- the Snakemake runner and its job-count parser (workflow tests);
- a tiny offline Llama with a chat template, a small train split and the fine-tune command line
  (training, loss, evaluation and fault tests; the session fixtures in conftest.py build the model once);
- tiny HF-style checkpoint directories for the merge tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tests" / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent


# The workflow ---------------------------------------------------------------------------------------


def snakemake_cmd(workdir: Path, *args: str, configfile: Path | list[Path] = SMOKE) -> tuple[list[str], dict]:
    """The command line and environment of a workflow run in ``workdir``. ``configfile``: one file,
    or a list of overlays (later ones update earlier ones, as Snakemake merges them)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    files = configfile if isinstance(configfile, (list, tuple)) else [configfile]
    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        *map(str, files),
        "--cores",
        "2",
        *args,
    ]
    return cmd, env


def snakemake(
    workdir: Path, *args: str, configfile: Path | list[Path] = SMOKE, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the workflow in ``workdir`` (see ``snakemake_cmd``); a failure raises with the output's tail."""
    cmd, env = snakemake_cmd(workdir, *args, configfile=configfile)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    text = proc.stdout + proc.stderr
    block = text.split("Job stats:", 1)[1] if "Job stats:" in text else ""
    counts = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            counts[m.group(1)] = int(m.group(2))
        elif counts:
            break
    return counts


# A tiny offline Llama (character-level tokenizer with a chat template), built in well under a second ---

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASK_SPEC = {"max_length": 96, "system_prompt": None}


def build_tiny_base(out_dir: Path, dtype: str = "bfloat16") -> Path:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_train(path: Path, n: int = 16) -> Path:
    """Records of different lengths and distinct prompts (a sample is recognisable by its tokens)."""
    rows = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        rows.append(
            {
                "sample_id": f"t-{i:03d}",
                "prompt": f"What is {a} plus {b}?" + " ok" * (i % 4),
                "response": f"{a} + {b} = {a + b}.\n#### {a + b}",
                "answer": str(a + b),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cfg(**overrides) -> dict:
    cfg = {
        "epochs": 2,
        "batch_size": 4,
        "micro_batch_size": None,
        "lr": 1e-3,
        "schedule": "linear",
        "warmup_steps": 1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "compute_dtype": "float32",
        "save_dtype": "bfloat16",
    }
    return {**cfg, **overrides}


def cli_env() -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return env


def fine_tune_cmd(
    base: Path,
    train: Path,
    order: Path,
    out_dir: Path,
    cfg: dict,
    run_name: str = "r0",
    seed: int = 1,
    launcher: list[str] | None = None,
) -> list[str]:
    launcher = launcher or [sys.executable, "-m"]
    return [
        *launcher,
        "ordermerge",
        "fine-tune",
        "--base",
        str(base),
        "--train",
        str(train),
        "--order",
        str(order),
        "--out-dir",
        str(out_dir),
        "--run-name",
        run_name,
        "--task-spec",
        json.dumps(TASK_SPEC),
        "--train-cfg",
        json.dumps(cfg),
        "--seed",
        str(seed),
        "--threads",
        "1",
    ]


def run_cli(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, **kwargs)


# Tiny HF-style checkpoint directories for the merge tests ------------------------------------------

MERGE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48}


def merge_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the merge tests' model: "embed" spans two random-stream chunks, so chunk
    boundaries are exercised too."""
    from ordermerge.merging.bits import CHUNK

    return {
        "model.embed.weight": (CHUNK // 400 + 100, 400),
        "model.layers.0.mlp.weight": (64, 48),
        "model.norm.weight": (48,),
    }


def save_model_dir(directory: Path, state: dict, shards: int = 1) -> Path:
    """An HF directory: config.json + model.safetensors, or ``shards`` files + index."""
    from safetensors.torch import save_file

    from ordermerge.storage.checkpoint import INDEX_NAME

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(MERGE_CONFIG))
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def merge_base_state() -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in merge_shapes().items()}
    state["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    return state


def fine_tuned_state(base: dict, i: int, changed: float = 0.5) -> dict:
    """Base + an update on a random ``changed`` fraction of elements, distinct per model."""
    import torch

    g = torch.Generator().manual_seed(100 + i)
    out = {}
    for name, t in base.items():
        if not t.is_floating_point():
            out[name] = t + i  # integer tensors are copied from the first model, whatever they hold
            continue
        moved = (t.float() + (1 + i) * 0.25 + t.float().abs() * 0.1).to(t.dtype)
        out[name] = torch.where(torch.rand(t.shape, generator=g) < changed, moved, t)
    return out


def read_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def merge_zoo(root: Path, k: int, model_shards=lambda i: 1, sharded: bool = False) -> dict:
    """A base and ``k`` fine-tunes saved as model directories: the inputs of the merge tests.

    ``state``/``fts``: the tensors; ``base``/``models``: their directories (model i in
    ``model_shards(i)`` files); ``sharded``: the same fine-tunes in 2 shards each (when asked for).
    """
    base = merge_base_state()
    fts = [fine_tuned_state(base, i) for i in range(k)]
    zoo = {
        "state": base,
        "fts": fts,
        "base": save_model_dir(root / "base", base),
        "models": [save_model_dir(root / f"ft{i}", s, shards=model_shards(i)) for i, s in enumerate(fts)],
    }
    if sharded:
        zoo["sharded"] = [save_model_dir(root / f"ft{i}-sharded", s, shards=2) for i, s in enumerate(fts)]
    return zoo


# Every merge method, from the registry: what the cross-method tests iterate ------------------------


def merge_cases() -> list[str]:
    """Every method of the registry, plus one key per keyed method (select's resample2): a method added
    to the registry is in every cross-method test without a line here."""
    from ordermerge.merging import registry

    keys = list(registry.METHODS)
    for m in registry.METHODS.values():
        if m.key_prefix:
            keys.append(f"{m.key_prefix}{min(2, int(registry.PARAMETERS[m.key_param].high))}")
    return keys


def merge_request(key: str, zoo: dict, models: list | None = None) -> dict:
    """``merge_models`` keyword arguments for a method key on ``zoo`` (merge_zoo or lm_zoo): the key's
    parameters, as many inputs as the method merges, and held-out data for a method that chooses on it."""
    from ordermerge.merging import registry

    method, fixed = registry.parse_key(key)
    models = list(zoo["models"] if models is None else models)[: method.max_models]
    kw = {"method": method.name, "model_dirs": models, **fixed}
    if method.needs_data:
        kw |= {"data": zoo["data"], "task_spec": zoo["task_spec"]}
    return kw


def shard_copy(src: Path, dst: Path, shards: int = 2) -> Path:
    """A copy of the HF directory ``src`` whose weights are split into ``shards`` files + index."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ordermerge.storage.checkpoint import INDEX_NAME

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names, weight_map = sorted(state), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def lm_zoo(root: Path, base: Path, k: int, sharded: bool = False) -> dict:
    """The tiny offline Llama ``base`` and ``k`` noisy copies of it, loadable models with held-out
    data: the inputs for methods that score candidates on data (registry ``needs_data``)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    models = []
    for i in range(k):
        out = root / f"lm{i}"
        shutil.copytree(base, out)
        g = torch.Generator().manual_seed(200 + i)
        state = load_file(str(out / "model.safetensors"))
        for name, t in state.items():
            if t.is_floating_point():
                state[name] = (t.float() + torch.randn(t.shape, generator=g) * 0.02 * (i + 1)).to(t.dtype)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        models.append(out)
    zoo = {
        "base": base,
        "models": models,
        "data": write_train(root / "heldout.jsonl", n=4),
        "task_spec": {**TASK_SPEC, "batch_size": 4},
    }
    if sharded:
        zoo["sharded"] = [shard_copy(m, root / f"lm{i}-sharded") for i, m in enumerate(models)]
    return zoo
