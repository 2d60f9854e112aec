"""A tiny offline Llama (character-level tokenizer with a chat template) and a small train split.

Built in well under a second, never downloaded; shared by the training and loss tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASK_SPEC = {"max_length": 96, "system_prompt": None}
ROOT = Path(__file__).resolve().parents[1]


def build_tiny_base(out_dir: Path, dtype: str = "bfloat16") -> Path:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
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
        rows.append({"sample_id": f"t-{i:03d}", "prompt": f"What is {a} plus {b}?" + " ok" * (i % 4),
                     "response": f"{a} + {b} = {a + b}.\n#### {a + b}", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cfg(**overrides) -> dict:
    cfg = {"epochs": 2, "batch_size": 4, "micro_batch_size": None, "lr": 1e-3, "schedule": "linear",
           "warmup_steps": 1, "weight_decay": 0.0, "max_grad_norm": 1.0, "compute_dtype": "float32",
           "save_dtype": "bfloat16"}
    return {**cfg, **overrides}


def cli_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


def fine_tune_cmd(base: Path, train: Path, order: Path, out_dir: Path, cfg: dict, run_name: str = "r0",
                  seed: int = 1, launcher: list[str] | None = None) -> list[str]:
    launcher = launcher or [sys.executable, "-m"]
    return [*launcher, "ordermerge", "fine-tune", "--base", str(base), "--train", str(train), "--order", str(order),
            "--out-dir", str(out_dir), "--run-name", run_name, "--task-spec", json.dumps(TASK_SPEC),
            "--train-cfg", json.dumps(cfg), "--seed", str(seed), "--threads", "1"]


def run_cli(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, **kwargs)
