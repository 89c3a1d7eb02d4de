"""torch.distributed.checkpoint for the FSDP2 GaLore optimizers: save on W ranks, load on W'.

Optimizer state is keyed by parameter FQN and holds the LOGICAL moments: row blocks of a
row-sharded parameter (m_i x r for right-projected GaLore matrices, the local shard's shape
otherwise) are saved as DTensors split like it, so DCP reshards them: Adam's fp32 "exp_avg"
and "exp_avg_sq", Adafactor's "exp_avg", per-row "exp_avg_sq_row" and vector "exp_avg_sq".
Projectors, counters, Adafactor's column statistic "exp_avg_sq_col" and "RMS" (equal on
every rank: computed from all-reduced sums) are replicated plain tensors.

GaLoreAdamW and GaLoreAdafactor save their moments as they are. GaLoreAdamW8bit's uint8
codes have one absmax per 256 values of the rank's LOCAL flattened moment, so they are not
row blocks of one tensor: each rank saves its own state tensors as they are (codes and absmax,
or fp32 below min_8bit_size), under keys naming its shard ("<fqn>.state1@shard0of2"), 2 bytes
per moment entry as in memory. HSDP replicas share a key (same state), so DCP writes it once.
A loading rank with the same shard layout and form installs them unchanged (a resume on the
same world size is bit-identical). Otherwise it reads the saved shards that overlap its rows
(torch.chunk fixes every shard's rows), dequantizes them with their own blocks, keeps its
rows, and quantizes those in its own blocks (or keeps fp32 below min_8bit_size: the
optimizer's rule, so a tensor may switch form with the world size); its moments are then the
saved ones to within one code step per block. Re-quantizing is not the identity, which is
why the same layout keeps the raw codes: the signed map (first moment) has +1 but no -1, so a
block whose largest |m| is negative would come back with absmax x 0.993. Either optimizer's
checkpoint loads into the other: the Adam moments are read the same way from either form.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Union

import torch

from galore_ds import projector as pj
from galore_ds.distributed.common import chunk_rows
from galore_ds.distributed.fsdp import row_shard_info
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import _BLOCKSIZE, GaLoreAdamW8bit, _qmap
from galore_ds.optim.base import local_tensor

#: the logical moments (row blocks of a row-sharded parameter): what the checkpoint holds
ROW_SHARDED_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row")
#: GaLoreAdamW8bit's form of each logical moment: (codes or fp32 key, absmax key, signed map)
_8BIT_KEYS = {"exp_avg": ("state1", "absmax1", True), "exp_avg_sq": ("state2", "absmax2", False)}
_8BIT_STATE_KEYS = frozenset(k for v in _8BIT_KEYS.values() for k in v[:2])
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


def _shard_of(p: torch.Tensor) -> tuple[int, int]:
    """(this rank's shard index, shard count) of parameter `p`: (0, 1) when not row-sharded."""
    info = row_shard_info(p)
    return (0, 1) if info is None else (info[1], info[2])


def _shard_key(name: str, key: str, shard: int, shards: int) -> str:
    """Key of one shard's own 8-bit state tensor ("mlp.w.state1@shard0of2")."""
    return f"{name}.{key}@shard{shard}of{shards}"


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


def _fresh_8bit(opt, group: dict, moment_shape: tuple[int, ...], device: torch.device) -> dict:
    """Zero moments in the form the optimizer itself gives this rank's tensor (its own
    min_8bit_size rule, not a copy of it)."""
    fresh: dict[str, torch.Tensor] = {}
    type(opt)._init_moments(fresh, torch.empty(moment_shape, device=device), group)
    return fresh


def _moments_in(opt, group: dict, moment_shape: tuple[int, ...], device: torch.device,
                logical: dict[str, torch.Tensor], raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer state from the loaded moments: this layout's own 8-bit tensors as they were
    (`raw`), else the logical fp32 moments as they are (GaLoreAdamW) or in GaLoreAdamW8bit's
    form for this rank: quantized in its own blocks, fp32 below min_8bit_size."""
    if raw:
        return {k: v.clone() for k, v in raw.items()}
    if not _is_8bit(opt):
        return {k: v.clone() for k, v in logical.items()}
    out = _fresh_8bit(opt, group, moment_shape, device)
    for key, (sk, ak, signed) in _8BIT_KEYS.items():
        if out[sk].dtype != torch.uint8:
            out[sk].copy_(logical[key])
        else:
            out[sk], out[ak] = _quantize(logical[key], signed)
    return out


# ------------------------------------------------------------------------------- save
def dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """{"model": ..., "optim": ...} for torch.distributed.checkpoint.save.

    Optimizer state is keyed by parameter FQN; the logical moments of row-sharded
    parameters become DTensors (so a checkpoint saved on W ranks loads on any other W'),
    projectors and counters are replicated plain tensors; GaLoreAdamW8bit's state tensors
    are saved per shard, as they are (see the module docstring).
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
            shard, shards = _shard_of(p)
            for key, value in state.items():
                if key in _8BIT_STATE_KEYS:
                    optim[_shard_key(name, key, shard, shards)] = value
                elif key in ROW_SHARDED_KEYS:
                    optim[f"{name}.{key}"] = _row_dtensor(value, p) if sharded else value
                else:
                    optim[f"{name}.{key}"] = value if torch.is_tensor(value) else _as_tensor(value)
    return {"model": get_model_state_dict(model), "optim": optim}


# ------------------------------------------------------------------------------- load
def _placeholder_state(opt, p: torch.Tensor, group: dict) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """(zero tensors shaped like the state `p` will have, logical moments included: what DCP
    loads into, on the parameter's device; the local moment shape)."""
    info = row_shard_info(p)
    shape = tuple(p.shape)
    local = local_tensor(p)
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


def _saved_tensors(checkpoint_id: CheckpointId) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Flattened key ("optim.<key>") -> (shape, dtype) of every tensor in the checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(checkpoint_id).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _saved_shard_count(name: str, saved: dict) -> int | None:
    """How many shards saved `name`'s moments in GaLoreAdamW8bit's per-shard form (None:
    saved as logical moments, or not at all)."""
    prefix = f"optim.{name}.state1@shard0of"
    return next((int(k[len(prefix):]) for k in saved if k.startswith(prefix)), None)


class _ShardReads(NamedTuple):
    """What one rank reads of a parameter's per-shard (GaLoreAdamW8bit) moments."""

    placeholders: dict[str, torch.Tensor]   # checkpoint key -> tensor DCP loads into
    shards_saved: int
    raw: dict[str, str]                     # state key -> checkpoint key of its own layout's
                                            # tensors, installed as they are (empty: re-form)
    rows: tuple[int, int] = (0, 0)          # this rank's rows [lo, hi) of the whole moment
    overlaps: tuple = ()                    # (saved shard, its first row, its end row) touching them


def _plan_shard_reads(opt, group: dict, p: torch.Tensor, name: str, moment_shape: tuple[int, ...],
                      shards_saved: int, saved: dict) -> _ShardReads:
    """This rank's own layout's state tensors when shard count, shapes and form all match
    (a same-world-size resume), else the saved shards that overlap its rows."""
    shard, shards = _shard_of(p)
    device = local_tensor(p).device
    if _is_8bit(opt) and shards_saved == shards:
        fresh = _fresh_8bit(opt, group, moment_shape, device)
        keys = {k: _shard_key(name, k, shard, shards) for k in fresh}
        if all(saved.get("optim." + keys[k]) == (v.shape, v.dtype) for k, v in fresh.items()):
            return _ShardReads({keys[k]: v for k, v in fresh.items()}, shards_saved, raw=keys)
    starts = [0]
    for k in range(shards_saved):
        starts.append(starts[-1] + saved[f"optim.{_shard_key(name, 'state1', k, shards_saved)}"][0][0])
    lo = sum(chunk_rows(p.shape[0], shards)[:shard])
    hi = lo + moment_shape[0]
    if hi > starts[-1]:
        raise ValueError(f"checkpoint: {name}'s saved moments have {starts[-1]} rows, this rank needs rows "
                         f"{lo}:{hi}; was it saved from another model or projection side?")
    overlaps, placeholders = [], {}
    for k in range(shards_saved):
        if starts[k] < hi and lo < starts[k + 1]:
            overlaps.append((k, starts[k], starts[k + 1]))
            for key in _8BIT_STATE_KEYS:
                full = f"optim.{_shard_key(name, key, k, shards_saved)}"
                if full in saved:
                    shape, dtype = saved[full]
                    placeholders[full[len("optim."):]] = torch.empty(shape, dtype=dtype, device=device)
    return _ShardReads(placeholders, shards_saved, raw={}, rows=(lo, hi), overlaps=tuple(overlaps))


def _assemble_rows(name: str, plan: _ShardReads, loaded: dict[str, torch.Tensor],
                   moment_shape: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's rows of each logical moment, from the saved shards that overlap them (each
    dequantized with its own blocks)."""
    lo, hi = plan.rows
    out = {}
    for key, (sk, ak, signed) in _8BIT_KEYS.items():
        pieces = []
        for k, start, stop in plan.overlaps:
            values = loaded[_shard_key(name, sk, k, plan.shards_saved)]
            if values.dtype == torch.uint8:
                values = _dequantize(values, loaded[_shard_key(name, ak, k, plan.shards_saved)], signed)
            pieces.append(values[max(lo, start) - start:min(hi, stop) - start])
        out[key] = torch.cat(pieces) if pieces else torch.zeros(moment_shape, device=device)
    return out


def dcp_load(model: torch.nn.Module, opt, checkpoint_id: CheckpointId) -> None:
    """Load a checkpoint written by `dcp_state_dict` + dcp.save, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    _check_dcp_support(opt)
    saved = _saved_tensors(checkpoint_id)
    fqn = {id(p): name for name, p in model.named_parameters()}
    optim: dict[str, Any] = {}
    holders = []
    for gi, group in enumerate(opt.param_groups):
        optim[f"group{gi}.lr"] = torch.tensor(0.0, dtype=torch.float64)
        for p in group["params"]:
            name = fqn[id(p)]
            st, moment_shape = _placeholder_state(opt, p, group)
            shards_saved = None if isinstance(opt, GaLoreAdafactor) else _saved_shard_count(name, saved)
            plan = None
            if shards_saved is not None:  # Adam moments in per-shard 8-bit form
                for key in _8BIT_KEYS:
                    del st[key]
                plan = _plan_shard_reads(opt, group, p, name, moment_shape, shards_saved, saved)
                optim.update(plan.placeholders)
            holders.append((p, group, st, moment_shape, plan))
            for key, value in st.items():
                optim[f"{name}.{key}"] = value
    sd = {"model": get_model_state_dict(model), "optim": optim}
    dcp.load(sd, checkpoint_id=checkpoint_id,
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, sd["model"])
    optim = sd["optim"]
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = float(optim[f"group{gi}.lr"])
    for p, group, st, moment_shape, plan in holders:
        name = fqn[id(p)]
        step = int(optim[f"{name}.step"])
        if step == _MISSING:
            opt.state.pop(p, None)
            continue
        new: dict[str, Any] = {}
        logical: dict[str, torch.Tensor] = {}
        for key in st:
            v = local_tensor(optim[f"{name}.{key}"])
            if key in ROW_SHARDED_KEYS:
                logical[key] = v
            else:
                new[key] = _from_tensor(v) if key in _SCALAR_KEYS else v.clone()
        raw: dict[str, torch.Tensor] = {}
        device = local_tensor(p).device
        if plan is not None and plan.raw:
            raw = {state_key: optim[key] for state_key, key in plan.raw.items()}
        elif plan is not None:
            loaded = {k: optim[k] for k in plan.placeholders}
            logical.update(_assemble_rows(name, plan, loaded, moment_shape, device))
        new.update(_moments_in(opt, group, moment_shape, device, logical, raw))
        opt.state[p] = new
