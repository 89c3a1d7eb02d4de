"""Data parallelism that sends low-rank gradients: exact for GaLore, n/r less traffic.

Between refreshes a GaLore matrix's update depends on its gradient only through R = G Q^T
(right; P^T G left), and the projector is the same on every rank, so the average of the
ranks' R equals the projection of the averaged G: averaging R (m x r) instead of G (m x n)
loses nothing, needs no error feedback (unlike PowerSGD) and sends n/r less. A refresh needs
no full gradient either (optim/refresh.py): the randomized refresh's Gram products are two
low-rank all-reduces per round; an exact SVD goes to an owner rank, which receives the summed
gradient alone (one reduce_scatter) and shares the basis.

Two ways to use it:
- step time, from anyone's DDP code: `ddp_model.register_comm_hook(LowRankHookState(opt, group),
  galore_ds.lowrank_comm_hook)`. In each of DDP's gradient buckets the hook projects every
  GaLore matrix whose projector is current and averages [R of those | the full gradient of
  every other parameter] in ONE all-reduce, overlapped with the rest of backward as DDP's own
  buckets are. The averaged R waits in the optimizer for its step (`LowRankReduction`); a
  matrix due for a refresh keeps its own (un-averaged) gradient, which the optimizer's refresh
  reduces as said above.
  Clipping: the optimizer's max_grad_norm clips by the norm of what it consumes (the averaged
  R), the same on every rank. torch.nn.utils.clip_grad_norm_ on the DDP model cannot work
  here: the GaLore matrices' p.grad is each rank's own gradient (only R is averaged), so each
  rank would clip by its own norm, and plain DDP's norm needs the averaged full G, which never
  travels. The hook therefore notes each GaLore gradient's norm as it reads it, and the
  optimizer's step refuses on every rank a p.grad that was scaled since (one line naming
  max_grad_norm). Whenever plain DDP would clip, some rank clips here (the average of the
  ranks' squared norms bounds the squared norm of the average), so a run that is not refused
  is plain DDP's.
- per-layer (galore_ds.LayerwiseOptimizer on an optimizer built with reduce_group=group):
  no DDP wrapper; every hook projects its matrix and frees the full gradient, and R is
  averaged in buckets launched asynchronously while backward goes on (optim/layerwise.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from galore_ds.layouts.comm import COMM, group_rank_size
from galore_ds.optim.step import GaLoreOptimizer, grad_mark


@dataclass
class LowRankReduction:
    """What the optimizer learns from a comm hook: which GaLore matrices' gradients are this
    rank's own contributions (their layout's reduce_group), and the averaged R of those the
    hook already reduced this step (used instead of projecting p.grad, then dropped)."""

    group: Any
    galore: set[int] = field(default_factory=set)
    reduced: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)  # id -> (step, R)
    # id -> (step, grad_mark of the gradient the hook read): the optimizer's step compares it
    # with p.grad (GaLoreOptimizer.check_gradients_unchanged); every GaLore matrix in a bucket gets
    # one, projected or left for its refresh
    marks: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)


class LowRankHookState:
    """The comm hook's state: the GaLore optimizer that will step these parameters, the
    process group DDP reduces over (None: the default group), and the wire dtype
    (torch.bfloat16 halves the bytes: the sum over ranks is rounded to bf16, as DDP's
    bf16_compress_hook does; averaged in fp32)."""

    def __init__(self, optimizer: GaLoreOptimizer, process_group: Any = None, reduce_dtype: torch.dtype = torch.float32) -> None:
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError(f"lowrank_comm_hook needs a galore_ds optimizer, got {type(optimizer).__name__}")
        if optimizer.rule.needs_full_grad:
            raise ValueError(f"lowrank_comm_hook cannot carry {type(optimizer).__name__}: it reads each matrix's full "
                             "gradient, and the hook averages only projections; use plain DDP (no comm hook)")
        if reduce_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"reduce_dtype={reduce_dtype}: expected torch.float32 or torch.bfloat16")
        self.optimizer = optimizer
        self.reduce_dtype = reduce_dtype
        self.group = process_group if process_group is not None else dist.group.WORLD
        galore = {id(p) for g in optimizer.param_groups if "rank" in g for p in g["params"]}
        optimizer.attach_lowrank_reduction(LowRankReduction(self.group, galore))


def lowrank_comm_hook(state: LowRankHookState, bucket: "dist.GradBucket") -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook (see the module docstring). Returns the bucket's buffer with
    the other parameters' gradients averaged; GaLore matrices keep their own gradient there
    (the optimizer uses the averaged R instead, or refreshes from the contributions)."""
    opt = state.optimizer
    red = opt.lowrank
    _, world = group_rank_size(state.group)
    buffer = bucket.buffer()
    sends, slots = [], []
    for p, g in zip(bucket.parameters(), bucket.gradients()):
        if id(p) in red.galore:
            st = opt.state.get(p)
            red.marks[id(p)] = (st["step"] if st and "step" in st else 0, grad_mark(g.view(p.shape)))
            low = opt.lowrank_for_hook(p, g)
            if low is not None:
                sends.append(low.reshape(-1))
                slots.append(("R", p, low.shape))
            continue  # due for a refresh: the optimizer reduces what it needs
        sends.append(g.reshape(-1).float())
        slots.append(("G", g, None))
    if not sends:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buffer)
        return fut
    packed = torch.cat(sends).to(state.reduce_dtype)
    COMM.record("lowrank_comm_hook", packed.numel() * packed.element_size())
    work = dist.all_reduce(packed, group=state.group, async_op=True)

    def unpack(f) -> torch.Tensor:
        total = f.value()[0].float().div_(world)
        offset = 0
        for kind, target, shape in slots:
            if kind == "R":
                n = 1
                for d in shape:
                    n *= d
                red.reduced[id(target)] = (opt.state[target]["step"], total[offset:offset + n].reshape(shape).clone())
            else:
                n = target.numel()
                target.copy_(total[offset:offset + n].reshape(target.shape).to(target.dtype))
            offset += n
        return buffer

    return work.get_future().then(unpack)


# DDP checks the hook's annotations as objects (this module's are strings: postponed evaluation)
lowrank_comm_hook.__annotations__.update(state=LowRankHookState, bucket=dist.GradBucket,
                                         **{"return": torch.futures.Future[torch.Tensor]})

__all__ = ["LowRankReduction", "LowRankHookState", "lowrank_comm_hook"]
