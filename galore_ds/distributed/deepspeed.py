"""GaLore under DeepSpeed ZeRO 0/1/2/3: registration and the partition adapter.

Registration
------------
`import galore_ds` puts `torch.optim.GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor` = the
DeepSpeed-aware classes below. DeepSpeed 0.19.8 resolves a JSON `"optimizer": {"type": NAME}`
that is not one of its own names with `getattr(torch.optim, NAME)(model_parameters, **params)`
(engine._configure_basic_optimizer), so the JSON recipe builds our optimizer. `register()`
(run on import when deepspeed is already imported, and by every constructor here) also
adds the classes to ZeRO's supported list (no `zero_allow_untested_optimizer`) and wraps
`DeepSpeedEngine._configure_zero_optimizer` / `_configure_optimizer` so the optimizer learns
the layout DeepSpeed chose (`bind_deepspeed`). An optimizer built by the engine itself
(JSON path, whatever the import order) finds its engine on the call stack and binds at its
first real step. A client instance of the core class (galore_ds.GaLoreAdamW) is switched to
the DeepSpeed-aware class (same state and math). Steps DeepSpeed runs while building its
wrapper (FP16_UnfusedOptimizer's zero-gradient state init) are ignored.

Layout (what the optimizer sees, and what we rebuild)
-----------------------------------------------------
- ZeRO-0: real parameters with the all-reduced gradient. Updates are local; the refresh
  SVD of each matrix runs once, on an owner rank (LPT), and the projectors are shared
  in one all_gather.
- ZeRO-1/2: one flat fp32 partition per group and rank. Each parameter covers a
  contiguous element range [offset, offset+numel) of the padded flat group; rank r holds
  [r*P, (r+1)*P). We rebuild each parameter's piece as rows of its (m, n) matrix.
- ZeRO-3: one flat fp32 tensor per sub-group = each parameter's ds_tensor chunk
  (ceil(numel/W) elements, rank r holds [r*c, (r+1)*c)). Row blocks when W divides m.
  step() runs once per sub-group; each call handles its own matrices.
- bf16: ZeRO-0 (FP16_UnfusedOptimizer: per-tensor fp32 copies, real shapes), ZeRO-1 with
  fp32 grad accumulation (BF16_Optimizer: flat partitions like ZeRO-1), ZeRO-2/3 (fp32
  masters in the ZeRO wrappers). Overflow/non-finite steps never reach the optimizer.
- Non-finite gradients: DeepSpeed's wrappers (ZeRO-1/2/3, bf16, fp16) skip the step on every
  rank (one all_reduce of an overflow flag, DeepSpeed's own). fp32 ZeRO-0 has no wrapper:
  the optimizer skips it, from the already all-reduced gradients, and sets `overflow` so
  the engine counts it (`engine.skipped_steps`) and holds the lr schedule.

A piece is a contiguous flattened range [s, e) of W (m x n): full rows plus at most one
partial row at each end. GaLore uses RIGHT projection on every sharded matrix
(R_i = G_i Q^T, local and exact). A partial row's projection is a partial sum: the rows
that DeepSpeed's boundaries cut ("split rows", at most W-1 per flat tensor) are
completed by ONE small all_reduce (split_rows x r floats) per flat tensor and step. No
split rows (ZeRO-3 with W | m, ZeRO-1/2 boundaries on row edges, ZeRO-0): no collective
beyond DeepSpeed's own between refreshes.

Refresh: owner = a rank that holds the whole matrix when one does (ZeRO-1/2 interior
matrices: no traffic), else the least-loaded holder (LPT on SVD cost); pieces go to owners
in ONE all_to_all (common.gather_to_owners, skipped when every owner holds its matrix),
new bases come back in ONE all_gather (common.share_from_owners).

Checkpoints: the state is keyed by strings ("galore_ds:<group>:<position>"), so DeepSpeed's
save_checkpoint / load_checkpoint round-trip it bit-identically at the same world size.
Another world size (or ZeRO stage 1-3): `save_state_pieces(dir)` on the old run writes each
rank's state with its row/element ranges; `load_state_pieces(dir)` on the new run re-slices
it (GaLoreAdamW; load the full weights into the model before deepspeed.initialize).
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from galore_ds.distributed.common import (
    COMM, assign_owners, gather_to_owners, group_rank_size, share_from_owners, svd_cost,
)
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import GaLoreAdamW8bit
from galore_ds.optim.base import GaLoreOptimizer, ParamItem, RefreshJob

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
STATE_PREFIX = "galore_ds"


# --------------------------------------------------------------------------- layout
@dataclass
class Segment:
    """One parameter's piece inside one rank's flat fp32 tensor."""

    key: str                  # optimizer state key (a string: survives state_dict round trips)
    shape: tuple[int, ...]    # global shape
    local_off: int            # offset of the piece in this rank's flat tensor
    start: int                # global flattened range held here: [start, end)
    end: int
    counts: list[int]         # elements held by each rank (rank-ordered, contiguous)
    index: int                # parameter index in the optimizer's original order
    pos: int                  # position in its param group
    n_in_group: int
    split_rows: list[int] = field(default_factory=list)  # rows cut by any rank boundary

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class FlatLayout:
    group_idx: int
    segments: list[Segment]
    group: Any                # process group of this flat tensor
    n_split_rows: int = 0     # over all GaLore segments (identical on every rank)
    device: Any = None        # where the flat tensor (and so the GaLore state) lives


def _pieces(numel: int, bounds: list[tuple[int, int]]) -> list[int]:
    """Elements of [0, numel) inside each rank's [lo, hi)."""
    return [max(0, min(hi, numel) - max(lo, 0)) for lo, hi in bounds]


