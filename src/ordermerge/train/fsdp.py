"""Sharded full fine-tuning (``train.parallel: fsdp``) with torch's FSDP2 ``fully_shard``.

For models whose fp32 weights, gradients and AdamW moments (16 bytes per parameter) do not fit
one GPU: every rank keeps 1/world of them. The training loop, order, global batch and loss
normalisation are those of distributed.py; only what differs lives here:

- Sharding: each decoder layer is its own unit (all-gathered just for its forward/backward), the
  root holds the rest (embeddings, final norm, head; tied weights stay in one unit).
- Gradients are SUMMED over ranks (divide factor 1), as distributed.sum_gradients does, because
  every rank already scales its loss by the global number of scored tokens.
- train.token_losses calls the body and the head separately, never the root's ``forward``; the
  root's all-gather hooks run through a registered forward method (``score``) instead.
- Every forward/backward is a collective, so every rank runs the same number of micro-batches;
  a rank with a shorter share pads with zero-weighted fillers (see ``micro_batch_count``).
- Checkpoints and resume state are gathered to rank 0 as full tensors, in the same safetensors +
  JSON format as the unsharded path (no pickle), so a run may resume with another world size.
"""

from __future__ import annotations

import math
from types import MethodType

import torch

SCORE_METHOD = "ordermerge_score"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (``model.model.layers`` for Llama & co.)."""
    body = getattr(model, model.base_model_prefix)
    layers = getattr(body, "layers", None) or getattr(body, "h", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard (looked for .layers, .h)")
    return list(layers)


def shard(model, device: torch.device, world: int):
    """FSDP2 over all ranks: one unit per decoder layer, then the root; gradients summed, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM/AVG
    setattr(model, SCORE_METHOD, MethodType(lambda self, fn, batch: fn(self, batch), model))
    register_fsdp_forward_method(model, SCORE_METHOD)
    return model


def is_sharded(model) -> bool:
    return hasattr(model, SCORE_METHOD)


def score(model, fn, batch):
    """``fn(model, batch)`` with the root's parameters gathered (FSDP) or as a plain call."""
    return getattr(model, SCORE_METHOD)(fn, batch) if is_sharded(model) else fn(model, batch)


def micro_batch_count(n_items: int, world: int, micro: int) -> int:
    """Micro-batches of the rank with the largest share of an ``n_items`` batch (distributed.my_slice)."""
    return math.ceil(math.ceil(n_items / world) / micro)


def as_float(value) -> float:
    """A scalar that may be a replicated DTensor (clip_grad_norm_ over sharded gradients)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU of rank 0 (collective; other ranks get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (how optimizer.state_dict() numbers them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_training_tensors(model, optimizer, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``param.<name>`` / ``optim.<index>.<key>`` tensors as train._save_state writes them (collective).

    ``model_state`` is full_model_state's result, reused for the weights. Rank 0 gets the tensors,
    other ranks ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not model_state:
        return {}
    names = _optimizer_names(model, optimizer)
    flat = {f"param.{n}": model_state[n].contiguous() for n in names}
    for i, name in enumerate(names):
        flat.update({f"optim.{i}.{k}": v.contiguous() for k, v in optim["state"].get(name, {}).items()})
    return flat


def load_training_tensors(model, optimizer, flat: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of full_training_tensors (collective): rank 0 passes the tensors, others ``{}``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    weights, optim = {}, {}
    if flat:
        weights = {n: flat[f"param.{n}"] for n in names}
        state: dict[str, dict] = {}
        for key, t in flat.items():
            if key.startswith("optim."):
                _, i, k = key.split(".", 2)
                state.setdefault(names[int(i)], {})[k] = t
        optim = {
            "state": state,
            "param_groups": [
                {**g, "betas": tuple(g["betas"]), "params": [names[i] for i in g["params"]]} for g in groups
            ],
        }
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
