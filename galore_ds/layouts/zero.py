"""Layouts of DeepSpeed ZeRO flat partitions, read from DeepSpeed's optimizer wrappers.

DeepSpeed hands the optimizer flat fp32 tensors instead of the model's parameters:
- ZeRO-1/2 (DeepSpeedZeroOptimizer): one flat tensor per param group and rank. Parameter k of
  the group covers elements [offset, offset + numel) of the padded flat group; rank r holds
  [r*P, (r+1)*P). DeepSpeed steps the optimizer once per group, with `param_groups` narrowed
  to that group.
- ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): one flat tensor per sub-group = each parameter's
  ds_tensor chunk (ceil(numel/W) elements, rank r holds [r*c, (r+1)*c)), stepped once per
  sub-group.
- bf16 with fp32 gradient accumulation at ZeRO-1 (BF16_Optimizer): one flat tensor per group,
  the group split into equal rank partitions without interior padding; one step call.
Each parameter's piece of a flat tensor becomes a Layout with a FlatPiece (layouts/base.py):
a contiguous element range that may start or end inside a row. State is keyed by strings
("galore_ds:<group>:<position>"), which DeepSpeed's checkpoints round-trip.

A GaLore step needs all parameters at once (the global norm of what it consumes, packed
collectives). Where DeepSpeed steps one group or sub-group per call, `ZeroBinding` records
the order of its calls: the optimizer prepares each call's parameters as it comes and
updates them all at the last call, then refreshes DeepSpeed's 16-bit copies of the earlier
partitions (`copy_back`), which DeepSpeed copied before their update.

This module reads DeepSpeed's attributes; it never imports deepspeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from galore_ds.layouts.base import FlatPiece, Layout

STATE_PREFIX = "galore_ds"


@dataclass
class FlatSegment:
    """One parameter's piece of a flat tensor."""

    key: str          # optimizer state key
    index: int        # parameter index in the optimizer's original order (seeds, owners)
    pos: int          # position in its param group (stagger offsets)
    n_in_group: int
    layout: Layout | None    # None: another rank holds all of it
    param: Any = None        # the model's parameter this piece belongs to


@dataclass
class FlatTensor:
    flat: Any                 # the flat fp32 tensor DeepSpeed hands the optimizer
    group_index: int          # its param group in the optimizer
    segments: list[FlatSegment]
    copy_back: Callable[[], None] | None = None  # refresh DeepSpeed's 16-bit copy after an update


@dataclass
class ZeroBinding:
    """What DeepSpeed's wrapper made of the optimizer's parameters (see module docstring)."""

    stage: int
    flats: dict[int, FlatTensor] = field(default_factory=dict)   # id(flat tensor) -> pieces
    call_order: list[int] = field(default_factory=list)           # ids in DeepSpeed's step order
    per_call: bool = False     # DeepSpeed steps one group / sub-group per call

    def last_call(self, flat_ids: list[int]) -> bool:
        return not self.per_call or (bool(self.call_order) and self.call_order[-1] in flat_ids)


def _counts(numel: int, bounds: list[tuple[int, int]]) -> list[int]:
    """Elements of [0, numel) inside each rank's [lo, hi)."""
    return [max(0, min(hi, numel) - max(lo, 0)) for lo, hi in bounds]


