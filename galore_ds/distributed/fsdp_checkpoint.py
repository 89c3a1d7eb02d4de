"""torch.distributed.checkpoint for the FSDP2 GaLore optimizers: save on W ranks, load on W'.

Optimizer state is keyed by parameter FQN and holds the LOGICAL moments: row blocks of a
row-sharded parameter (m_i x r for right-projected GaLore matrices, the local shard's shape
otherwise) are saved as DTensors split like it, so DCP reshards them: Adam's fp32 "exp_avg"
and "exp_avg_sq", Adafactor's "exp_avg", per-row "exp_avg_sq_row" and vector "exp_avg_sq".
Projectors, counters, Adafactor's column statistic "exp_avg_sq_col" and "RMS" (equal on
every rank: computed from all-reduced sums) are replicated plain tensors.

GaLoreAdamW saves its moments as they are. GaLoreAdamW8bit's uint8 codes have one absmax per
256 values of the rank's LOCAL flattened moment, so they do not reshard: the checkpoint holds
them dequantized, and each loading rank quantizes its own rows with its own blocks (or keeps
fp32 below min_8bit_size: the optimizer's rule, so a tensor may switch form with the world
size). Its dequantized moments are then the saved ones to within one code step per block.

Re-quantizing a dequantized state is not the identity: the signed map (first moment) has +1
but no -1, so a block whose largest |m| is negative comes back with absmax x 0.993 and some
codes moved (measured on CPU after real 8-bit steps; the unsigned second-moment map round-
trips bit for bit). So the raw codes and absmax are saved too, under keys naming the shard
layout ("<fqn>.state1@shard0of2"), and a rank with that same layout installs them as they
were: a resume on the same world size is bit-identical. Cost: 2 bytes per moment entry (+8
per 256) on top of the 8 of the fp32 pair. Both optimizers write the same logical keys, so a
checkpoint of either loads into the other.
"""
from __future__ import annotations

import os
from typing import Any, Union

import torch

from galore_ds import projector as pj
from galore_ds.distributed.fsdp import row_shard_info
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import _BLOCKSIZE, GaLoreAdamW8bit, _qmap

#: the logical moments (row blocks of a row-sharded parameter): what the checkpoint holds
ROW_SHARDED_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row")
#: GaLoreAdamW8bit's form of each logical moment: (codes or fp32 key, absmax key, signed map)
_8BIT_KEYS = {"exp_avg": ("state1", "absmax1", True), "exp_avg_sq": ("state2", "absmax2", False)}
_MOMENT_STATE_KEYS = frozenset(ROW_SHARDED_KEYS) | {k for v in _8BIT_KEYS.values() for k in v[:2]}
_SCALAR_KEYS = ("step", "refresh_offset", "proj_right")
_MISSING = -1  # "step" placeholder: this parameter had no state in the checkpoint

CheckpointId = Union[str, "os.PathLike[str]"]


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


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


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


def _raw_key(name: str, key: str, p: torch.Tensor) -> str:
    """Key of one rank's raw 8-bit tensor: tagged with its shard rank and count, which fix its
    rows (torch.chunk) and so its blocks. HSDP replicas share the key (same state), so DCP
    writes it once."""
    info = row_shard_info(p)
    rank, size = (0, 1) if info is None else (info[1], info[2])
    return f"{name}.{key}@shard{rank}of{size}"


def _is_8bit(opt) -> bool:
    return isinstance(opt, GaLoreAdamW8bit)


def _check_dcp_support(opt) -> None:
    if not isinstance(opt, (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor)):
        raise NotImplementedError(
            f"resharding checkpoints of {type(opt).__name__}: only the GaLore optimizers' "
            "state layout is known here"
        )


