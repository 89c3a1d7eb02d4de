"""Where each state tensor lies in its logical tensor, the part of a checkpoint that does not
depend on the world size; shared by every format in this package and by the optimizers'
state_dict (optim/step.py).

Every state tensor of a parameter is a block of one LOGICAL tensor (`place`):
  - the moments of a GaLore matrix are blocks of the moments of the whole R (m x r right, r x n
    left): rows when a rank holds rows of R, columns when it holds columns, whole otherwise;
  - the moments of another parameter are blocks of a tensor shaped like it (a DeepSpeed ZeRO
    piece of a flat partition: a range of the flattened parameter);
  - Adafactor's row statistic follows R's rows, its column statistic R's columns;
  - projectors, counters and RMS are whole (the same on every rank that holds them).
A quantized rule's codes (core/rule.py, QuantizedRule) have one scale per block of the rank's
OWN moment block, so they are not blocks of one tensor: `as_values` gives its moments as their
fp32 values, which are; the formats that keep the codes themselves key them per shard
(`shard_key`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from galore_ds.optim.entry import Entry

SCALAR_KEYS = ("step", "refresh_offset", "proj_right")


@dataclass(frozen=True)
class Place:
    """Where a rank's state tensor lies in its logical tensor."""

    shape: tuple[int, ...]   # the logical tensor's shape
    dim: int | None          # split dimension (None: whole)
    start: int = 0           # offset of the rank's block along `dim`


def low_place(e: Entry) -> Place:
    """Where this rank's block of a parameter's moments lies: R for GaLore matrices, the
    parameter itself (flattened, for a ZeRO piece) for the others."""
    lay = e.layout
    if e.galore:
        r, (m, n) = e.group["rank"], lay.shape
        if e.side == "right":
            return Place((m, r), 0, lay.rows[0]) if lay.group is not None and lay.split_dim == 0 else Place((m, r), None)
        return Place((r, n), 1, lay.cols[0]) if lay.group is not None and lay.split_dim == 1 else Place((r, n), None)
    if lay.piece is not None and not _rows_kept(e):
        return Place((lay.numel,), 0, lay.piece.start) if lay.group is not None else Place((lay.numel,), None)
    if lay.group is None:
        return Place(lay.shape, None)
    start = lay.rows[0] if lay.split_dim == 0 else lay.cols[0]
    return Place(lay.shape, lay.split_dim, start)


def _rows_kept(e: Entry) -> bool:
    """Whether the entry's non-GaLore state is kept as 2-D rows (Adafactor) or flat (Adam)."""
    return e.p_local.dim() == 2


def place(e: Entry, key: str, value: torch.Tensor) -> Place:
    """Where state tensor `key` of entry `e` lies (see the module docstring)."""
    low = low_place(e)
    follows = e.state_layout.get(key)   # the rule's declaration (core/rule.py: state_layout)
    if follows == "grad":
        return low
    if follows == "rows":
        shape = low.shape[:-1]
        return Place(shape, 0, low.start) if low.dim == 0 else Place(shape, None)
    if follows == "cols":
        shape = low.shape[:-2] + low.shape[-1:]
        return Place(shape, 0, low.start) if low.dim == 1 else Place(shape, None)
    return Place(tuple(value.shape), None)  # whole: proj, counters, RMS, a limiter's norm


def span(e: Entry, logical: Place, dim: int) -> tuple[int, int]:
    """This rank's range of the logical tensor along `dim` (all of it when not split there)."""
    if logical.dim != dim:
        return 0, logical.shape[dim]
    lay = e.layout
    rng = lay.rows if dim == 0 and lay.split_dim == 0 else lay.cols
    if lay.piece is not None and not e.galore and not _rows_kept(e):
        rng = (lay.piece.start, lay.piece.end)
    return logical.start, logical.start + (rng[1] - rng[0])


def low_shape(e: Entry) -> tuple[int, ...]:
    """The shape of this rank's block of the parameter's moments (at `low_place`)."""
    low = low_place(e)
    local = list(low.shape)
    if low.dim is not None:
        lo, hi = span(e, low, low.dim)
        local[low.dim] = hi - lo
    return tuple(local)


def block_of(logical: torch.Tensor, where: Place, e: Entry) -> torch.Tensor:
    """This rank's block of a whole logical tensor that lies at `where`."""
    if where.dim is None:
        return logical
    lo, hi = span(e, where, where.dim)
    return logical.narrow(where.dim, where.start, hi - lo)


# --------------------------------------------------------------------- a quantized rule's codes
def quantized_keys(rule) -> frozenset[str]:
    """The state keys of a quantized rule's codes and their scales (none for another rule)."""
    return frozenset(rule.code_keys + rule.scale_keys) if rule.quantized else frozenset()