def _split_rows(shape: tuple[int, ...], counts: list[int]) -> list[int]:
    if len(shape) != 2:
        return []
    n, numel = shape[1], shape[0] * shape[1]
    rows, b = set(), 0
    for c in counts[:-1]:
        b += c
        if 0 < b < numel and b % n:
            rows.add(b // n)
    return sorted(rows)


def _range_segment(key: str, shape: tuple[int, ...], numel: int, off: int,
                   bounds: list[tuple[int, int]], rank: int, index: int, pos: int, n: int) -> Segment:
    """The segment of a parameter occupying [off, off + numel) of a flat tensor whose rank
    partitions are `bounds` (ZeRO-1/2 and BF16_Optimizer lay groups out this way)."""
    counts = _pieces(numel, [(lo - off, hi - off) for lo, hi in bounds])
    lo, hi = bounds[rank]
    s, e = max(off, lo) - off, min(off + numel, hi) - off
    if e <= s:
        s = e = 0
    return Segment(key, shape, max(off, lo) - lo, s, max(s, e), counts, index, pos, n)


def zero12_layouts(zo) -> dict[int, FlatLayout]:
    """Layouts of a ZeRO-1/2 optimizer (DeepSpeedZeroOptimizer), keyed by id(flat tensor)."""
    out = {}
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
            segs.append(_range_segment(f"{STATE_PREFIX}:{i}:{pos}", tuple(p.shape), p.numel(), off,
                                       bounds, rank, base + pos, pos, len(originals)))
        base += len(originals)
        out[id(flat)] = FlatLayout(i, segs, pg, device=flat.device)
    return out


def zero3_layouts(zo) -> dict[int, FlatLayout]:
    """Layouts of a ZeRO-3 optimizer (per sub-group flat fp32 tensors)."""
    out = {}
    pos_count: dict[int, int] = {}
    n_in: dict[int, int] = {}
    for s, params in enumerate(zo.fp16_groups):
        g = zo.sub_group_to_group_id[s]
        n_in[g] = n_in.get(g, 0) + len(params)
    group_base: dict[int, int] = {}
    acc = 0
    for g in sorted(n_in):
        group_base[g] = acc
        acc += n_in[g]
    for s, flat in enumerate(zo.fp32_partitioned_groups_flat):
        g = zo.sub_group_to_group_id[s]
        pg = zo.sub_group_process_groups[s]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        segs, off = [], 0
        for p in zo.fp16_groups[s]:
            c = int(p.partition_numel())
            numel = int(p.ds_numel)
            counts = _pieces(numel, [(r * c, (r + 1) * c) for r in range(world)])
            st = min(rank * c, numel)
            en = min(numel, st + c) if rank * c < numel else st
            pos = pos_count.get(g, 0)
            pos_count[g] = pos + 1
            segs.append(Segment(f"{STATE_PREFIX}:{g}:{pos}", tuple(p.ds_shape), off, st, en,
                                counts, group_base[g] + pos, pos, n_in[g]))
            off += c
        out[id(flat)] = FlatLayout(g, segs, pg, device=flat.device)
    return out


def bf16_layouts(bo) -> dict[int, FlatLayout]:
    """Layouts of BF16_Optimizer (bf16 params, fp32 grad accumulation, ZeRO-1 style): each
    group is flattened without interior padding and split into equal rank partitions."""
    out = {}
    base = 0
    for i, flat in enumerate(bo.fp32_groups_flat_partition):
        pg = bo.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        psize = bo.bf16_groups_flat[i].numel() // world
        bounds = [(r * psize, (r + 1) * psize) for r in range(world)]
        params = list(bo.bf16_groups[i])
        segs, off = [], 0
        for pos, p in enumerate(params):
            segs.append(_range_segment(f"{STATE_PREFIX}:{i}:{pos}", tuple(p.shape), p.numel(), off,
                                       bounds, rank, base + pos, pos, len(params)))
            off += p.numel()
        base += len(params)
        out[id(flat)] = FlatLayout(i, segs, pg, device=flat.device)
    return out


def _assign_holders(costs: list[float], counts: list[list[int]], world: int) -> list[int]:
    """Owner per job: a rank holding the whole matrix if any (free), else LPT among holders.

    The owner always holds rows of its matrix, so it has the previous projector (the
    sign rule aligns new vectors with it). Deterministic on every rank.
    """
    load = [0.0] * world
    owners = [-1] * len(costs)
    for j, cnt in enumerate(counts):
        total = sum(cnt)
        for r in range(world):
            if cnt[r] == total:
                owners[j] = r
                load[r] += costs[j]
                break
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        if owners[j] >= 0:
            continue
        holders = [r for r in range(world) if counts[j][r] > 0]
        r = min(holders, key=lambda k: (load[k], k))
        owners[j] = r
        load[r] += costs[j]
    return owners


# --------------------------------------------------------------------------- the mixin
class DeepSpeedGaLoreMixin:
    """Makes a GaLore optimizer run on DeepSpeed's ZeRO partitions (see module docstring)."""

    _ds_layouts: dict[int, FlatLayout] | None = None
    _ds_stage: int | None = None
    _ds_group: Any = None
    _ds_engine: Any = None    # the engine configuring us, until it is done (see _ds_pending)

    # ------------------------------------------------------------- construction
    @staticmethod
    def _ds_groups(params: Iterable, galore: dict[str, Any], target_modules) -> list:
        """JSON `params` may carry rank/update_proj_gap/scale/proj_type: they apply to GaLore
        groups only. With plain parameters (DeepSpeed passes model.parameters()), the GaLore
        group is every 2-D parameter with min(shape) >= rank; use galore_ds.deepspeed.initialize
        (or pass param_groups(model, ...)) to select by module name (target_modules)."""
        params = list(params)
        given = {k: v for k, v in galore.items() if v is not None}
        if params and isinstance(params[0], dict):
            out = []
            for g in params:
                g = dict(g)
                if "rank" in g:
                    for k, v in given.items():
                        g.setdefault(k, v)
                out.append(g)
            return out
        if "rank" not in given:
            return params
        if target_modules:
            warnings.warn("target_modules needs module names: with plain parameters the GaLore "
                          "group is every 2-D parameter with min(shape) >= rank; use "
                          "galore_ds.deepspeed.initialize to select by name")
        rank = given["rank"]
        mats, rest_2d, rest_1d = [], [], []
        for p in params:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if len(shape) == 2 and min(shape) >= rank:
                mats.append(p)
            elif len(shape) >= 2:
                rest_2d.append(p)
            else:
                rest_1d.append(p)
        groups = [dict(params=mats, **given)] if mats else []
        if rest_2d:
            groups.append(dict(params=rest_2d))
        if rest_1d:
            groups.append(dict(params=rest_1d, weight_decay=0.0))
        return groups

    def __init__(self, params, *args, rank=None, update_proj_gap=None, scale=None,
                 proj_type=None, target_modules=None, **kwargs):
        galore = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        super().__init__(self._ds_groups(params, galore, target_modules), *args, **kwargs)
        # Built by DeepSpeed's engine from the JSON config? Then the engine is still being
        # configured: bind lazily at the first real step (works whatever the import order).
        self._ds_engine = _constructing_engine()
        register(quiet=True)

    # ------------------------------------------------------------- binding
    def bind_deepspeed(self, engine=None, zero_optimizer=None) -> None:
        """Attach the layout DeepSpeed chose. Called by the engine hooks (see register)."""
        stage = int(engine.zero_optimization_stage()) if engine is not None else 0
        if zero_optimizer is None and engine is not None and engine.optimizer is not self:
            zero_optimizer = engine.optimizer
        self._ds_stage = stage
        self._ds_group = None
        if type(zero_optimizer).__name__ == "FP16_UnfusedOptimizer":
            zero_optimizer = None  # bf16/fp16 at ZeRO-0: per-tensor fp32 copies, real shapes
        if zero_optimizer is None or zero_optimizer is self:
            self._ds_layouts = None
            if engine is not None:
                self._ds_group = getattr(engine, "seq_data_parallel_group", None)
            return
        if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
            self._ds_layouts = zero12_layouts(zero_optimizer)
        elif hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
            self._ds_layouts = zero3_layouts(zero_optimizer)
        elif hasattr(zero_optimizer, "fp32_groups_flat_partition"):
            self._ds_layouts = bf16_layouts(zero_optimizer)
        else:
            raise NotImplementedError(
                f"GaLore: DeepSpeed wrapper {type(zero_optimizer).__name__} is not supported yet "
                "(supported: ZeRO stage 0, 1, 2, 3 in fp32/fp16 master weights)")
        for lay in self._ds_layouts.values():
            group = self.param_groups[lay.group_idx]
            n = 0
            for seg in lay.segments:
                if "rank" in group:
                    seg.split_rows = _split_rows(seg.shape, seg.counts)
                    n += len(seg.split_rows)
            lay.n_split_rows = n
        for group in self.param_groups:
            if "rank" in group and group["proj_type"] not in ("right",):
                warnings.warn(f"GaLore under ZeRO-{stage}: proj_type={group['proj_type']!r} is "
                              "replaced by right projection on row shards (exact and local; "
                              "the single-process equivalent is proj_type='right')")
                break

    # ------------------------------------------------------------- ZeRO-0 refresh
    def _refresh(self, jobs: list[RefreshJob]) -> None:
        _, world = group_rank_size(self._ds_group)
        if self._ds_stage is None or world == 1 or self._ds_layouts is not None:
            return super()._refresh(jobs)
        # ZeRO-0: every rank holds the full averaged gradient; the SVD runs on one owner.
        rank = dist.get_rank(self._ds_group)
        owners = assign_owners([svd_cost(j.global_shape) for j in jobs], world)
        bases = [self._compute_basis(j, j.item.grad) if owners[k] == rank else None
                 for k, j in enumerate(jobs)]
        shapes = [(j.item.group["rank"], j.global_shape[1] if j.side == "right" else j.global_shape[0])
                  for j in jobs]
        shared = share_from_owners(bases, shapes, owners, group=self._ds_group,
                                   device=jobs[0].item.grad.device if jobs else "cpu")
        for j, b in zip(jobs, shared):
            self._set_projector(j, b)

    # ------------------------------------------------------------- ZeRO-1/2/3 step
    def _ds_pending(self) -> bool:
        """True while a DeepSpeed engine that built this optimizer is still configuring
        itself. DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 at ZeRO-0) runs one step on
        zero gradients to create states: GaLore ignores it (no refresh, no step count)."""
        eng = self._ds_engine
        if eng is None:
            return False
        if getattr(eng, "optimizer", None) is None:
            return True
        self._ds_engine = None
        if self._ds_stage is None:
            self.bind_deepspeed(eng, None if eng.optimizer is self else eng.optimizer)
        return False

    def _zero0_grads_finite(self) -> bool:
        """ZeRO-0 in fp32 is the one layout where DeepSpeed hands a NaN/Inf gradient to the
        optimizer (its ZeRO and bf16/fp16 wrappers skip such steps themselves). The gradients
        are already all-reduced, so this local check decides the same on every rank."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)  # NaN and Inf survive a norm
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    @torch.no_grad()
    def step(self, closure=None):
        if self._ds_pending():
            return None
        if not self._ds_layouts:
            # DeepSpeed's engine reads `overflow` as its wrappers': skip counted, lr held.
            self.overflow = self._ds_stage is not None and not self._zero0_grads_finite()
            if self.overflow:
                stats = self.galore_stats
                stats["nonfinite_steps_skipped"] = stats.get("nonfinite_steps_skipped", 0) + 1
                self.zero_grad(set_to_none=True)
                return None
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for flat in group["params"]:
                lay = self._ds_layouts.get(id(flat))
                if lay is None:
                    raise RuntimeError("GaLore: a flat tensor DeepSpeed did not announce at bind time")
                self._step_flat(group, flat, lay)
        return loss

    @staticmethod
    def _due(state: dict, group: dict, seg: Segment) -> bool:
        gap = group["update_proj_gap"]
        if "refresh_offset" not in state:
            state["refresh_offset"] = (seg.pos * gap) // max(seg.n_in_group, 1) if group["stagger"] else 0
        step, off = state["step"], state["refresh_offset"]
        return step == 0 or (step >= off and (step - off) % gap == 0)

    def _step_flat(self, group: dict, flat: torch.Tensor, lay: FlatLayout) -> None:
        if flat.grad is None:
            return
        galore = "rank" in group
        gflat = flat.grad
        items: list[tuple[Segment, ParamItem, Any]] = []
        jobs: list[tuple[Segment, RefreshJob]] = []
        for seg in lay.segments:
            state = self.state[seg.key]
            state.setdefault("step", 0)
            lo, hi = seg.local_off, seg.local_off + seg.numel
            item, back = None, None
            if seg.numel:
                if galore:
                    p2, g2, back = self._row_view(flat.data[lo:hi], gflat[lo:hi], seg)
                    item = ParamItem(p2, g2, state, group, True)
                else:
                    item = ParamItem(flat.data[lo:hi], gflat[lo:hi], state, group, False)
                items.append((seg, item, back))
            if galore and self._due(state, group, seg):
                jobs.append((seg, RefreshJob(item, "right", seg.shape, seg.index, state["step"])))
        if jobs:
            self._refresh_segments(jobs, lay, gflat)
        if galore and lay.n_split_rows:
            self._complete_split_rows(items, lay, group)
        for seg, item, back in items:
            self._update(item)
            if back is not None:
                back()
        for seg in lay.segments:
            self.state[seg.key]["step"] += 1

    @staticmethod
    def _row_view(p: torch.Tensor, g: torch.Tensor, seg: Segment):
        """(k, n) rows covering [start, end): a view when the piece is whole rows, else a
        zero-padded copy (partial rows) and a function writing the result back."""
        n = seg.shape[1]
        r0, r1 = seg.start // n, (seg.end - 1) // n
        k = r1 - r0 + 1
        if seg.start % n == 0 and seg.end % n == 0:
            return p.view(k, n), g.view(k, n), None
        a = seg.start - r0 * n
        pp = torch.zeros(k * n, dtype=p.dtype, device=p.device)
        gg = torch.zeros(k * n, dtype=g.dtype, device=g.device)
        pp[a:a + seg.numel] = p
        gg[a:a + seg.numel] = g

        def back():
            p.copy_(pp[a:a + seg.numel])
        return pp.view(k, n), gg.view(k, n), back

    def _refresh_segments(self, jobs, lay: FlatLayout, gflat: torch.Tensor) -> None:
        pg = lay.group
        rank, world = group_rank_size(pg)
        counts = [seg.counts for seg, _ in jobs]
        costs = [svd_cost(seg.shape) for seg, _ in jobs]
        owners = _assign_holders(costs, counts, world)
        shapes = [seg.shape for seg, _ in jobs]
        need_gather = any(counts[j][owners[j]] != sum(counts[j]) for j in range(len(jobs)))
        if need_gather and world > 1:
            pieces = [gflat[seg.local_off:seg.local_off + seg.numel] for seg, _ in jobs]
            full = gather_to_owners(pieces, counts, owners, shapes, group=pg)
        else:
            full = [gflat[seg.local_off:seg.local_off + seg.numel].view(seg.shape)
                    if owners[j] == rank else None for j, (seg, _) in enumerate(jobs)]
        bases = [self._compute_basis(job, full[j]) if owners[j] == rank else None
                 for j, (_, job) in enumerate(jobs)]
        rank_r = [job.item.group["rank"] if job.item is not None else self.param_groups[lay.group_idx]["rank"]
                  for _, job in jobs]
        bshapes = [(rank_r[j], seg.shape[1]) for j, (seg, _) in enumerate(jobs)]
        shared = share_from_owners(bases, bshapes, owners, group=pg, device=gflat.device)
        for (seg, job), b in zip(jobs, shared):
            if job.item is not None:
                self._set_projector(job, b)

    def _complete_split_rows(self, items, lay: FlatLayout, group: dict) -> None:
        """Rows cut by rank boundaries: sum the partial projections in ONE all_reduce."""
        r = group["rank"]
        device = items[0][1].grad.device if items else torch.device("cpu")
        buf = torch.zeros(lay.n_split_rows, r, dtype=torch.float32, device=device)
        slots: list[tuple[ParamItem, int, int]] = []
        base = 0
        by_key = {seg.key: item for seg, item, _ in items}
        for seg in lay.segments:
            item = by_key.get(seg.key)
            if item is not None and seg.split_rows:
                low = self._project(item)
                item.lowrank_grad = low
                n = seg.shape[1]
                r0, r1 = seg.start // n, (seg.end - 1) // n
                for k, row in enumerate(seg.split_rows):
                    if r0 <= row <= r1:
                        buf[base + k] = low[row - r0]
                        slots.append((item, base + k, row - r0))
            base += len(seg.split_rows)
        dist.all_reduce(buf, group=lay.group)
        COMM.record("split_rows_all_reduce", buf.numel() * buf.element_size())
        for item, slot, local in slots:
            item.lowrank_grad[local] = buf[slot]

    # ------------------------------------------------------------- world-size conversion
    def save_state_pieces(self, directory) -> str:
        """Write this rank's GaLore state with where each piece lies in the full parameter
        (`galore_pieces_rank{r}.pt`, loads with weights_only=True). Together, the files of
        all ranks describe the whole optimizer state independently of the world size:
        `load_state_pieces` on any other world size (ZeRO 1/2/3) re-slices it."""
        import os

        if not self._ds_layouts:
            raise RuntimeError("save_state_pieces: needs a ZeRO 1/2/3 layout (ZeRO-0 state is "
                               "already whole: use the optimizer state_dict)")
        entries = {}
        for lay in self._ds_layouts.values():
            galore = "rank" in self.param_groups[lay.group_idx]
            for seg in lay.segments:
                st = self.state.get(seg.key)
                if st is None:
                    continue
                tensors = {}
                for k, v in st.items():
                    if not torch.is_tensor(v):
                        continue
                    if k == "proj":
                        tensors[k] = ("whole", 0, 0, v.detach().cpu())
                    elif not seg.numel:
                        continue
                    elif galore:
                        n = seg.shape[1]
                        tensors[k] = ("rows", seg.start // n, (seg.end - 1) // n + 1, v.detach().cpu())
                    else:
                        tensors[k] = ("flat", seg.start, seg.end, v.detach().cpu())
                entries[seg.key] = {"shape": list(seg.shape), "galore": galore,
                                    "scalars": {k: v for k, v in st.items() if not torch.is_tensor(v)},
                                    "tensors": tensors}
        rank, world = group_rank_size(next(iter(self._ds_layouts.values())).group)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"galore_pieces_rank{rank}.pt")
        torch.save({"world": world, "stage": self._ds_stage, "entries": entries}, path)
        return path

    def load_state_pieces(self, directory) -> None:
        """Inverse of save_state_pieces, for any world size and ZeRO stage 1-3 (GaLoreAdamW
        state: moments are row-sliced, projectors replicated, 1-D Adam states flat-sliced)."""
        import glob
        import os

        if type(self).__name__ != "DeepSpeedGaLoreAdamW":
            raise NotImplementedError("load_state_pieces: GaLoreAdamW state only (8-bit blocks and "
                                      "Adafactor factors are not row-separable)")
        files = sorted(glob.glob(os.path.join(directory, "galore_pieces_rank*.pt")))
        if not files:
            raise FileNotFoundError(f"no galore_pieces_rank*.pt under {directory}")
        full: dict[str, dict] = {}
        for f in files:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            for key, e in sd["entries"].items():
                d = full.setdefault(key, {"shape": e["shape"], "scalars": {}, "t": {}})
                d["scalars"].update(e["scalars"])  # holders add proj_right etc.
                m, n = e["shape"][0], (e["shape"][1] if len(e["shape"]) > 1 else 1)
                for k, (kind, a, b, v) in e["tensors"].items():
                    if kind == "whole":
                        d["t"].setdefault(k, v)
                        continue
                    if k not in d["t"]:
                        size = (m, v.shape[1]) if kind == "rows" else (m * n if len(e["shape"]) > 1 else m,)
                        d["t"][k] = torch.zeros(size, dtype=v.dtype)
                    d["t"][k][a:b] = v
        for lay in self._ds_layouts.values():
            galore = "rank" in self.param_groups[lay.group_idx]
            for seg in lay.segments:
                d = full.get(seg.key)
                if d is None:
                    continue
                st = self.state[seg.key]
                st.clear()
                st.update(d["scalars"])
                for k, v in d["t"].items():
                    if k == "proj":
                        if seg.numel:
                            st[k] = v.to(lay.device, copy=True)
                    elif seg.numel:
                        n = seg.shape[1] if galore else 1
                        a, b = (seg.start // n, (seg.end - 1) // n + 1) if galore else (seg.start, seg.end)
                        st[k] = v[a:b].to(lay.device, copy=True)

    # ------------------------------------------------------------- projection override
    @staticmethod
    def _project(item: ParamItem) -> torch.Tensor:
        return GaLoreOptimizer._low_rank_grad(item)



class DeepSpeedGaLoreAdamW(DeepSpeedGaLoreMixin, GaLoreAdamW):
    """GaLoreAdamW that runs on DeepSpeed ZeRO 0-3 partitions (JSON type "GaLoreAdamW")."""


class DeepSpeedGaLoreAdamW8bit(DeepSpeedGaLoreMixin, GaLoreAdamW8bit):
    """GaLoreAdamW8bit on ZeRO partitions (JSON type "GaLoreAdamW8bit"). Exact at ZeRO-0; on
    shards the 8-bit blocks follow the local moment layout (not bit-identical to 1 rank)."""


class DeepSpeedGaLoreAdafactor(DeepSpeedGaLoreMixin, GaLoreAdafactor):
    """GaLoreAdafactor on ZeRO partitions (JSON type "GaLoreAdafactor"). Exact at ZeRO-0; on
    shards the RMS terms are per shard (not identical to 1 rank)."""


DS_CLASSES = {
    GaLoreAdamW: DeepSpeedGaLoreAdamW,
    GaLoreAdamW8bit: DeepSpeedGaLoreAdamW8bit,
    GaLoreAdafactor: DeepSpeedGaLoreAdafactor,
}
JSON_NAMES = {
    "GaLoreAdamW": DeepSpeedGaLoreAdamW,
    "GaLoreAdamW8bit": DeepSpeedGaLoreAdamW8bit,
    "GaLoreAdafactor": DeepSpeedGaLoreAdafactor,
}


# --------------------------------------------------------------------------- registration
def register_names() -> None:
    """The JSON names in torch.optim (no deepspeed import)."""
    for name, cls in JSON_NAMES.items():
        setattr(torch.optim, name, cls)


def _as_ds_optimizer(opt):
    if isinstance(opt, GaLoreOptimizer) and not isinstance(opt, DeepSpeedGaLoreMixin):
        cls = DS_CLASSES.get(type(opt))
        if cls is None:
            return None
        opt.__class__ = cls  # same attributes and state; adds the partition adapter
        # an LR scheduler built earlier wrapped the old class's step on the instance
        inst = vars(opt).pop("step", None)
        if inst is not None:
            cls_step = cls.step

            def step(*args, **kwargs):
                opt._opt_called = True  # what torch's scheduler wrapper records
                return cls_step(opt, *args, **kwargs)
            step._wrapped_by_lr_sched = getattr(inst, "_wrapped_by_lr_sched", False)
            opt.step = step
    return opt if isinstance(opt, DeepSpeedGaLoreMixin) else None


_REGISTERED = False


def _constructing_engine():
    """The DeepSpeedEngine whose _configure_optimizer is on the call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_configure_optimizer":
            obj = frame.f_locals.get("self")
            if type(obj).__module__.startswith("deepspeed.runtime") and hasattr(obj, "optimizer"):
                return obj
        frame = frame.f_back
    return None


def register(quiet: bool = False) -> bool:
    """Install the JSON names and the engine hooks (idempotent). Returns False without deepspeed."""
    global _REGISTERED
    register_names()
    if _REGISTERED:
        return True
    if "deepspeed" not in sys.modules:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            if not quiet:
                raise
            return False
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    for cls in JSON_NAMES.values():
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    Engine = ds_engine.DeepSpeedEngine

    orig_zero = Engine._configure_zero_optimizer
    orig_conf = Engine._configure_optimizer

    def _configure_zero_optimizer(self, optimizer):
        wrapper = orig_zero(self, optimizer)
        ours = _as_ds_optimizer(optimizer)
        if ours is not None:
            ours.bind_deepspeed(self, wrapper)
        return wrapper

    def _configure_optimizer(self, client_optimizer, model_parameters):
        if isinstance(client_optimizer, GaLoreOptimizer) and _as_ds_optimizer(client_optimizer):
            client_optimizer._ds_engine = self  # ignore wrapper-construction steps (see _ds_pending)
        out = orig_conf(self, client_optimizer, model_parameters)
        ours = _as_ds_optimizer(getattr(self, "basic_optimizer", None))
        if ours is not None:
            ours._ds_engine = None
            if ours._ds_stage is None:
                ours.bind_deepspeed(self, None if self.optimizer is ours else self.optimizer)
        return out

    Engine._configure_zero_optimizer = _configure_zero_optimizer
    Engine._configure_optimizer = _configure_optimizer
    _REGISTERED = True
    return True


__all__ = [
    "register", "register_names", "DeepSpeedGaLoreAdamW", "DeepSpeedGaLoreAdamW8bit",
    "DeepSpeedGaLoreAdafactor", "zero12_layouts", "zero3_layouts",
]
