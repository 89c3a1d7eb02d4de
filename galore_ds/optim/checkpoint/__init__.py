"""Optimizer state that does not depend on the world size: save on W ranks, load on W'.

Every state tensor of a parameter is a piece of one LOGICAL tensor (`place`):
  - the moments of a GaLore matrix are blocks of the moments of the whole R (m x r right, r x n
    left): rows when a rank holds rows of R, columns when it holds columns, whole otherwise;
  - the moments of another parameter are blocks of a tensor shaped like it (a DeepSpeed ZeRO
    piece of a flat partition: a range of the flattened parameter);
  - Adafactor's row statistic follows R's rows, its column statistic R's columns;
  - projectors, counters and RMS are whole (the same on every rank that holds them).
GaLoreAdamW8bit's codes have one absmax per 256 values of the rank's OWN moment block, so
they are not blocks of one tensor: each rank saves its codes as they are (2 bytes per entry,
as in memory) with where its block lies. A rank with the same block and form installs them
unchanged (a resume on the same world size is bit-identical); otherwise it dequantizes the
saved blocks that overlap its own, each with its own absmax, and quantizes its block in its
own blocks (within one code step: the signed map has +1 but no -1, so re-quantizing is not
the identity, which is why the same layout keeps the raw codes).

Ways to write it:
- `dcp_state_dict` / `dcp_load` (FSDP2 and plain layouts): torch.distributed.checkpoint, the
  logical blocks as DTensors split like their parameter, so DCP reshards them;
- `optim_state_dict` / `load_optim_state_dict` (torchtitan's flat form, and the optimizers'
  own state_dict under FSDP2): the same blocks, with GaLoreAdamW8bit's moments as their fp32
  values, which the loader quantizes back (`eight_bit_exact_form`: bit-exact where its
  blocks are the saver's, within one code step elsewhere), so DCP reshards them too;
- `save_pieces` / `load_pieces` (any layout, DeepSpeed ZeRO's arbitrary ranges included): one
  file per rank, `galore_state_rank<r>.pt` (torch.load(weights_only=True)), read with mmap
  and assembled into whatever block the loading rank holds.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from galore_ds.core import projector as pj
from galore_ds.core.adamw8bit import BLOCKSIZE, bnb_functional, init_moments, qmap
from galore_ds.layouts.base import local_tensor
from galore_ds.optim.entry import Entry

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
#: GaLoreAdamW8bit's form of each Adam moment: (codes or fp32 key, absmax key, signed map)
EIGHT_BIT = {"exp_avg": ("state1", "absmax1", True), "exp_avg_sq": ("state2", "absmax2", False)}
EIGHT_BIT_KEYS = frozenset(k for v in EIGHT_BIT.values() for k in v[:2])
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
    if key in ADAM_KEYS or key in EIGHT_BIT_KEYS:
        return low
    if key == "exp_avg_sq_row":  # follows R's rows
        shape = low.shape[:-1]
        return Place(shape, 0, low.start) if low.dim == 0 else Place(shape, None)
    if key == "exp_avg_sq_col":  # follows R's columns
        shape = low.shape[:-2] + low.shape[-1:]
        return Place(shape, 0, low.start) if low.dim == 1 else Place(shape, None)
    if key == "exp_avg_sq":      # Adafactor's vector statistic: like the vector
        return low
    return Place(tuple(value.shape), None)  # proj, RMS, counters


def local_slice(p: Place, length: int) -> slice:
    return slice(p.start, p.start + length)


# --------------------------------------------------------------------- 8-bit <-> dense
def dequantize(codes: torch.Tensor, absmax: torch.Tensor | None, signed: bool) -> torch.Tensor:
    """The fp32 values of an 8-bit moment block (fp32 blocks come back as they are)."""
    bnbf = bnb_functional()
    if codes.dtype != torch.uint8:
        return codes.float()
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return bnbf.dequantize_blockwise(codes, absmax=absmax, code=qmap(codes.device, signed), blocksize=BLOCKSIZE)


def eight_bit_form(values: dict[str, torch.Tensor], group: dict, shape: tuple[int, ...],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """GaLoreAdamW8bit's state for a dense block of the Adam moments: quantized in this
    rank's blocks, or fp32 below min_8bit_size (the optimizer's own rule)."""
    bnbf = bnb_functional()
    out: dict[str, torch.Tensor] = {}
    init_moments(out, torch.empty(shape, device=device), group)
    for key, (sk, ak, signed) in EIGHT_BIT.items():
        x = values[key].float().contiguous().reshape(shape).to(device)
        if out[sk].dtype != torch.uint8:
            out[sk].copy_(x)
        elif x.numel():
            out[sk], qs = bnbf.quantize_blockwise(x, code=qmap(device, signed), blocksize=BLOCKSIZE)
            out[ak] = qs.absmax
    return out


def dense_8bit(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 values of GaLoreAdamW8bit's two moments (`exp_avg`, `exp_avg_sq`) from its
    state (8-bit codes with their absmax, or fp32 blocks below min_8bit_size)."""
    return {key: dequantize(state[sk], state.get(ak), signed) for key, (sk, ak, signed) in EIGHT_BIT.items()}