def split_rows(shape: tuple[int, ...], counts: list[int]) -> list[int]:
    """Rows of a matrix that a boundary between consecutive ranks' pieces cuts."""
    if len(shape) != 2:
        return []
    n, numel = shape[1], shape[0] * shape[1]
    rows, b = set(), 0
    for c in counts[:-1]:
        b += c
        if 0 < b < numel and b % n:
            rows.add(b // n)
    return sorted(rows)


def piece_layout(shape: tuple[int, ...], flat, offset: int, start: int, end: int,
                 counts: list[int], group: Any) -> Layout | None:
    """The layout of elements [start, end) of a parameter, kept at `offset` of `flat`.

    A parameter one rank holds whole is that rank's alone: local on it (no collective ever
    touches it; its norm still sums over `group`), and None on the others."""
    if end <= start:
        start = end = 0
    piece = FlatPiece(flat, offset, start, end)
    if len(shape) == 2:
        n = shape[1]
        rows = (start // n, (end - 1) // n + 1) if end > start else (0, 0)
        cols = (0, n)
    else:
        rows, cols = (start, end), (0, 1)
    total = sum(counts)
    if sum(1 for c in counts if c) == 1 or total == 0:
        if piece.numel != total:
            return None
        return Layout(tuple(shape), rows, cols, piece=piece, sum_group=group)
    return Layout(tuple(shape), rows, cols, group=group, split_dim=0, counts=counts, piece=piece,
                  split_rows=split_rows(tuple(shape), counts))


def _range_segment(p, off, bounds, rank, flat, group, key, index, pos, n) -> FlatSegment:
    """Parameter `p` occupying [off, off + numel) of a flat tensor split at `bounds`."""
    numel = p.numel()
    counts = _counts(numel, [(lo - off, hi - off) for lo, hi in bounds])
    lo, hi = bounds[rank]
    s, e = max(off, lo) - off, min(off + numel, hi) - off
    local = max(off, lo) - lo
    return FlatSegment(key, index, pos, n, piece_layout(tuple(p.shape), flat, local, s, max(s, e), counts, group), p)


def _zero12(zo) -> ZeroBinding:
    binding = ZeroBinding(stage=2, per_call=True)
    base = 0
    for i, flat in enumerate(zo.single_partition_of_fp32_groups):
        pg = zo.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        psize = int(zo.partition_size[i])
        bounds = [(r * psize, (r + 1) * psize) for r in range(world)]
        originals = list(zo.bit16_groups[i])
        pos_of = {id(p): k for k, p in enumerate(originals)}
        segs = []
        for p, off in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
            pos = pos_of[id(p)]
            segs.append(_range_segment(p, off, bounds, rank, flat, pg, f"{STATE_PREFIX}:{i}:{pos}",
                                       base + pos, pos, len(originals)))
        segs.sort(key=lambda s: s.pos)
        base += len(originals)

        def copy_back(i=i, rank=rank):
            zo.parallel_partitioned_bit16_groups[i][rank].data.copy_(zo.single_partition_of_fp32_groups[i].data)
        binding.flats[id(flat)] = FlatTensor(flat, i, segs, copy_back)
        binding.call_order.append(id(flat))
    return binding


def _zero3(zo) -> ZeroBinding:
    binding = ZeroBinding(stage=3, per_call=True)
    pos_count: dict[int, int] = {}
    n_in: dict[int, int] = {}
    for s, params in enumerate(zo.fp16_groups):
        g = zo.sub_group_to_group_id[s]
        n_in[g] = n_in.get(g, 0) + len(params)
    group_base, acc = {}, 0
    for g in sorted(n_in):
        group_base[g] = acc
        acc += n_in[g]
    for s, flat in enumerate(zo.fp32_partitioned_groups_flat):
        g = zo.sub_group_to_group_id[s]
        pg = zo.sub_group_process_groups[s] if hasattr(zo, "sub_group_process_groups") else zo.dp_process_group
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        segs, off = [], 0
        for p in zo.fp16_groups[s]:
            c, numel = int(p.partition_numel()), int(p.ds_numel)
            counts = _counts(numel, [(r * c, (r + 1) * c) for r in range(world)])
            st = min(rank * c, numel)
            en = min(numel, st + c) if rank * c < numel else st
            pos = pos_count.get(g, 0)
            pos_count[g] = pos + 1
            segs.append(FlatSegment(f"{STATE_PREFIX}:{g}:{pos}", group_base[g] + pos, pos, n_in[g],
                                    piece_layout(tuple(p.ds_shape), flat, off, st, en, counts, pg), p))
            off += c

        def copy_back(s=s):
            if zo.fp16_partitioned_groups_flat[s] is not None:
                zo.fp16_partitioned_groups_flat[s].data.copy_(zo.fp32_partitioned_groups_flat[s].data)
        binding.flats[id(flat)] = FlatTensor(flat, g, segs, copy_back)
        binding.call_order.append(id(flat))
    return binding


def _bf16(bo) -> ZeroBinding:
    binding = ZeroBinding(stage=1)
    base = 0
    for i, flat in enumerate(bo.fp32_groups_flat_partition):
        pg = bo.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        psize = bo.bf16_groups_flat[i].numel() // world
        bounds = [(r * psize, (r + 1) * psize) for r in range(world)]
        params = list(bo.bf16_groups[i])
        segs, off = [], 0
        for pos, p in enumerate(params):
            segs.append(_range_segment(p, off, bounds, rank, flat, pg, f"{STATE_PREFIX}:{i}:{pos}",
                                       base + pos, pos, len(params)))
            off += p.numel()
        base += len(params)
        binding.flats[id(flat)] = FlatTensor(flat, i, segs, bo.update_lp_params)
        binding.call_order.append(id(flat))
    return binding


def read_zero_layout(wrapper, stage: int) -> ZeroBinding | None:
    """The binding for DeepSpeed's optimizer wrapper, or None when the optimizer sees the real
    parameters (ZeRO-0, fp32 or through FP16_UnfusedOptimizer's per-tensor fp32 copies)."""
    if wrapper is None:
        return None
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer  # only reached under DeepSpeed

    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return None
    if getattr(wrapper, "offload_optimizer", False) or getattr(wrapper, "cpu_offload", False):
        raise NotImplementedError(
            "GaLore under DeepSpeed optimizer offload: the optimizer state would live on the CPU "
            "in DeepSpeed's layout; remove zero_optimization.offload_optimizer")
    if hasattr(wrapper, "single_partition_of_fp32_groups"):
        binding = _zero12(wrapper)
    elif hasattr(wrapper, "fp32_partitioned_groups_flat"):
        binding = _zero3(wrapper)
    elif hasattr(wrapper, "fp32_groups_flat_partition"):
        binding = _bf16(wrapper)
    else:
        raise NotImplementedError(
            f"GaLore: DeepSpeed wrapper {type(wrapper).__name__} is not supported (supported: ZeRO "
            "stage 0-3 with fp32, bf16 or fp16 master weights)")
    binding.stage = stage
    return binding


__all__ = ["ZeroBinding", "FlatTensor", "FlatSegment", "read_zero_layout", "piece_layout",
           "split_rows", "STATE_PREFIX"]
