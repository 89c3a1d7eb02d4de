"""The flat form: one optimizer's state as {"<prefix><name>.<key>": tensor} that DCP saves and
reshards. torchtitan's checkpointer saves it (integrations/torchtitan.py and
torchtitan_trainspec.py: `create_state`, then `optim_state_dict` / `load_optim_state_dict`);
with `raw_8bit` it is the optimizer part of galore_ds's own DCP form (galore_dcp.py).

Split state tensors are DTensor blocks of their logical tensors (places.py), so DCP reshards
them. A quantized rule's moments (GaLoreAdamW8bit) are given as their fp32 values, which the
loader quantizes back in its own blocks: bit-identically where those blocks are the saver's,
within one code step elsewhere. With `raw_8bit` they are each shard's codes as they are, which
only galore_dcp.dcp_load re-forms on another layout.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_ds.layouts.base import local_tensor
from galore_ds.optim.checkpoint.places import (
    as_tensor, as_values, dtensor_block, from_tensor, holds_codes, low_shape, lr_tensor, lr_value, named_entries,
    quantized_keys, shard_key, shard_of,
)


def optim_state_dict(opt, names: dict[int, str] | None = None, prefix: str = "",
                     raw_8bit: bool = False) -> dict[str, Any]:
    """The optimizer's state as a flat dict DCP saves and reshards (every key starts with
    `prefix`, so several optimizers' dicts can share one checkpoint): torchtitan's form
    (load_optim_state_dict), and with raw_8bit the optimizer part of `dcp_state_dict`.
    GaLoreAdamW8bit's moments: their fp32 values as blocks of the logical moments (any world
    size; load_optim_state_dict quantizes them back, bit-identically on the same layout), or
    with raw_8bit each shard's codes as they are (dcp_load re-forms them itself)."""
    codes = quantized_keys(opt.rule)
    # delayed clipping's carried coefficient: optimizer-wide, the same on every rank
    optim: dict[str, Any] = {f"{prefix}next_clip_coef": torch.tensor(float(opt.next_clip_coef), dtype=torch.float64)}
    for gi, group in enumerate(opt.param_groups):
        optim[f"{prefix}group{gi}.lr"] = lr_tensor(group["lr"])
    for name, e in named_entries(opt, names):
        shard, shards = shard_of(e)
        state = e.state if raw_8bit else as_values(opt.rule, e.state)
        for key, value in state.items():
            if not torch.is_tensor(value):
                optim[f"{prefix}{name}.{key}"] = as_tensor(value)
            elif key in codes:
                optim[prefix + shard_key(name, key, shard, shards)] = value
            else:
                optim[f"{prefix}{name}.{key}"] = dtensor_block(e, key, value)
    return optim


def create_state(opt) -> None:
    """Every state entry in the shape training gives it, before any step: one zero-gradient,
    lr-0 step, which the GaLore optimizers recognise (placeholders only: no projector computed
    from zeros, step counts stay 0). What DCP and torchtitan do before a load, so that a
    state dict has the keys, shapes and layouts to load into; nothing once there is state."""
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if opt.state or any(p.grad is not None for p in params):
        return
    lrs = [g["lr"] for g in opt.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


def load_optim_state_dict(opt, optim: dict[str, Any], names: dict[int, str] | None = None,
                          prefix: str = "") -> None:
    """Install what DCP loaded into a dict from `optim_state_dict` (same `prefix`) of this
    optimizer, with its state created first (`create_state`) so the entries match: DTensor
    blocks arrive resharded for this rank; GaLoreAdamW8bit's fp32 moment values are quantized
    in this rank's blocks (bit-identically on the saver's layout; raw codes from raw_8bit need
    the saver's world size: a key missing from the checkpoint says so)."""
    create_state(opt)
    codes = quantized_keys(opt.rule)
    opt.next_clip_coef = float(optim[f"{prefix}next_clip_coef"])
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = lr_value(optim[f"{prefix}group{gi}.lr"])
    for name, e in named_entries(opt, names):
        shard, shards = shard_of(e)
        new: dict[str, Any] = {}
        # a quantized rule's moments saved as their fp32 values (not raw_8bit)
        value_keys = list(opt.rule.state_shapes(low_shape(e), e.group)) if holds_codes(opt.rule, e.state) else []
        dense = bool(value_keys) and all(f"{prefix}{name}.{k}" in optim for k in value_keys)
        for key, value in e.state.items():
            if not torch.is_tensor(value):
                new[key] = from_tensor(optim[f"{prefix}{name}.{key}"])
            elif key in codes:
                if not dense:
                    new[key] = optim[prefix + shard_key(name, key, shard, shards)].clone()
            else:
                new[key] = local_tensor(optim[f"{prefix}{name}.{key}"]).clone()
        if dense:
            values = {k: local_tensor(optim[f"{prefix}{name}.{k}"]) for k in value_keys}
            shape = tuple(values[value_keys[0]].shape)
            new.update(opt.rule.from_values(values, e.group, shape, e.p_local.device, exact=True))
        opt.state[e.key] = new


__all__ = ["optim_state_dict", "load_optim_state_dict", "create_state"]