def _nearest_code(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Index of the entry of the sorted map `q` nearest to each value of `v` (uint8)."""
    idx = torch.searchsorted(q, v.contiguous()).clamp_(1, q.numel() - 1)
    lo, hi = q[idx - 1], q[idx]
    return torch.where(v - lo <= hi - v, idx - 1, idx).to(torch.uint8)


def _exact_codes(values: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """8-bit codes and per-block absmax that dequantize to exactly `values`, or None.

    Values an 8-bit state of this rank's block boundaries dequantized to have, per block of
    256, absmax = |peak| / |q[peak code]|: 1.0 when the peak is positive (or any value of the
    unsigned map), the signed map's most negative entry when it is negative (the map has +1
    but no -1). Each candidate (and its fp32 neighbours) is checked through bitsandbytes'
    own dequantization: only a bit-exact match is used, and an equal dequantization is the
    same state for every later update (the kernel reads the moments only dequantized)."""
    q = qmap(values.device, signed)
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // BLOCKSIZE)
    if n == 0:
        return torch.zeros(values.shape, dtype=torch.uint8, device=values.device), flat.new_zeros(0)
    padded = flat.new_zeros(blocks * BLOCKSIZE)
    padded[:n] = flat
    rows = padded.view(blocks, BLOCKSIZE)
    peak = rows.abs().amax(dim=1)
    candidates = [peak]
    if signed:
        base = peak / q[0].abs()
        inf, zero = torch.full_like(base, float("inf")), torch.zeros_like(base)
        up, down = torch.nextafter(base, inf), torch.nextafter(base, zero)
        candidates += [base, up, down, torch.nextafter(up, inf), torch.nextafter(down, zero)]
    codes = torch.zeros(blocks, BLOCKSIZE, dtype=torch.uint8, device=values.device)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=values.device)
    found = torch.zeros(blocks, dtype=torch.bool, device=values.device)
    for a in candidates:
        scaled = torch.where(a[:, None] > 0, rows / a[:, None].clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        c = _nearest_code(q, scaled)
        back = dequantize(c.reshape(-1)[:n].reshape(values.shape), a, signed).reshape(-1)
        back_rows = flat.new_zeros(blocks * BLOCKSIZE)
        back_rows[:n] = back
        ok = (back_rows.view(blocks, BLOCKSIZE) == rows).all(dim=1) & ~found
        codes[ok], absmax[ok] = c[ok], a[ok]
        found |= ok
        if bool(found.all()):
            return codes.reshape(-1)[:n].reshape(values.shape), absmax
    return None


def eight_bit_exact_form(values: dict[str, torch.Tensor], group: dict, shape: tuple[int, ...],
                         device: torch.device) -> dict[str, torch.Tensor]:
    """`eight_bit_form`, bit-exact where it can be: a moment whose fp32 values are what 8-bit
    blocks with this rank's boundaries dequantize to (the saver's block is this one: a resume
    on the same layout) gets codes and absmax that dequantize to exactly those values;
    otherwise it is quantized in this rank's blocks (within one code step of the saved
    values, the stated 8-bit tolerance)."""
    out = eight_bit_form(values, group, shape, device)
    for key, (sk, ak, signed) in EIGHT_BIT.items():
        if out[sk].dtype == torch.uint8 and out[sk].numel():
            exact = _exact_codes(values[key].float().reshape(shape).to(device), signed)
            if exact is not None:
                out[sk], out[ak] = exact
    return out


def _lr_tensor(lr: float | torch.Tensor | None) -> torch.Tensor:
    """A group's lr for DCP: NaN stands for None (GaLoreAdafactor's relative step)."""
    return torch.tensor(float("nan") if lr is None else float(lr), dtype=torch.float64)


def _lr_value(t: torch.Tensor) -> float | None:
    value = float(t)
    return None if math.isnan(value) else value


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, bool):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    return torch.tensor(float(value), dtype=torch.float64)


def _from_tensor(t: torch.Tensor) -> Any:
    if t.dtype == torch.bool:
        return bool(t)
    if t.dtype == torch.int64:
        return int(t)
    return float(t)


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


# --------------------------------------------------------------------- DCP (DTensor layouts)
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


def _shard_key(name: str, key: str, shard: int, shards: int) -> str:
    return f"{name}.{key}@shard{shard}of{shards}"


def _shard_of(e: Entry) -> tuple[int, int]:
    lay = e.layout
    if lay.group is None:
        return 0, 1
    return lay.rank_in_group, len(lay.counts)


def dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """{"model": ..., "optim": ...} for torch.distributed.checkpoint.save (see the module
    docstring): state keyed by parameter name, blocks of split logical tensors as DTensors,
    GaLoreAdamW8bit's codes per shard as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    return {"model": get_model_state_dict(model), "optim": optim_state_dict(opt, names, raw_8bit=True)}