def _rule_state_shapes(opt, group: dict, moment: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """{key: (local shape, row-sharded?)} of the rule's state for a local moment of shape
    `moment` (the shape of its low-rank or full gradient), as the rule creates it."""
    if not isinstance(opt, GaLoreAdafactor):
        return {"exp_avg": (moment, True), "exp_avg_sq": (moment, True)}
    shapes: dict[str, tuple[tuple[int, ...], bool]] = {"RMS": ((), False)}
    if group["beta1"] is not None:
        shapes["exp_avg"] = (moment, True)
    if len(moment) >= 2:
        shapes["exp_avg_sq_row"] = (moment[:-1], True)
        shapes["exp_avg_sq_col"] = (moment[:-2] + moment[-1:], False)
    else:
        shapes["exp_avg_sq"] = (moment, True)
    return shapes


# --------------------------------------------------------------------- 8-bit <-> logical
def _dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if codes.numel() == 0:  # min_8bit_size <= 0 on a rank without rows: no blocks
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return bnbf.dequantize_blockwise(codes, absmax=absmax, code=_qmap(codes.device, signed),
                                     blocksize=_BLOCKSIZE)


def _quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `x` in this rank's 256-value blocks, as the 8-bit step forms them."""
    import bitsandbytes.functional as bnbf

    x = x.float().contiguous()
    if x.numel() == 0:
        return (torch.zeros(x.shape, dtype=torch.uint8, device=x.device),
                torch.zeros(0, dtype=torch.float32, device=x.device))
    codes, qs = bnbf.quantize_blockwise(x, code=_qmap(x.device, signed), blocksize=_BLOCKSIZE)
    return codes, qs.absmax


def _moments_out(opt, state: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(logical fp32 moments, raw per-layout 8-bit tensors) of one parameter's local state."""
    if not _is_8bit(opt):
        return {k: state[k] for k in ROW_SHARDED_KEYS if k in state}, {}
    logical: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    for key, (sk, ak, signed) in _8BIT_KEYS.items():
        if sk not in state:
            continue
        v = state[sk]
        if v.dtype == torch.uint8:
            logical[key] = _dequantize(v, state[ak], signed)
            raw[sk], raw[ak] = v, state[ak]
        else:  # below min_8bit_size: already the fp32 moment
            logical[key] = v
    return logical, raw


def _fresh_8bit(opt, group: dict, moment_shape: tuple[int, ...], device: torch.device) -> dict:
    """Zero moments in the form the optimizer itself gives this rank's tensor (its own
    min_8bit_size rule, not a copy of it)."""
    fresh: dict[str, torch.Tensor] = {}
    type(opt)._init_moments(fresh, torch.empty(moment_shape, device=device), group)
    return fresh


def _moments_in(opt, group: dict, logical: dict[str, torch.Tensor],
                raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer state for the loaded local logical moments: as they are (GaLoreAdamW), or
    GaLoreAdamW8bit's form — the raw tensors when this layout saved them, else quantized in
    this rank's blocks (fp32 below min_8bit_size)."""
    if not _is_8bit(opt):
        return {k: v.clone() for k, v in logical.items()}
    m = logical["exp_avg"]
    out = _fresh_8bit(opt, group, tuple(m.shape), m.device)
    for key, (sk, ak, signed) in _8BIT_KEYS.items():
        if out[sk].dtype != torch.uint8:
            out[sk].copy_(logical[key])
        elif sk in raw:
            out[sk].copy_(raw[sk])
            out[ak].copy_(raw[ak])
        else:
            out[sk], out[ak] = _quantize(logical[key], signed)
    return out


# ------------------------------------------------------------------------------- save
def dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """{"model": ..., "optim": ...} for torch.distributed.checkpoint.save.

    Optimizer state is keyed by parameter FQN; the logical moments of row-sharded
    parameters become DTensors (so a checkpoint saved on W ranks loads on any other W'),
    projectors and counters are replicated plain tensors; GaLoreAdamW8bit adds its raw
    per-layout codes (see the module docstring).
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
            name = fqn[id(p)]
            sharded = row_shard_info(p) is not None
            for key, value in state.items():
                if key not in _MOMENT_STATE_KEYS:
                    optim[f"{name}.{key}"] = value if torch.is_tensor(value) else _as_tensor(value)
            logical, raw = _moments_out(opt, state)
            for key, value in logical.items():
                optim[f"{name}.{key}"] = _row_dtensor(value, p) if sharded else value
            for key, value in raw.items():
                optim[_raw_key(name, key, p)] = value
    return {"model": get_model_state_dict(model), "optim": optim}


# ------------------------------------------------------------------------------- load
def _placeholder_state(opt, p: torch.Tensor, group: dict) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """(zero tensors shaped like the state `p` will have, logical moments included: what DCP
    loads into, on the parameter's device; the local moment shape)."""
    info = row_shard_info(p)
    shape = tuple(p.shape)
    local = _local(p)
    device = local.device
    st: dict[str, torch.Tensor] = {"step": torch.tensor(_MISSING, dtype=torch.int64)}
    if "rank" in group:
        r = group["rank"]
        side = "right" if info is not None else pj.choose_side(shape, group["proj_type"])
        st["proj"] = torch.zeros((r, shape[1]) if side == "right" else (shape[0], r),
                                 dtype=pj.storage_dtype(p.dtype), device=device)
        st["proj_right"] = torch.tensor(side == "right")
        st["refresh_offset"] = torch.tensor(0, dtype=torch.int64)
        moment_local = (local.shape[0], r) if side == "right" else (r, shape[1])
    else:
        moment_local = tuple(local.shape)
    for key, (local_shape, row_sharded) in _rule_state_shapes(opt, group, moment_local).items():
        t = torch.zeros(local_shape, device=device)
        st[key] = _row_dtensor(t, p) if row_sharded and info is not None else t
    return st, moment_local


def _raw_placeholders(opt, p: torch.Tensor, group: dict, moment_shape: tuple[int, ...],
                      name: str, saved: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """This rank's raw 8-bit tensors to read: only when it keeps 8-bit codes and the
    checkpoint has them for its layout with the same shapes (a same-world-size resume)."""
    if not _is_8bit(opt):
        return {}
    fresh = _fresh_8bit(opt, group, moment_shape, _local(p).device)
    if fresh["state1"].dtype != torch.uint8:
        return {}
    if all(saved.get(f"optim.{_raw_key(name, k, p)}") == v.shape for k, v in fresh.items()):
        return fresh
    return {}


def _saved_tensor_shapes(checkpoint_id: CheckpointId) -> dict[str, torch.Size]:
    """Flattened key ("optim.<key>") -> shape of every tensor in the checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(checkpoint_id).read_metadata()
    return {k: v.size for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def dcp_load(model: torch.nn.Module, opt, checkpoint_id: CheckpointId) -> None:
    """Load a checkpoint written by `dcp_state_dict` + dcp.save, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _check_dcp_support(opt)
    saved = _saved_tensor_shapes(checkpoint_id) if _is_8bit(opt) else {}
    fqn = {id(p): name for name, p in model.named_parameters()}
    optim: dict[str, Any] = {}
    holders = []
    for gi, group in enumerate(opt.param_groups):
        optim[f"group{gi}.lr"] = torch.tensor(0.0, dtype=torch.float64)
        for p in group["params"]:
            name = fqn[id(p)]
            st, moment_shape = _placeholder_state(opt, p, group)
            raw = _raw_placeholders(opt, p, group, moment_shape, name, saved)
            holders.append((p, group, st, raw))
            for key, value in st.items():
                optim[f"{name}.{key}"] = value
            for key, value in raw.items():
                optim[_raw_key(name, key, p)] = value
    msd = get_model_state_dict(model)
    sd = {"model": msd, "optim": optim}
    dcp.load(sd, checkpoint_id=checkpoint_id,
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, sd["model"])
    optim = sd["optim"]
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = float(optim[f"group{gi}.lr"])
    for p, group, st, raw in holders:
        name = fqn[id(p)]
        step = int(optim[f"{name}.step"])
        if step == _MISSING:
            opt.state.pop(p, None)
            continue
        new: dict[str, Any] = {}
        logical: dict[str, torch.Tensor] = {}
        for key in st:
            v = _local(optim[f"{name}.{key}"])
            if key in ROW_SHARDED_KEYS:
                logical[key] = v
            else:
                new[key] = _from_tensor(v) if key in _SCALAR_KEYS else v.clone()
        loaded_raw = {key: optim[_raw_key(name, key, p)] for key in raw}
        new.update(_moments_in(opt, group, logical, loaded_raw))
        opt.state[p] = new
