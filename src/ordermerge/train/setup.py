"""What a fine-tune run is set up from: its checked inputs, its constants, and the trainable model
(LoRA-wrapped or FSDP-sharded if configured) with AdamW and the lr schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ordermerge.data.formatting import encode_example
from ordermerge.data.orders import load_order
from ordermerge.data.prepare import read_jsonl, refuse_over_long
from ordermerge.train import fsdp


@dataclass
class Job:
    """The constants of one run: where it reads and writes, and how it cuts and computes batches."""

    base_dir: Path
    out_dir: Path
    run_name: str
    seed: int
    train_cfg: dict
    fingerprint: str
    ranks: object  # distributed.Ranks
    total_steps: int
    pad_id: int
    bf16: bool

    @property
    def resume_dir(self) -> Path:
        return self.out_dir / ".resume"

    @property
    def epochs(self) -> int:
        return self.train_cfg["epochs"]

    @property
    def batch_size(self) -> int:
        return self.train_cfg["batch_size"]

    @property
    def micro(self) -> int:
        return self.train_cfg.get("micro_batch_size") or self.train_cfg["batch_size"]

    @property
    def packing(self) -> bool:
        return bool(self.train_cfg.get("packing", False))


@dataclass
class Trainable:
    """The model being trained, the module token_losses needs (the HF body/head), and its optimizer."""

    model: object
    hf_model: object
    lora: bool
    params: list
    optimizer: object
    scheduler: object

    @property
    def sharded(self) -> bool:
        return fsdp.is_sharded(self.model)


def checked_inputs(base_dir: Path, train_path: Path, order_path, task_spec: dict, epochs: int):
    """The order, the encoded examples and the tokenizer, refused (before anything is written) when the
    order does not fit the data or the epochs, or a sample is longer than ``max_length``."""
    from transformers import AutoTokenizer

    order = load_order(order_path)
    records = read_jsonl(train_path)
    if order.shape[1] != len(records):
        raise ValueError(f"{order_path} orders {order.shape[1]} samples but {train_path} has {len(records)}")
    if order.shape[0] < epochs:
        raise ValueError(f"{order_path} has {order.shape[0]} epochs, training needs {epochs}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = [
        encode_example(tokenizer, r["prompt"], r["response"], task_spec.get("system_prompt"), task_spec["max_length"])
        for r in records
    ]
    refuse_over_long(examples, records, task_spec["max_length"])
    return order, examples, tokenizer


def total_steps(n_samples: int, train_cfg: dict) -> int:
    return math.ceil(n_samples / train_cfg["batch_size"]) * train_cfg["epochs"]


def use_bf16(train_cfg: dict, device: torch.device) -> bool:
    """bf16 autocast if configured and the device has it (a GPU without bf16 computes in float32)."""
    bf16 = train_cfg["compute_dtype"] == "bfloat16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("[fine-tune] this GPU has no bf16; computing in float32", flush=True)
        bf16 = False
    return bf16


def lr_at(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use linear, cosine or constant")


def build(base_dir: Path, train_cfg: dict, device: torch.device, total_steps: int, world: int = 1) -> Trainable:
    """Model (LoRA-wrapped or FSDP-sharded if configured), its trainable parameters, AdamW and the lr schedule."""
    from transformers import AutoModelForCausalLM

    lora = train_cfg.get("method", "full") == "lora"
    # Trained weights are fp32 masters; a frozen LoRA base may stay in its stored dtype under bf16 compute.
    dtype = "auto" if lora and train_cfg["compute_dtype"] == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.config.use_cache = False
    if lora:
        from ordermerge.train.lora import wrap

        model = wrap(model, train_cfg)
    if train_cfg.get("parallel", "ddp") == "fsdp":
        if lora:
            raise ValueError("train.parallel fsdp needs train.method full (LoRA fits one GPU: use parallel ddp)")
        fsdp.shard(model, device, world)  # moves the shards to the device; AdamW then sees the shards
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": train_cfg["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=train_cfg["lr"],
        betas=(0.9, 0.999),
        eps=1e-8,
        # The fused kernel: one pass over each tensor instead of ~10 (measured 0.15 s vs 0.68 s per step
        # for 120 M fp32 parameters on one CPU thread, ~11 % of a default step). FSDP's sharded DTensor
        # parameters keep the foreach path.
        fused=not fsdp.is_sharded(model) and device.type in ("cpu", "cuda"),
    )
    warmup, schedule = train_cfg["warmup_steps"], train_cfg["schedule"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, warmup, schedule))
    hf_model = model.get_base_model() if lora else model  # the body/head split token_losses needs
    return Trainable(model, hf_model, lora, params, optimizer, scheduler)