def optim_state_dict(opt, names: dict[int, str] | None = None, prefix: str = "",
                     raw_8bit: bool = False) -> dict[str, Any]:
    """The optimizer's state as a flat dict DCP saves and reshards (every key starts with
    `prefix`, so several optimizers' dicts can share one checkpoint): torchtitan's form
    (load_optim_state_dict), and with raw_8bit the optimizer part of `dcp_state_dict`.
    GaLoreAdamW8bit's moments: their fp32 values as blocks of the logical moments (any world
    size; load_optim_state_dict quantizes them back, bit-identically on the same layout), or
    with raw_8bit each shard's codes as they are (dcp_load re-forms them itself)."""
    dense = not raw_8bit and opt.rule.quantized
    # delayed clipping's carried coefficient: optimizer-wide, the same on every rank
    optim: dict[str, Any] = {f"{prefix}next_clip_coef": torch.tensor(float(opt.next_clip_coef), dtype=torch.float64)}
    for gi, group in enumerate(opt.param_groups):
        optim[f"{prefix}group{gi}.lr"] = _lr_tensor(group["lr"])
    for name, e in named_entries(opt, names):
        shard, shards = _shard_of(e)
        state = e.state
        if dense and "state1" in state:
            state = {**{k: v for k, v in state.items() if k not in EIGHT_BIT_KEYS}, **dense_8bit(state)}
        for key, value in state.items():
            if not torch.is_tensor(value):
                optim[f"{prefix}{name}.{key}"] = _as_tensor(value)
            elif key in EIGHT_BIT_KEYS:
                optim[prefix + _shard_key(name, key, shard, shards)] = value
            else:
                optim[f"{prefix}{name}.{key}"] = dtensor_block(e, key, value)
    return optim


