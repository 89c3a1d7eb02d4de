"""Per-layer GaLore updates: the 24 GB single-GPU mode, on one rank or inside an FSDP2 backward.

Each parameter is updated inside its post-accumulate-grad hook, while backward is still
running, and its full gradient is freed right after: at no time are all full gradients
stored (the paper's 7B-on-one-GPU mode). The optimizer is any GaLore optimizer on any layout
it supports (plain tensors; FSDP2 shards, whose hooks FSDP2 runs right after each shard's
reduce-scatter, in the same order on every rank); non-GaLore parameters (embeddings,
lm_head, norms) are stepped the same way with the optimizer's full-rank rule.

    opt = GaLoreAdamW8bit(param_groups(model, rank=1024), lr=5e-3)
    lw = LayerwiseOptimizer(opt, accumulation_steps=4, max_grad_norm=1.0, lr_scheduler=sched)
    for batch in loader:
        (model(**batch).loss / lw.loss_divisor).backward()
        if lw.step(): log(lw.grad_norm)          # True once per optimizer step

Gradient accumulation (exact)
-----------------------------
An optimizer step covers `accumulation_steps` (k) micro-batches; `lw.step()` is called
after each micro-batch's backward and returns True when a step was completed.
- A GaLore matrix whose projector is NOT refreshed at this step accumulates its projected
  gradient R = sum_i P(G_i) (fp32) and frees G_i at once: projection is linear, so this
  equals P(sum_i G_i) up to rounding.
- A GaLore matrix whose projector IS refreshed at this step (known at the start of the
  window: refresh steps depend only on the step count) keeps its full gradient, which
  autograd accumulates in `p.grad` across the window; at the last micro-batch the new basis
  is computed from the full sum, then it is projected and freed. With `stagger=True` only
  about n/update_proj_gap matrices hold a full gradient in any window.
- Non-GaLore parameters accumulate their full gradient in `p.grad` and are updated once per
  window.
The update is then the optimizer's own rule on the accumulated gradient: k micro-batches of B
equal one batch of kB with the ordinary optimizer (tested to 1e-5).
A window may end early: `lw.step(end_window=True)` after the last micro-batch of an epoch
whose length k does not divide (the plain loop's `(i + 1) % k == 0 or last`, Accelerate's
`accelerator.sync_gradients`, the Trainer's partial window). Its gradient is the sum of what
those backwards produced, the same p.grad the ordinary optimizer steps on there.

Clipping and the gradient norm
------------------------------
`grad_norm` is the global L2 norm of what the optimizer consumes (the same definition as
the optimizer's own step): the projected gradient R of each GaLore matrix and the full
gradient of every other parameter, accumulated over the window, before clipping. On a
sharded layout it costs ONE scalar all-reduce per step. With `max_grad_norm`
(clip_timing="exact", the default) every update is deferred to `lw.step()` (two passes):
backward stores R (GaLore) or the full gradient (others), then the coefficient
min(1, max_norm / (norm + 1e-6)) scales them and the updates run. Without clipping and
with k == 1, each parameter is updated inside its hook (the minimal memory mode); with k > 1
the low-rank accumulators exist anyway, so deferring costs nothing (delayed clipping with
k > 1 then applies the previous step's coefficient at step(), as the optimizer's own
clip_timing="delayed" does). Exact clipping at k == 1
holds every R until the end of backward: 6.8 GiB of fp32 for a 7B model at rank 1024, which
breaks the 24 GB budget. clip_timing="delayed" keeps the minimal memory mode and clips step
t's update by the coefficient computed from step t-1's norm (step 0 is unclipped; with
warmup its lr is the run's smallest). The norm of step t is still exact and logged.

NaN/Inf gradients
-----------------
Deferred mode (exact clipping, or k > 1): a non-finite norm drops the whole step on every
rank: no update, the refreshes done in this window undone, no scheduler step,
`skipped_steps` += 1.
Immediate mode (no clipping or delayed clipping, k == 1): other layers may already be
updated when a bad gradient arrives, so that parameter's update alone is dropped (on this
rank) and counted in `nonfinite_params_skipped`; no weight ever receives NaN/Inf. One
process also undoes that parameter's refresh; on a sharded layout the step count advances
and the (collectively computed) projector stays, so every rank keeps the same refresh
schedule and its collectives keep matching.

Scheduler and checkpoints
-------------------------
`lr_scheduler` (optional) is stepped once per optimizer step, never per micro-batch or per
parameter. `state_dict()` holds the optimizer state, the window position, the low-rank
accumulators and the partial full gradients, so a checkpoint taken between any two
micro-batches resumes bit-identically (`torch.load(weights_only=True)` works).
Do not call `optimizer.step()` or `optimizer.zero_grad()` yourself while the wrapper is
attached; `zero_grad()` here drops a partial window.

Groups added later and what is refused
--------------------------------------
`optimizer.add_param_group(...)` after the wrapper was built: its parameters are hooked at the
next `step()`; gradients they gathered before (no hook freed them) join their first window,
as in the plain loop that calls zero_grad after step. Several replicated ranks: build the
optimizer with `reduce_group` (it averages inside backward); a model wrapped in
DistributedDataParallel averages only after every hook used its rank's own gradient, and
DDP then writes the average back into p.grad: `step()` refuses that with one line (before any
update when the updates are deferred; after the first step's hooks otherwise). Any other
change to a gradient between its hook and `step()` (torch.nn.utils.clip_grad_norm_: clip
with `max_grad_norm`) is refused the same way.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from galore_ds.core.groups import refresh_due
from galore_ds.core.update import Item
from galore_ds.layouts.comm import COMM, group_rank_size, max_over_groups
from galore_ds.layouts.base import local_tensor
from galore_ds.optim.entry import Entry
from galore_ds.layouts.dtensor import is_dtensor
from galore_ds.optim.step import GaLoreOptimizer, grad_mark, marks_differ, norm_from_squares, norm_key

CLIP_TIMINGS = ("exact", "delayed")


@dataclass
class _Meta:
    group_index: int  # index into optimizer.param_groups (looked up at use: load_state_dict
                      # and schedulers replace or edit the group dicts)
    pos: int          # position in its group (stagger offsets)
    n_in_group: int
    index: int        # global parameter index, as the optimizer counts it
    galore: bool


class LayerwiseOptimizer:
    """Run a GaLore optimizer per parameter inside backward (see the module docstring).

    Args:
        optimizer: a GaLoreOptimizer (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor).
        accumulation_steps: micro-batches per optimizer step (k >= 1). Divide each
            micro-batch loss by `loss_divisor` (k; 1 with accum_dtype=float64).
        max_grad_norm: clip threshold (None: the optimizer's max_grad_norm and clip_timing,
            if it was built with them; else no clipping). Given here, it is set on the
            optimizer: the clipping state (threshold, timing, carried coefficient, norm,
            skipped steps) is the optimizer's, one copy, read and written by its phases.
        clip_timing: "exact" (this step's norm: updates wait for the end of backward) |
            "delayed" (the previous step's norm; at k == 1 the updates stay inside the hooks).
        lr_scheduler: stepped once per optimizer step.
        accum_dtype: dtype of the accumulators (fp32 default: exact to rounding). float64 sums
            every micro-batch's gradient (the loss not divided by k), full ones included, and
            averages across ranks, in fp64, dividing by k and the world size at the end: a
            step's result then does not depend on how its micro-batches are spread over
            ranks, and a run resumed on another world size follows the same numbers.
        bucket_mb: replicated weights whose gradients are per-rank contributions (optimizer
            built with reduce_group): what is averaged travels in asynchronous buckets of this
            size, launched as backward goes on.
        reduce_dtype: the wire dtype of those buckets (None: the accumulators' dtype).
            torch.bfloat16 halves the bytes; the sum over ranks is then rounded to bf16 (about
            3 significant digits, as DDP's bf16 gradient compression), and averaged in fp32.
    """

    def __init__(
        self,
        optimizer: GaLoreOptimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_timing: str = "exact",
        lr_scheduler: Any = None,
        accum_dtype: torch.dtype = torch.float32,
        bucket_mb: float = 25,
        reduce_dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError(f"LayerwiseOptimizer needs a GaLoreOptimizer, got {type(optimizer).__name__}")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r}: must be an integer >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0 or None")
        if clip_timing not in CLIP_TIMINGS:
            raise ValueError(f"clip_timing={clip_timing!r}: expected one of {CLIP_TIMINGS}")
        if accum_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accum_dtype={accum_dtype}: expected torch.float32 or torch.float64")
        if reduce_dtype not in (None, torch.float32, torch.bfloat16) or (
                reduce_dtype == torch.bfloat16 and accum_dtype == torch.float64):
            raise ValueError(f"reduce_dtype={reduce_dtype}: expected None, torch.float32 or torch.bfloat16 "
                             "(bfloat16 with accum_dtype=float32)")
        if optimizer.zero is not None:
            raise ValueError("LayerwiseOptimizer: DeepSpeed ZeRO owns the gradients; use its step")
        if accum_dtype == torch.float64 and optimizer.rule.needs_full_grad:
            raise ValueError(f"accum_dtype=torch.float64: {type(optimizer).__name__} reads each matrix's full gradient, "
                             "which autograd accumulates in the parameter's dtype; use accum_dtype=torch.float32")
        if max_grad_norm is not None:
            # one clipping state, the optimizer's: given here, it must agree with the
            # optimizer's own (if it has one), and becomes it
            if optimizer.max_grad_norm is not None and (
                    (max_grad_norm, clip_timing) != (optimizer.max_grad_norm, optimizer.clip_timing)):
                raise ValueError(
                    f"LayerwiseOptimizer(max_grad_norm={max_grad_norm!r}, clip_timing={clip_timing!r}) and its "
                    f"optimizer's max_grad_norm={optimizer.max_grad_norm!r}, clip_timing={optimizer.clip_timing!r} "
                    "differ: set them on one of the two")
            optimizer.max_grad_norm, optimizer.clip_timing = max_grad_norm, clip_timing
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.lr_scheduler = lr_scheduler
        self.accum_dtype = accum_dtype
        self.reduce_dtype = reduce_dtype

        self.micro_step = 0      # micro-batches done in the current window
        self.global_step = 0     # optimizer steps done
        self.nonfinite_params_skipped = 0  # immediate mode: single updates dropped

        self._meta: dict[torch.Tensor, _Meta] = {}
        self._params: list[torch.Tensor] = []
        self._handles: list = []
        # every process group some parameter's norm sums over: all ranks join each, every step
        self._norm_groups: dict[int, Any] = {}
        self._n_params = 0                       # parameters in the optimizer's groups when last read
        self._sync_groups()
        self.bucket_numel = bucket_mb * 2**20 // 4
        self._bucket: list = []                              # replicated weights: to average
        self._bucket_numel = 0
        self._inflight: list = []                            # (work, buffer, bucket, world) launched
        self._acc: dict[torch.Tensor, torch.Tensor] = {}     # GaLore low-rank accumulators
        self._ready: list[tuple[Entry, Item]] = []           # deferred: to update at step()
        self._sq: dict[int, torch.Tensor] = {}               # this window's squared norms by group (0: local)
        # optimizer state of matrices refreshed in this window, as it was before: a skipped
        # step puts it back (projectors and moments unchanged, as if the step never ran)
        self._undo: dict[int, tuple[dict, dict]] = {}
        # what each hook of the current micro-batch left in p.grad: None (taken and freed) or
        # (a weak reference to the gradient, so that a gradient freed later is not kept alive,
        # and its version). step() checks that nothing wrote them since (_check_untouched).
        self._seen: dict[torch.Tensor, tuple[weakref.ref, int | torch.Tensor] | None] = {}

    def _sync_groups(self) -> None:
        """Hook every parameter of the optimizer's groups not hooked yet: those of the
        constructor, then any group added later (opt.add_param_group), read at the next step().
        A late parameter's gradients from backwards before then sit in p.grad (no hook took
        them), where the plain optimizer would read them too; its first window ends with it."""
        groups = self.optimizer.param_groups
        if sum(len(g["params"]) for g in groups) == self._n_params:
            return
        late, index, seen = self._n_params > 0, 0, set()
        for gi, group in enumerate(groups):
            galore = "rank" in group
            for pos, p in enumerate(group["params"]):
                index += 1
                if id(p) in seen:
                    raise ValueError("a parameter appears twice in the optimizer's groups")
                seen.add(id(p))
                if p in self._meta:
                    continue
                self._meta[p] = _Meta(gi, pos, len(group["params"]), index - 1, galore)
                self._params.append(p)
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
                g = self.optimizer.layout_of(p).norm_group
                if g is not None:
                    self._norm_groups.setdefault(id(g), g)
        self._n_params = index
        if late:
            self.optimizer.forget_layouts()  # replicated owners are assigned over all matrices

    # The clipping state is the optimizer's (GaLoreOptimizer.clip_for): these read it.
    @property
    def max_grad_norm(self) -> float | None:
        return self.optimizer.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self.optimizer.max_grad_norm = value

    @property
    def clip_timing(self) -> str:
        return self.optimizer.clip_timing

    @clip_timing.setter
    def clip_timing(self, value: str) -> None:
        self.optimizer.clip_timing = value

    @property
    def grad_norm(self) -> float | None:
        """The last window's global norm of what the optimizer consumed, before clipping."""
        return self.optimizer.grad_norm

    @property
    def clip_coef(self) -> float:
        """The coefficient the last window's updates were scaled by."""
        return self.optimizer.clip_coef

    @property
    def skipped_steps(self) -> int:
        """Whole steps dropped for a NaN/Inf norm (deferred mode)."""
        return self.optimizer.skipped_steps

    @property
    def deferred(self) -> bool:
        """Exact clipping needs the step's norm before any update, so updates wait for step();
        accumulation keeps low-rank accumulators anyway. Otherwise updates run in the hooks."""
        return (self.max_grad_norm is not None and self.clip_timing == "exact") or self.accumulation_steps > 1

    @property
    def loss_divisor(self) -> int:
        """What to divide each micro-batch's loss by before backward: k, or 1 with
        accum_dtype=float64 (the wrapper divides the fp64 sum)."""
        return 1 if self.accum_dtype == torch.float64 else self.accumulation_steps

    # ------------------------------------------------------------------ public API
    def step(self, end_window: bool = False) -> bool:
        """Call after each micro-batch's backward. Returns True when an optimizer step ended.

        A window ends after `accumulation_steps` micro-batches, or here with end_window=True:
        the last, partial window of an epoch, which the plain loop (`(i + 1) % k == 0 or last`),
        Accelerate's accumulate() and the Trainer all step on. It is the sum of the gradients
        its backwards produced (each loss divided as usual: `loss_divisor`, or the Trainer's
        scaling), as p.grad holds it when the plain loop steps there."""
        self._check_untouched()
        self._sync_groups()
        self.micro_step += 1
        if self.micro_step < self.accumulation_steps and not end_window:
            return False
        self.micro_step = 0
        opt = self.optimizer
        with torch.no_grad():
            # Parameters whose gradient arrived earlier in the window but not in its last
            # micro-batch (unused in that forward, or a window closed early), and parameters
            # added since the last step, are finished here.
            self._drain()
            finished = {id(e.param) for e, _ in self._ready}
            for p in self._params:
                if id(p) not in finished and (p in self._acc or p.grad is not None):
                    self._finish(self._entry(p), defer=True)
            self._drain()
            # the optimizer's own phases: norm -> clip coefficient (or skip) -> apply
            coef = opt.clip_for(self._window_norm())
            if coef is None and self.deferred:
                self._skip_window()
                return True
            if coef is None:
                # immediate mode: the finite parameters were updated in their hooks with the
                # carried coefficient; the non-finite ones were dropped (nonfinite_params_skipped)
                opt.clip_coef = opt.immediate_clip_coef()
            elif self._ready:
                self._apply([item for _, item in self._ready], [e for e, _ in self._ready], coef)
            self._ready = []
            self._undo = {}
        self.global_step += 1
        if self.lr_scheduler is not None:
            # The optimizer's step() is never called (updates ran per parameter); tell the
            # scheduler an optimizer step happened, as torch's step wrapper would.
            opt._opt_called = True  # type: ignore[attr-defined]
            self.lr_scheduler.step()
        return True

    def _check_untouched(self) -> None:
        """Refuse a gradient written after the per-layer hook took it: DistributedDataParallel
        averages gradients when backward ends, after every hook has already used (and freed)
        its rank's own gradient, and writes the average back into p.grad; an in-place change
        (torch's clip_grad_norm_) comes after the hooks counted the norm. Ranks may disagree
        (a rank whose buckets were averaged and freed sooner holds fewer gradients, so its own
        clip_grad_norm_ may scale nothing), and a rank that refuses alone would leave the others
        in the step's collectives: the verdict is agreed first (_agree)."""
        seen, self._seen = self._seen, {}
        verdict = _UNTOUCHED
        for p, was in seen.items():
            g = p.grad
            if g is None:
                continue
            if was is None:
                verdict = max(verdict, _WRITTEN_AFTER_HOOK)
            elif g is not was[0]() or _changed(g, was[1]):
                verdict = max(verdict, _CHANGED)
        if seen:   # every rank ran the same hooks: every rank agrees, or none needs to
            verdict = self._agree(verdict)
        if verdict == _WRITTEN_AFTER_HOOK:
            raise RuntimeError(
                "LayerwiseOptimizer: a gradient was written into a parameter after its per-layer update took "
                "it (a DistributedDataParallel model: DDP averages when backward ends, after each rank used its "
                "own gradient); do not wrap the model in DDP, build the optimizer with "
                "reduce_group=torch.distributed.group.WORLD (it averages the low-rank gradients itself)")
        if verdict == _CHANGED:
            raise RuntimeError(
                "LayerwiseOptimizer: a gradient changed between its per-layer hook and step() (DDP averaging "
                "it or torch.nn.utils.clip_grad_norm_): the hooks already counted it; clip with "
                "LayerwiseOptimizer(max_grad_norm=...) and average with reduce_group=torch.distributed.group.WORLD")

    def _agree(self, verdict: int) -> int:
        """The largest verdict over the ranks this wrapper steps with: the optimizer's reduce
        group and the parameters' shard groups (one 4-byte all-reduce each; none in one process)."""
        groups = [] if self.optimizer.reduce_group is None else [self.optimizer.reduce_group]
        groups += list(self._norm_groups.values())
        flag = torch.tensor([float(verdict)], device=local_tensor(self._params[0]).device)
        return int(max_over_groups(flag, groups, "clip_check").item())

    def _window_norm(self) -> float:
        """The window's global norm, summed over the hooks as they ran: ONE scalar all-reduce
        per group of sharded parameters (the optimizer's norm_from_squares)."""
        sq, self._sq = self._sq, {}
        return norm_from_squares(sq, self._norm_groups)

    def _skip_window(self) -> None:
        """A NaN/Inf gradient norm: drop the whole step. Weights, moments, projectors, step
        counts and the lr schedule stay as they were (refreshes of this window undone)."""
        self.optimizer.skip(self._undo)
        self._undo = {}
        for e, _ in self._ready:
            e.param.grad = None
        self._ready = []

    def zero_grad(self) -> None:
        """Drop a partial window (accumulators and partial gradients)."""
        self._acc.clear()
        self._bucket, self._bucket_numel, self._inflight = [], 0, []
        self._ready = []
        self._undo = {}
        self._sq = {}
        self._seen = {}
        self.micro_step = 0
        for p in self._params:
            p.grad = None

    def remove(self) -> None:
        """Detach the hooks (the optimizer can then be used normally)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state + window position + accumulators; plain tensors only.

        Take it between micro-batches (after `step()`), never inside a backward.
        """
        self._sync_groups()
        lw: dict[str, Any] = {
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,   # the optimizer's counter (not in its state dict)
            "accumulation_steps": self.accumulation_steps,
            "acc": {self._meta[p].index: t for p, t in self._acc.items()},
            "grads": {self._meta[p].index: p.grad for p in self._params if p.grad is not None},
        }
        out = {"optimizer": self.optimizer.state_dict(), "layerwise": lw}
        if self.lr_scheduler is not None:
            out["lr_scheduler"] = self.lr_scheduler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lw = state["layerwise"]
        if lw["accumulation_steps"] != self.accumulation_steps and lw["micro_step"] != 0:
            raise ValueError(
                f"checkpoint taken inside a window of {lw['accumulation_steps']} micro-batches "
                f"cannot resume with accumulation_steps={self.accumulation_steps}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.load_window(lw)
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    def load_window(self, lw: dict[str, Any]) -> None:
        """The per-layer part of a state dict (window position, accumulators, counters)."""
        self._sync_groups()
        by_index = {self._meta[p].index: p for p in self._params}
        self.micro_step = int(lw["micro_step"])
        self.global_step = int(lw["global_step"])
        self.optimizer.skipped_steps = int(lw.get("skipped_steps", 0))
        if "next_clip_coef" in lw:  # written by versions whose wrapper kept its own copy
            self.optimizer.next_clip_coef = float(lw["next_clip_coef"])
        self._acc = {}
        for i, t in lw.get("acc", {}).items():
            p = by_index[int(i)]
            device = local_tensor(p).device
            self._acc[p] = t.to(device, self.accum_dtype).clone()
        for p in self._params:
            p.grad = None
        for i, g in lw.get("grads", {}).items():
            p = by_index[int(i)]
            p.grad = g.to(p.device, p.dtype).clone()
        self._ready = []
        self._sq = {}
        self._seen = {}

    # ------------------------------------------------------------------ internals
    def _entry(self, p: torch.Tensor) -> Entry:
        meta, opt = self._meta[p], self.optimizer
        group = opt.param_groups[meta.group_index]
        return opt.entry(p, p, opt.layout_of(p), group, meta.index, meta.pos, meta.n_in_group, p.grad)

    def _add_sq(self, item: Item) -> torch.Tensor:
        """Add this item's counted squared norm to the window's sums; returns it (non-finite
        iff its gradient holds a NaN/Inf)."""
        sq = self.optimizer.owned_sq(item).cpu()
        key = norm_key(item)
        self._sq[key] = self._sq.get(key, torch.zeros(())) + sq
        return sq

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError("LayerwiseOptimizer does not support sparse gradients")
        e = self._entry(p)
        if self.micro_step + 1 >= self.accumulation_steps:
            self._finish(e, defer=self.deferred)
        elif e.galore and not self.optimizer.rule.needs_full_grad and not refresh_due(e.state, e.group):
            # Mid-window, projector fixed for this step: keep only the projected gradient
            # (a rule that reads the full gradient, Fira or APOLLO, lets autograd sum it).
            low = self.optimizer.project_one(e).to(self.accum_dtype)
            if p in self._acc:
                self._acc[p].add_(low)
            else:
                self._acc[p] = low  # a fresh tensor (a matmul result)
            p.grad = None
        elif self.accum_dtype == torch.float64:
            # a refreshing matrix or a full-rank parameter, accumulated in fp64 rather than by
            # autograd (the sum no longer depends on how micro-batches are grouped)
            if p in self._acc:
                self._acc[p].add_(p.grad.to(torch.float64))
            else:
                self._acc[p] = p.grad.to(torch.float64)
            p.grad = None
        # else: autograd accumulates p.grad.
        self._seen[p] = None if p.grad is None else (weakref.ref(p.grad), _fingerprint(p.grad))

    def _finish(self, e: Entry, defer: bool) -> None:
        """End of the window for one parameter: refresh if due, project, complete (the
        layout's collectives), count, then update or stage."""
        opt, p = self.optimizer, e.param
        low = self._acc.pop(p, None)
        queued = e.layout.reduce_group is not None and e.layout.group is None
        if self.accum_dtype == torch.float64:
            low = self._finish_wide(e, low)
            if not queued and self.accumulation_steps > 1:
                low.div_(self.accumulation_steps)
        else:
            if e.galore and refresh_due(e.state, e.group):
                opt.refresh([e], self._undo)
            if e.g_local is not None:
                g = opt.project_one(e) if e.galore else e.g_local
                low = g if low is None else low.add_(g.to(low.dtype))
        if e.galore:
            p.grad = None  # the full gradient is not needed once projected
        if queued:
            self._queue(e, low, defer)  # replicated weights: averaged in asynchronous buckets
            return
        self._use(e, opt.complete([e], [self._rule_dtype(e, low)])[0], defer)

    def _finish_wide(self, e: Entry, acc: torch.Tensor | None) -> torch.Tensor:
        """_finish's gradient with accum_dtype=float64: the SUM over the window of every
        micro-batch's gradient (the loss not divided by k), in fp64, divided once at the end
        (by k here, by k x world after the average over ranks). fp32 values add exactly in
        fp64, so the result does not depend on how micro-batches are spread over ranks; only
        a refresh step's fp64 products round (1e-16). A refreshing matrix's refresh sees the
        rank's mean gradient (the sum / k: its average over ranks is the global mean)."""
        opt, k = self.optimizer, self.accumulation_steps
        last = None if e.g_local is None else e.g_local.to(torch.float64)
        if e.galore and refresh_due(e.state, e.group):
            full = last if acc is None else (acc if last is None else acc.add_(last))
            e.g_local = full if k == 1 else full / k
            opt.refresh([e], self._undo)
            e.g_local = full
            return opt.project_one(e)  # fp64 (of an fp64 gradient)
        if last is not None:
            last = opt.project_one(e).to(torch.float64) if e.galore else last
            acc = last if acc is None else acc.add_(last)
        return acc

    def _rule_dtype(self, e: Entry, low: torch.Tensor) -> torch.Tensor:
        """What the rule consumes: projected gradients in fp32, full ones in the parameter's dtype."""
        target = torch.float32 if e.galore else local_tensor(e.param).dtype
        return low if low.dtype == target else low.to(target)

    def _queue(self, e: Entry, low: torch.Tensor, defer: bool) -> None:
        """Average `low` over the reduce group in a bucket launched asynchronously once it holds
        `bucket_numel` elements, so the all-reduce overlaps the rest of backward (DDP's way).
        Finished buckets are put to use as later hooks find them done."""
        self._bucket.append((e, low, defer))
        self._bucket_numel += low.numel()
        if self._bucket_numel >= self.bucket_numel:
            self._launch()
        while self._inflight and self._inflight[0][0].is_completed():
            self._settle(self._inflight.pop(0))

    def _launch(self) -> None:
        if not self._bucket:
            return
        group = self._bucket[0][0].layout.reduce_group
        dtype = torch.float64 if any(low.dtype == torch.float64 for _, low, _ in self._bucket) else torch.float32
        packed = torch.cat([low.reshape(-1).to(self.reduce_dtype or dtype) for _, low, _ in self._bucket])
        COMM.record("layerwise_bucket", packed.numel() * packed.element_size())
        work = dist.all_reduce(packed, group=group, async_op=True)
        self._inflight.append((work, packed, self._bucket, group_rank_size(group)[1]))
        self._bucket, self._bucket_numel = [], 0

    def _settle(self, launched) -> None:
        work, packed, bucket, world = launched
        work.wait()
        if packed.dtype == torch.bfloat16:
            packed = packed.float()
        # fp64 windows queue sums (see _finish_wide): divided once by every micro-batch counted
        packed.div_(world * (self.accumulation_steps if packed.dtype == torch.float64 else 1))
        offset = 0
        for e, low, defer in bucket:
            avg = packed[offset:offset + low.numel()].reshape(low.shape)
            offset += low.numel()
            e.averaged = True
            self._use(e, self.optimizer.complete([e], [self._rule_dtype(e, avg)])[0], defer)

    def _drain(self) -> None:
        """Every queued average launched and put to use (the end of a window)."""
        self._launch()
        while self._inflight:
            self._settle(self._inflight.pop(0))

    def _use(self, e: Entry, item: Item, defer: bool) -> None:
        """Count a finished parameter's norm, then update it now or stage it for step()."""
        opt = self.optimizer
        sq = self._add_sq(item)
        if defer:
            self._ready.append((e, item))
        elif bool(torch.isfinite(sq)):
            self._undo.pop(id(e.state), None)
            self._apply([item], [e], opt.immediate_clip_coef())
        elif opt.collective_update(item):
            # every rank must run this update (its statistics are all-reduced): the NaN
            # reaches every rank's sums there and the rule drops the update everywhere
            self._undo.pop(id(e.state), None)
            self.nonfinite_params_skipped += 1
            self._apply([item], [e], 1.0)
        else:
            self._drop(e)

    def _drop(self, e: Entry) -> None:
        """Immediate mode: a non-finite gradient in this rank's part of a parameter (see the
        module docstring)."""
        saved = self._undo.pop(id(e.state), None)
        if e.layout.group is None:
            if saved is not None:
                GaLoreOptimizer.restore({0: saved})
        else:
            e.state["step"] += 1
        e.param.grad = None
        self.nonfinite_params_skipped += 1

    def _apply(self, items: list[Item], entries: list[Entry], coef: float) -> None:
        self.optimizer.apply(entries, items, coef)
        for e in entries:
            e.param.grad = None


def _fingerprint(grad: torch.Tensor) -> int | torch.Tensor:
    """What a hook notes of a gradient it leaves in p.grad, to see at step() whether anything
    wrote it since: a plain tensor's version counter (O(1)); a DTensor's block norm, since an
    in-place op through a DTensor (torch's clip_grad_norm_ on FSDP2 gradients) leaves the
    version counters as they were."""
    return grad_mark(local_tensor(grad)) if is_dtensor(grad) else grad._version


# _check_untouched's verdicts, ordered: the rank that saw the most specific cause names it
_UNTOUCHED, _CHANGED, _WRITTEN_AFTER_HOOK = 0, 1, 2


def _changed(grad: torch.Tensor, noted: int | torch.Tensor) -> bool:
    if isinstance(noted, torch.Tensor):
        return bool(marks_differ(grad_mark(local_tensor(grad)).reshape(1), noted.reshape(1)))
    return grad._version != noted


def attach(model_or_optimizer: Any, optimizer: GaLoreOptimizer | None = None, **kwargs: Any) -> LayerwiseOptimizer:
    """`attach(opt, ...)` or `attach(model, opt, ...)`: a LayerwiseOptimizer with its hooks."""
    opt = optimizer if optimizer is not None else model_or_optimizer
    return LayerwiseOptimizer(opt, **kwargs)


__all__ = ["LayerwiseOptimizer", "attach", "CLIP_TIMINGS"]
