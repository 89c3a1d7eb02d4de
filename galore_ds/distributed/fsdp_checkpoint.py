"""torch.distributed.checkpoint for the FSDP2 GaLore optimizers: save on W ranks, load on W'.

Optimizer state is keyed by parameter FQN. Row-sharded moments become DTensors split like
their parameter (DCP reshards them); projectors and counters are replicated plain tensors.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_ds import projector as pj
from galore_ds.distributed.fsdp import row_shard_info
from galore_ds.optim.adamw import GaLoreAdamW

#: state tensors that are row blocks of a row-sharded parameter (AdamW's moments: m_i x r
#: for right-projected GaLore matrices, the parameter's own shape otherwise)
ROW_SHARDED_KEYS = ("exp_avg", "exp_avg_sq")
_SCALAR_KEYS = ("step", "refresh_offset", "proj_right")
_MISSING = -1  # "step" placeholder: this parameter had no state in the checkpoint


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, bool):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    raise TypeError(f"optimizer state value of type {type(value).__name__} cannot be checkpointed")


def _from_tensor(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return bool(t)
    if t.dtype == torch.int64:
        return int(t)
    return float(t)


def _row_dtensor(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A moment's local rows as a DTensor split like parameter `p` (uneven rows allowed)."""
    from torch.distributed.tensor import DTensor

    shape = (p.shape[0],) + tuple(local.shape[1:])
    stride = []
    acc = 1
    for d in reversed(shape):
        stride.insert(0, acc)
        acc *= d
    return DTensor.from_local(local.contiguous(), p.device_mesh, p.placements,
                              run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def _check_dcp_support(opt) -> None:
    if not isinstance(opt, GaLoreAdamW):
        raise NotImplementedError(
            f"resharding checkpoints of {type(opt).__name__}: only GaLoreAdamW state is row-"
            "shardable (8-bit blocks are formed per rank)"
        )


def dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """{"model": ..., "optim": ...} for torch.distributed.checkpoint.save.

    Optimizer state is keyed by parameter FQN; row-sharded moments become DTensors (so a
    checkpoint saved on W ranks loads on any other W'), projectors and counters are
    replicated plain tensors.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    _check_dcp_support(opt)
    fqn = {id(p): name for name, p in model.named_parameters()}
    optim: dict[str, Any] = {}
    for gi, group in enumerate(opt.param_groups):
        optim[f"group{gi}.lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            info = row_shard_info(p)
            for key, value in state.items():
                name = f"{fqn[id(p)]}.{key}"
                if torch.is_tensor(value):
                    if key in ROW_SHARDED_KEYS and info is not None:
                        value = _row_dtensor(value, p)
                    optim[name] = value
                else:
                    optim[name] = _as_tensor(value)
    return {"model": get_model_state_dict(model), "optim": optim}


def _placeholder_state(opt, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
    """Zero tensors shaped like the state `p` will have (what DCP loads into)."""
    info = row_shard_info(p)
    shape = tuple(p.shape)
    local_rows = p.to_local().shape[0] if hasattr(p, "to_local") else shape[0]
    st: dict[str, torch.Tensor] = {"step": torch.tensor(_MISSING, dtype=torch.int64)}
    if "rank" in group:
        r = group["rank"]
        side = "right" if info is not None else pj.choose_side(shape, group["proj_type"])
        st["proj"] = torch.zeros((r, shape[1]) if side == "right" else (shape[0], r),
                                 dtype=pj.storage_dtype(p.dtype))
        st["proj_right"] = torch.tensor(side == "right")
        st["refresh_offset"] = torch.tensor(0, dtype=torch.int64)
        moment_local = (local_rows, r) if side == "right" else (r, shape[1])
    else:
        moment_local = tuple(p.to_local().shape) if hasattr(p, "to_local") else shape
    for key in ROW_SHARDED_KEYS:
        t = torch.zeros(moment_local)
        st[key] = _row_dtensor(t, p) if info is not None else t
    return st


def dcp_load(model: torch.nn.Module, opt, checkpoint_id) -> None:
    """Load a checkpoint written by `dcp_state_dict` + dcp.save, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _check_dcp_support(opt)
    fqn = {id(p): name for name, p in model.named_parameters()}
    optim: dict[str, Any] = {}
    holders = []
    for gi, group in enumerate(opt.param_groups):
        optim[f"group{gi}.lr"] = torch.tensor(0.0, dtype=torch.float64)
        for p in group["params"]:
            st = _placeholder_state(opt, p, group)
            holders.append((p, st))
            for key, value in st.items():
                optim[f"{fqn[id(p)]}.{key}"] = value
    msd = get_model_state_dict(model)
    sd = {"model": msd, "optim": optim}
    dcp.load(sd, checkpoint_id=checkpoint_id,
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, sd["model"])
    optim = sd["optim"]
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = float(optim[f"group{gi}.lr"])
    for p, st in holders:
        name = fqn[id(p)]
        step = int(optim[f"{name}.step"])
        if step == _MISSING:
            opt.state.pop(p, None)
            continue
        new = {}
        for key in st:
            v = optim[f"{name}.{key}"]
            if hasattr(v, "to_local"):
                v = v.to_local()
            new[key] = _from_tensor(v) if key in _SCALAR_KEYS else v.clone()
        opt.state[p] = new