def dtensor_block(e: Entry, key: str, value: torch.Tensor) -> torch.Tensor:
    """State tensor `key` of entry `e` as DCP should see it: a DTensor block of its logical
    tensor when the rank holds a split part of it, else the tensor itself (whole, the same on
    every rank that holds it)."""
    where = place(e, key, value)
    split = where.dim is not None and e.layout.group is not None
    return _dtensor_like(value, e.param, where) if split else value


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
    opt.next_clip_coef = float(optim[f"{prefix}next_clip_coef"])
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = _lr_value(optim[f"{prefix}group{gi}.lr"])
    for name, e in named_entries(opt, names):
        shard, shards = _shard_of(e)
        new: dict[str, Any] = {}
        dense = "state1" in e.state and f"{prefix}{name}.exp_avg" in optim   # 8-bit moments as fp32 values
        for key, value in e.state.items():
            if not torch.is_tensor(value):
                new[key] = _from_tensor(optim[f"{prefix}{name}.{key}"])
            elif key in EIGHT_BIT_KEYS:
                if not dense:
                    new[key] = optim[prefix + _shard_key(name, key, shard, shards)].clone()
            else:
                new[key] = local_tensor(optim[f"{prefix}{name}.{key}"]).clone()
        if dense:
            values = {k: local_tensor(optim[f"{prefix}{name}.{k}"]) for k in ADAM_KEYS}
            new.update(eight_bit_exact_form(values, e.group, tuple(values["exp_avg"].shape), e.p_local.device))
        opt.state[e.key] = new


def _rule_keys(opt, e: Entry) -> dict[str, tuple[int, ...]]:
    """{state key: local shape} of the state the rule keeps for this entry's block."""
    low = low_place(e)
    local = list(low.shape)
    if low.dim is not None:
        lay = e.layout
        if e.galore or lay.piece is None or _rows_kept(e):
            span = lay.rows if (low.dim == 0) else lay.cols
        else:
            span = (lay.piece.start, lay.piece.end)
        local[low.dim] = span[1] - span[0]
    return opt.rule.state_shapes(tuple(local), e.group)