def holds_codes(rule, state: dict[str, Any]) -> bool:
    """Whether `state` holds a quantized rule's moments in their quantized form."""
    return rule.quantized and rule.code_keys[0] in state


def as_values(rule, state: dict[str, Any]) -> dict[str, Any]:
    """`state` with a quantized rule's codes replaced by the moments' fp32 values (blocks of
    their logical tensors, which DCP reshards); any other state as it is."""
    if not holds_codes(rule, state):
        return state
    codes = quantized_keys(rule)
    return {**{k: v for k, v in state.items() if k not in codes}, **rule.to_values(state)}


def shard_key(name: str, key: str, shard: int, shards: int) -> str:
    """The checkpoint key of one rank's quantized codes (or scales) as they are."""
    return f"{name}.{key}@shard{shard}of{shards}"


def shard_of(e: Entry) -> tuple[int, int]:
    """(this rank's shard of the parameter, how many shards its layout splits it into)."""
    lay = e.layout
    if lay.group is None:
        return 0, 1
    return lay.rank_in_group, len(lay.counts)


# --------------------------------------------------------------------- DTensor blocks
def _dtensor_like(local: torch.Tensor, param: torch.Tensor, where: Place) -> torch.Tensor:
    """`local` as a DTensor block of its logical tensor, split like `param` along where.dim."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    # (type, not isinstance: _StridedShard is a Shard subclass the layouts refuse)
    placements = [Shard(where.dim) if type(pl) is Shard else Replicate() for pl in param.placements]
    stride, acc = [], 1
    for d in reversed(where.shape):
        stride.insert(0, acc)
        acc *= d
    return DTensor.from_local(local.contiguous(), param.device_mesh, placements, run_check=False,
                              shape=torch.Size(where.shape), stride=tuple(stride))


def dtensor_block(e: Entry, key: str, value: torch.Tensor) -> torch.Tensor:
    """State tensor `key` of entry `e` as DCP should see it: a DTensor block of its logical
    tensor when the rank holds a split part of it, else the tensor itself (whole, the same on
    every rank that holds it)."""
    where = place(e, key, value)
    split = where.dim is not None and e.layout.group is not None
    return _dtensor_like(value, e.param, where) if split else value


# --------------------------------------------------------------------- names and entries
def named_entries(opt, names: dict[int, str] | None = None) -> Iterator[tuple[str, Entry]]:
    """(name, Entry) of every parameter this rank keeps state for. Names come from the
    groups' `param_names` (galore_ds.param_groups writes them), else `names` (id(param) ->
    name), else the parameter's index; ZeRO pieces are named by their state key (DeepSpeed's
    group and position: the same on every world size)."""
    if opt.zero is not None:  # ZeRO-3 empties param_groups between its per-sub-group steps
        for ft in opt.zero.flats.values():
            group = opt.param_groups[ft.group_index]
            for seg in ft.segments:
                if seg.layout is not None and seg.key in opt.state:
                    yield seg.key, opt.entry(seg.key, ft.flat, seg.layout, group, seg.index, seg.pos,
                                             seg.n_in_group, None)
        return
    for group in opt.param_groups:
        pnames = group.get("param_names")
        for pos, p in enumerate(group["params"]):
            if p not in opt.state:
                continue
            if pnames is not None:
                name = pnames[pos]
            elif names is not None and id(p) in names:
                name = names[id(p)]
            else:
                name = f"param{opt.param_index(p)}"
            yield name, opt.entry(p, p, opt.layout_of(p), group, opt.param_index(p), pos,
                                  len(group["params"]), None)


# --------------------------------------------------------------------- tensors <-> values
def lr_tensor(lr: float | torch.Tensor | None) -> torch.Tensor:
    """A group's lr for DCP: NaN stands for None (GaLoreAdafactor's relative step)."""
    return torch.tensor(float("nan") if lr is None else float(lr), dtype=torch.float64)


def lr_value(t: torch.Tensor) -> float | None:
    value = float(t)
    return None if math.isnan(value) else value


def as_tensor(value: Any) -> torch.Tensor:
    """A scalar state value (bool, int, float) as the 0-d tensor DCP stores."""
    if isinstance(value, bool):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    return torch.tensor(float(value), dtype=torch.float64)


def from_tensor(t: torch.Tensor) -> Any:
    """Inverse of `as_tensor`."""
    if t.dtype == torch.bool:
        return bool(t)
    if t.dtype == torch.int64:
        return int(t)
    return float(t)


__all__ = ["Place", "low_place", "place", "low_shape", "span", "block_of", "quantized_keys", "holds_codes",
           "as_values", "shard_key", "shard_of", "dtensor_block", "named_entries", "lr_tensor", "lr_value",
           "as_tensor", "from_tensor", "SCALAR_KEYS"]
