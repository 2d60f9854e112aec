"""LoRA fine-tuning through peft, exported as full checkpoints so every merge method works unchanged.

A LoRA epoch is saved twice over: the merged full model (W + B·A·α/r, computed in fp32 and cast
to the save dtype, the same numbers peft's merge_and_unload gives) as the epoch's HF directory,
and the adapter alone (``adapter/adapter_model.safetensors`` + ``adapter_config.json``, loadable
with ``PeftModel.from_pretrained``). The training model is never merged in place: merging and
unmerging round-trip in floating point and would perturb the frozen base between epochs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

ADAPTER = "default"


def wrap(model, train_cfg: dict):
    """The model with trainable LoRA adapters (fp32) on the configured modules; the rest frozen."""
    from peft import LoraConfig, get_peft_model

    targets = train_cfg.get("lora_target_modules", "all-linear")
    config = LoraConfig(
        r=train_cfg.get("lora_r", 16),
        lora_alpha=train_cfg.get("lora_alpha", 32),
        lora_dropout=train_cfg.get("lora_dropout", 0.05),
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets if isinstance(targets, str) else list(targets),
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; nothing to act on here
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The full model's state under its plain Hugging Face names, adapters folded into the weights."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            weight = module.get_base_layer().weight
            state[f"{name}.weight"] = weight.detach().float() + module.get_delta_weight(ADAPTER).detach().float()
    return state


def save_adapter(peft_model, directory: Path) -> None:
    """Adapter weights (safetensors) and config; no model card, no hub look-ups."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    peft_model.peft_config[ADAPTER].save_pretrained(str(directory))
    # peft keeps target_modules as a set: its JSON order follows the string hash (PYTHONHASHSEED), so two
    # identical runs would write different bytes; sorted, the file is deterministic and loads the same.
    config_path = directory / "adapter_config.json"
    cfg = json.loads(config_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