def _saved_tensors(checkpoint_id: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(checkpoint_id).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def dcp_load(model: torch.nn.Module, opt, checkpoint_id: str) -> None:
    """Load a checkpoint written by `dcp_state_dict` + dcp.save, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    saved = _saved_tensors(checkpoint_id)
    names = {id(p): n for n, p in model.named_parameters()}
    eight_bit = opt.rule.quantized
    optim: dict[str, Any] = {f"group{gi}.lr": torch.tensor(0.0, dtype=torch.float64)
                             for gi in range(len(opt.param_groups))}
    optim["next_clip_coef"] = torch.tensor(1.0, dtype=torch.float64)  # (1.0: a checkpoint from before it was saved)
    plans = []
    for name, e in _all_entries(opt, names):
        device = e.p_local.device
        st: dict[str, torch.Tensor] = {"step": torch.tensor(-1, dtype=torch.int64)}
        if e.galore:
            m, n = e.layout.shape
            r = e.group["rank"]
            st["proj"] = pj.stored_layout(torch.zeros((r, n) if e.side == "right" else (m, r),
                                                      dtype=pj.storage_dtype(e.p_local.dtype), device=device))
            st["proj_right"] = torch.tensor(e.side == "right")
            st["refresh_offset"] = torch.tensor(0, dtype=torch.int64)
        keys = _rule_keys(opt, e)
        raw: dict[str, str] = {}
        reads = None
        shards_saved = _saved_shards(name, saved) if eight_bit else None
        if shards_saved is not None:
            raw, reads = _plan_8bit(opt, e, name, keys["exp_avg"], shards_saved, saved, optim)
            keys = {}
        for key, shape in keys.items():
            # the saved dtype: the rule keeps some moments in the weights' dtype (AdamW's on a
            # bf16 norm), and a moment that comes back in another dtype rounds differently
            dtype = saved.get(f"optim.{name}.{key}", (None, torch.float32))[1]
            st[key] = dtensor_block(e, key, torch.zeros(shape, device=device, dtype=dtype))
        for key, value in st.items():
            optim[f"{name}.{key}"] = value
        plans.append((name, e, st, raw, reads, shards_saved))
    sd = {"model": get_model_state_dict(model), "optim": optim}
    dcp.load(sd, checkpoint_id=checkpoint_id, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, sd["model"])
    optim = sd["optim"]
    opt.next_clip_coef = float(optim["next_clip_coef"])
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = _lr_value(optim[f"group{gi}.lr"])
    for name, e, st, raw, reads, shards_saved in plans:
        if int(optim[f"{name}.step"]) == -1:
            opt.state.pop(e.key, None)
            continue
        new: dict[str, Any] = {}
        for key in st:
            v = optim[f"{name}.{key}"]
            v = local_tensor(v)
            new[key] = _from_tensor(v) if key in SCALAR_KEYS else v.clone()
        if raw:
            new.update({k: optim[v].clone() for k, v in raw.items()})
        elif shards_saved is not None:
            dense = _assemble_8bit(e, name, optim, reads, shards_saved)
            new.update(eight_bit_form(dense, e.group, dense["exp_avg"].shape, e.p_local.device))
        opt.state[e.key] = new


def _all_entries(opt, names: dict[int, str]) -> Iterator[tuple[str, Entry]]:
    """(name, Entry) of every parameter, state or not (a loading optimizer has none yet)."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state.setdefault(p, {})
    yield from named_entries(opt, names)


def _saved_shards(name: str, saved: dict) -> int | None:
    prefix = f"optim.{name}.state1@shard0of"
    return next((int(k[len(prefix):]) for k in saved if k.startswith(prefix)), None)


def _plan_8bit(opt, e: Entry, name: str, moment: tuple[int, ...], shards_saved: int, saved: dict,
               optim: dict) -> tuple[dict[str, str], "_Reads | None"]:
    """Placeholders for the saved 8-bit shards this rank needs: its own layout's (installed as
    they are) when shard count, shapes and form match, else the saved shards that overlap its
    block (re-formed). Returns ({state key: checkpoint key} of raw tensors, reads)."""
    shard, shards = _shard_of(e)
    device = e.p_local.device
    if shards_saved == shards:
        fresh: dict[str, torch.Tensor] = {}
        init_moments(fresh, torch.empty(moment, device=device), e.group)
        keys = {k: _shard_key(name, k, shard, shards) for k in fresh}
        if all(saved.get("optim." + keys[k]) == (v.shape, v.dtype) for k, v in fresh.items()):
            optim.update({keys[k]: v for k, v in fresh.items()})
            return keys, None
    logical = low_place(e)
    shapes = [tuple(saved[f"optim.{_shard_key(name, 'state1', k, shards_saved)}"][0]) for k in range(shards_saved)]
    # the dimension the saver split the moments along: where its blocks are shorter
    saved_dim = next((d for d in range(len(logical.shape)) if shapes[0][d] != logical.shape[d]), None)
    if saved_dim is None:  # every saver held the whole tensor: one copy is enough
        starts, wanted = [0, logical.shape[0]], [0]
    else:
        starts = [0]
        for shape in shapes:
            starts.append(starts[-1] + shape[saved_dim])
        lo, hi = _span(e, logical, saved_dim)
        wanted = [k for k in range(shards_saved) if starts[k] < hi and lo < starts[k + 1]]
    for k in wanted:
        for key in EIGHT_BIT_KEYS:
            full_key = f"optim.{_shard_key(name, key, k, shards_saved)}"
            if full_key in saved:
                shape, dtype = saved[full_key]
                optim[full_key[len("optim."):]] = torch.empty(shape, dtype=dtype, device=device)
    return {}, _Reads(saved_dim, starts, wanted)


@dataclass(frozen=True)
class _Reads:
    dim: int | None      # the saver's split dimension (None: whole copies)
    starts: list[int]    # saved block offsets along it
    wanted: list[int]    # saved blocks this rank reads


def _span(e: Entry, logical: Place, dim: int) -> tuple[int, int]:
    """This rank's range of the logical tensor along `dim` (all of it when not split there)."""
    if logical.dim != dim:
        return 0, logical.shape[dim]
    lay = e.layout
    span = lay.rows if dim == 0 and lay.split_dim == 0 else lay.cols
    if lay.piece is not None and not e.galore and not _rows_kept(e):
        span = (lay.piece.start, lay.piece.end)
    return logical.start, logical.start + (span[1] - span[0])


def _assemble_8bit(e: Entry, name: str, loaded: dict, reads: "_Reads", shards_saved: int) -> dict[str, torch.Tensor]:
    """This rank's block of each Adam moment from the saved 8-bit blocks it read (each
    dequantized with its own absmax)."""
    logical = low_place(e)
    out = {}
    for key, (sk, ak, signed) in EIGHT_BIT.items():
        parts = []
        for k in reads.wanted:
            codes = loaded[_shard_key(name, sk, k, shards_saved)]
            parts.append(dequantize(codes, loaded.get(_shard_key(name, ak, k, shards_saved)), signed))
        if reads.dim is None:
            block = parts[0]
        else:
            block = torch.cat(parts, dim=reads.dim)
            lo, hi = _span(e, logical, reads.dim)
            first = reads.starts[reads.wanted[0]]
            block = block.narrow(reads.dim, lo - first, hi - lo)
        if logical.dim is not None and logical.dim != reads.dim:
            lo, hi = _span(e, logical, logical.dim)
            block = block.narrow(logical.dim, lo, hi - lo)
        out[key] = block
    return out


# --------------------------------------------------------------------- piece files (any layout)
PIECES = "galore_state_rank{rank}.pt"


def _weight_piece(e: Entry) -> tuple[torch.Tensor, int]:
    """(this rank's weights of the parameter, flattened, fp32 masters where the optimizer keeps
    them; the offset of the first in the flattened parameter): pieces of whole parameters
    that `load_pieces` reassembles on any layout."""
    lay = e.layout
    if lay.piece is not None:
        pc = lay.piece
        return pc.flat.data[pc.offset:pc.offset + pc.numel], pc.start
    local = local_tensor(e.param).detach()
    if lay.group is None:
        return local.reshape(-1), 0
    if lay.split_dim == 0:
        return local.reshape(-1), lay.rows[0] * (lay.shape[1] if lay.is_matrix else 1)
    raise NotImplementedError("piece files hold row blocks and flat ranges; use DCP for column-sharded DTensors")


def save_pieces(opt, directory: str, rank: int, weights: bool = True) -> str:
    """Write this rank's part of the optimizer state (and of the weights the optimizer steps)
    as pieces of logical tensors, keyed by parameter name: `galore_state_rank<r>.pt`. Together
    the files of all ranks hold everything, whatever the world size or ZeRO stage."""
    entries = {}
    for name, e in named_entries(opt):
        state = {}
        for key, value in e.state.items():
            if not torch.is_tensor(value):
                state[key] = ("scalar", value)
            elif key in EIGHT_BIT_KEYS:
                state[key] = ("raw", low_place(e), tuple(value.shape), value.detach().cpu())
            else:
                where = place(e, key, value)
                state[key] = ("piece", where.shape, where.dim, where.start, value.detach().cpu())
        entry = {"shape": tuple(e.layout.shape), "state": state}
        if weights and e.holds:
            w, start = _weight_piece(e)
            entry["weights"] = (start, w.detach().float().cpu().clone())
        entries[name] = entry
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PIECES.format(rank=rank))
    # with delayed clipping's carried coefficient (the same on every rank), which no entry holds
    torch.save({"entries": entries, "next_clip_coef": float(opt.next_clip_coef)}, path)
    return path


def _saved_clip_coef(directory: str) -> float:
    """The delayed-clipping coefficient `save_pieces` wrote (1.0 in files from before it did)."""
    first = sorted(glob.glob(os.path.join(directory, "galore_state_rank*.pt")))[0]
    return float(torch.load(first, map_location="cpu", weights_only=False, mmap=True).get("next_clip_coef", 1.0))


def _read_pieces(directory: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(directory, "galore_state_rank*.pt")))
    if not files:
        raise FileNotFoundError(f"no galore_state_rank*.pt under {directory}")
    return [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["entries"] for f in files]


def _assemble(pieces: list[tuple], shape: tuple[int, ...], dtype) -> torch.Tensor:
    """The logical tensor from (dim, start, block) pieces (overlaps hold equal values)."""
    full = torch.zeros(shape, dtype=dtype)
    for dim, start, block in pieces:
        if dim is None:
            return block.clone()
        full.narrow(dim, start, block.shape[dim]).copy_(block)
    return full


def load_pieces(opt, directory: str, weights: bool = True) -> dict[str, torch.Tensor]:
    """Install the state `save_pieces` wrote (on any world size) into this rank's layout; put
    the weights into the blocks the optimizer steps, and return every full weight by name
    (for the caller's other copies: 16-bit model parameters)."""
    files = _read_pieces(directory)
    opt.next_clip_coef = _saved_clip_coef(directory)
    assembled: dict[str, torch.Tensor] = {}

    def full_weights(name: str) -> torch.Tensor:
        """A whole parameter from every saver's piece (including those this rank does not hold:
        ZeRO-1/2 keep every 16-bit parameter whole on every rank)."""
        if name not in assembled:
            saved = [f[name] for f in files if name in f]
            shape = saved[0]["shape"]
            flat = torch.zeros(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float32)
            for s in saved:
                if "weights" in s:
                    start, w = s["weights"]
                    flat[start:start + w.numel()] = w
            assembled[name] = flat.reshape(shape)
        return assembled[name]

    for group in opt.param_groups:
        for p in group["params"]:
            opt.state.setdefault(p, {})
    if opt.zero is not None:
        for ft in opt.zero.flats.values():
            for seg in ft.segments:
                if seg.layout is not None:
                    opt.state.setdefault(seg.key, {})
    for name, e in list(named_entries(opt)):
        saved = [f[name] for f in files if name in f]
        if not saved:
            opt.state.pop(e.key, None)
            continue
        new: dict[str, Any] = {}
        raws = [{k: v for k, v in s["state"].items() if v[0] == "raw"} for s in saved]
        raws = [r for r in raws if r]
        for key in {k for s in saved for k in s["state"]}:
            kinds = [s["state"][key] for s in saved if key in s["state"]]
            if kinds[0][0] == "scalar":
                new[key] = kinds[0][1]
            elif kinds[0][0] == "piece":
                shape = kinds[0][1]
                logical = _assemble([(k[2], k[3], k[4]) for k in kinds], shape, kinds[0][4].dtype)
                new[key] = _slice(logical, place(e, key, logical), e).to(e.p_local.device).clone()
        if raws:
            new.update(_reform_8bit(e, raws))
        opt.state[e.key] = new
        if weights and e.holds:
            w, start = _weight_piece(e)
            w.copy_(full_weights(name).reshape(-1)[start:start + w.numel()].to(w.dtype))
    return {name: full_weights(name) for name in {n for f in files for n in f}} if weights else {}


def _slice(logical: torch.Tensor, where: Place, e: Entry) -> torch.Tensor:
    if where.dim is None:
        return logical
    length = _span(e, where, where.dim)
    return logical.narrow(where.dim, where.start, length[1] - length[0])


def _reform_8bit(e: Entry, raws: list[dict[str, tuple]]) -> dict[str, torch.Tensor]:
    """GaLoreAdamW8bit's state for this rank's block from every saver's raw blocks: a saver's
    block that is exactly this one, in the form the optimizer gives it, is installed as it is;
    otherwise dequantize each (its own absmax), assemble, slice and quantize."""
    logical = low_place(e)
    local = list(logical.shape)
    if logical.dim is not None:
        lo, hi = _span(e, logical, logical.dim)
        local[logical.dim] = hi - lo
    fresh: dict[str, torch.Tensor] = {}
    init_moments(fresh, torch.empty(local), e.group)
    for saver in raws:  # one saver's block was exactly this one
        _, where, shape, codes = saver["state1"]
        if where == logical and list(shape) == local and codes.dtype == fresh["state1"].dtype:
            return {k: v[3].to(e.p_local.device).clone() for k, v in saver.items()}
    dense = {}
    for key, (sk, ak, signed) in EIGHT_BIT.items():
        blocks = []
        for saver in raws:
            _, where, shape, codes = saver[sk]
            absmax = saver[ak][3] if ak in saver else None
            blocks.append((where.dim, where.start, dequantize(codes, absmax, signed).reshape(shape)))
        dense[key] = _slice(_assemble(blocks, logical.shape, torch.float32), logical, e)
    return eight_bit_form(dense, e.group, tuple(local), e.p_local.device)


# --------------------------------------------------------------------- torch's optimizers
def _torch_units(opt, binding) -> Iterator[tuple[str, Any, int, int, int, Any]]:
    """(name, state key, offset in the state tensors, start in the flattened parameter, elements,
    the model parameter) for every piece a torch optimizer (the AdamW baseline) steps: ZeRO
    flat partitions by segment, whole parameters by their group's param_names otherwise."""
    if binding is not None:
        for ft in binding.flats.values():
            for seg in ft.segments:
                if seg.layout is not None and seg.layout.piece is not None:
                    pc = seg.layout.piece
                    yield seg.key, ft.flat, pc.offset, pc.start, pc.numel, seg.param
        return
    for group in opt.param_groups:
        names = group.get("param_names") or [f"p{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            yield name, p, 0, 0, p.numel(), p


def save_torch_pieces(opt, binding, directory: str, rank: int) -> str:
    """`save_pieces` for a torch optimizer whose state is shaped like what it steps (AdamW):
    each segment's slice of every such state tensor, the scalars, and the weights."""
    entries = {}
    for name, key, off, start, n, _ in _torch_units(opt, binding):
        st = opt.state.get(key, {})
        flat_len = key.numel()
        state = {k: ("piece", start, v.detach().reshape(-1)[off:off + n].cpu().clone())
                 if torch.is_tensor(v) and v.numel() == flat_len else ("scalar", v) for k, v in st.items()}
        entries[name] = {"state": state, "weights": (start, key.detach().reshape(-1)[off:off + n].float().cpu().clone()),
                         "numel": n}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PIECES.format(rank=rank))
    torch.save({"entries": entries}, path)
    return path


def load_torch_pieces(opt, binding, directory: str) -> dict[str, torch.Tensor]:
    """Inverse of save_torch_pieces on any layout; returns every whole parameter (flattened)."""
    files = _read_pieces(directory)
    whole: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for f in files:
        for name, e in f.items():
            start, w = e["weights"]
            size = max(start + w.numel(), whole.get(name, torch.zeros(0)).numel())
            buf = whole.setdefault(name, torch.zeros(size))
            if buf.numel() < size:
                buf = whole[name] = torch.cat([buf, torch.zeros(size - buf.numel())])
            buf[start:start + w.numel()] = w
            for k, v in e["state"].items():
                if v[0] == "scalar":
                    scalars.setdefault(name, {})[k] = v[1]
                else:
                    t = states.setdefault(name, {}).setdefault(k, torch.zeros(0, dtype=v[2].dtype))
                    if t.numel() < v[1] + v[2].numel():
                        t = states[name][k] = torch.cat([t, torch.zeros(v[1] + v[2].numel() - t.numel(), dtype=t.dtype)])
                    t[v[1]:v[1] + v[2].numel()] = v[2]
    for name, key, off, start, n, _ in _torch_units(opt, binding):
        key.data.reshape(-1)[off:off + n].copy_(whole[name][start:start + n].to(key.dtype))
        if name in states or name in scalars:
            st = opt.state.setdefault(key, {})
            for k, v in scalars.get(name, {}).items():
                st[k] = v.clone() if torch.is_tensor(v) else v
            for k, v in states.get(name, {}).items():
                if k not in st or not torch.is_tensor(st[k]) or st[k].numel() != key.numel():
                    st[k] = torch.zeros(key.numel(), dtype=v.dtype, device=key.device).reshape(key.shape)
                st[k].reshape(-1)[off:off + n].copy_(v[start:start + n])
    return whole


__all__ = ["dcp_state_dict", "dcp_load", "optim_state_dict", "load_optim_state_dict", "create_state", "save_pieces", "load_pieces", "save_torch_pieces", "load_torch_pieces", "place", "low_place", "Place", "named_entries",
           "dequantize", "eight_bit_form", "eight_bit_exact_form", "dense_8bit"]
