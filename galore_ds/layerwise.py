"""Per-layer GaLore updates: the 24 GB single-GPU mode, with exact accumulation and clipping.

Each parameter is updated inside its post-accumulate-grad hook, while the backward pass is
still running, and its full gradient is freed right after: at no time are all full
gradients stored (the paper's 7B-on-one-GPU mode). The optimizer is any of the core
GaLore optimizers (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor) built on the usual
parameter groups; non-GaLore groups (embeddings, lm_head, norms) are stepped the same way
with the optimizer's full-rank rule (8-bit Adam in GaLoreAdamW8bit).

    opt = GaLoreAdamW8bit(param_groups(model, rank=1024), lr=5e-3)
    lw = LayerwiseOptimizer(opt, accumulation_steps=4, max_grad_norm=1.0, lr_scheduler=sched)
    for batch in loader:
        (model(**batch).loss / lw.accumulation_steps).backward()
        if lw.step(): log(lw.grad_norm)          # True once per optimizer step

Gradient accumulation (exact)
-----------------------------
An optimizer step covers `accumulation_steps` (k) micro-batches; `lw.step()` is called
after each micro-batch's backward and returns True when a step was completed.
- A GaLore matrix whose projector is NOT refreshed at this step accumulates its projected
  gradient R = sum_i P(G_i) (r x max(m, n), fp32) and frees G_i at once: projection is
  linear, so this equals P(sum_i G_i) up to rounding.
- A GaLore matrix whose projector IS refreshed at this step (known at the start of the
  window: refresh steps depend only on the step count) keeps its full gradient, which
  autograd accumulates in `p.grad` across the window; at the last micro-batch the new
  basis is computed from the full sum, then it is projected and freed. This is the exact
  method; with `stagger=True` in the optimizer only about n/update_proj_gap matrices hold
  a full gradient in any window, so the cost stays small.
- Non-GaLore parameters accumulate their full gradient in `p.grad` (as without per-layer
  mode) and are updated once per window.
The update is then the core optimizer's own rule on the accumulated gradient: k
micro-batches of B equal one batch of kB with the ordinary optimizer (tested to 1e-5).

Clipping and the gradient norm
------------------------------
`grad_norm` (always computed, exact, logged once per step) is the global L2 norm of the
gradient the optimizer consumes: the projected gradient R of each GaLore matrix and the
full gradient of every other parameter, accumulated over the window, before clipping.
`full_grad_norm` is the norm of the full gradients (what `torch.nn.utils.clip_grad_norm_`
would see); it is exact when accumulation_steps == 1 and None otherwise (the full
accumulated gradient of a non-refreshing matrix is never formed).
With `max_grad_norm` set (clip_timing="exact", the default), every parameter's update is
deferred to `lw.step()` (two-pass):
backward stores R (GaLore) or the full gradient (others), then the coefficient
min(1, max_norm / (norm + 1e-6)) (torch's formula) multiplies R and the full gradients and
the updates run. Clipping R by c equals clipping G by c (projection is linear; the refresh
basis is scale-invariant). `clip_norm="lowrank"` (default) clips by `grad_norm`;
`clip_norm="full"` (accumulation_steps == 1 only) clips by `full_grad_norm`, i.e. exactly
`clip_grad_norm_(model.parameters(), max_norm)` followed by the ordinary optimizer step.
Without clipping and with k == 1, each parameter is updated inside its hook (the minimal
memory mode); with k > 1 the low-rank accumulators exist anyway, so deferring costs nothing.
Exact clipping at k == 1 therefore holds every R until the end of backward: 6.8 GiB of fp32
for a 7B model at rank 1024, which breaks the 24 GB budget. clip_timing="delayed" keeps the
minimal memory mode and clips step t's update by the coefficient computed from step t-1's
norm (the same formula; step 0 is unclipped, with warmup its lr is the smallest of the run).
The norm of step t is still exact and logged; only its use moves one step later.

NaN/Inf gradients
-----------------
Deferred mode (exact clipping, or k > 1): a non-finite norm drops the whole step: no update,
the refreshes done in this window are undone, no scheduler step, `skipped_steps` += 1.
Immediate mode (no clipping or delayed clipping, k == 1): other layers may already be
updated when a bad gradient arrives, so that parameter's update (and refresh) alone is
dropped and counted in `nonfinite_params_skipped`; no weight ever receives NaN/Inf.

Scheduler and checkpoints
-------------------------
`lr_scheduler` (optional) is stepped once per optimizer step, never per micro-batch or per
parameter. `state_dict()` holds the optimizer state (plain tensors), the window position,
the low-rank accumulators and the partial full gradients, so a checkpoint taken between
any two micro-batches resumes bit-identically (`torch.load(weights_only=True)` works).
Do not call `optimizer.step()` or `optimizer.zero_grad()` yourself while the wrapper is
attached; `zero_grad()` here drops a partial window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from galore_ds import projector as pj
from galore_ds.optim.base import GaLoreOptimizer, ParamItem, RefreshJob

CLIP_NORMS = ("lowrank", "full")
CLIP_TIMINGS = ("exact", "delayed")


@dataclass
class _Meta:
    group_index: int  # index into optimizer.param_groups (looked up at use: load_state_dict
                      # and schedulers replace or edit the group dicts)
    pos: int          # position in its group (stagger offsets)
    n_in_group: int
    index: int        # global parameter index, as GaLoreOptimizer._collect counts it
    galore: bool


class LayerwiseOptimizer:
    """Run a GaLore optimizer per parameter inside backward (see the module docstring).

    Args:
        optimizer: a GaLoreOptimizer (GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor).
        accumulation_steps: micro-batches per optimizer step (k >= 1). Scale each
            micro-batch loss by 1/k (as without per-layer mode).
        max_grad_norm: clip threshold (None: no clipping).
        clip_norm: "lowrank" (norm of the consumed gradient) | "full" (k == 1 only).
        clip_timing: "exact" (this step's norm: updates wait for the end of backward) |
            "delayed" (k == 1: the previous step's norm, updates inside the hooks).
        lr_scheduler: stepped once per optimizer step.
        accum_dtype: dtype of the low-rank accumulators (fp32 default: exact).
    """

    def __init__(
        self,
        optimizer: GaLoreOptimizer,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        clip_norm: str = "lowrank",
        clip_timing: str = "exact",
        lr_scheduler: Any = None,
        accum_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(optimizer, GaLoreOptimizer):
            raise TypeError(f"LayerwiseOptimizer needs a GaLoreOptimizer, got {type(optimizer).__name__}")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r}: must be an integer >= 1")
        if clip_norm not in CLIP_NORMS:
            raise ValueError(f"clip_norm={clip_norm!r}: expected one of {CLIP_NORMS}")
        if clip_norm == "full" and accumulation_steps > 1:
            raise ValueError(
                "clip_norm='full' needs accumulation_steps == 1: the full accumulated gradient "
                "of a GaLore matrix is never formed; use clip_norm='lowrank'"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: must be > 0 or None")
        if clip_timing not in CLIP_TIMINGS:
            raise ValueError(f"clip_timing={clip_timing!r}: expected one of {CLIP_TIMINGS}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip_norm = clip_norm
        self.lr_scheduler = lr_scheduler
        self.accum_dtype = accum_dtype
        self.clip_timing = clip_timing
        # Exact clipping needs the step's norm before any update, so updates wait for step();
        # accumulation keeps low-rank accumulators anyway. Otherwise updates run in the hooks.
        self.deferred = (max_grad_norm is not None and clip_timing == "exact") or accumulation_steps > 1
        self._next_coef = 1.0  # delayed clipping: the coefficient from the previous step's norm

        self.micro_step = 0      # micro-batches done in the current window
        self.global_step = 0     # optimizer steps done
        self.grad_norm: float | None = None
        self.full_grad_norm: float | None = None
        self.clip_coef: float = 1.0
        self.skipped_steps = 0             # deferred mode: whole steps dropped (NaN/Inf norm)
        self.nonfinite_params_skipped = 0  # immediate mode: single updates dropped

        self._meta: dict[torch.Tensor, _Meta] = {}
        self._params: list[torch.Tensor] = []
        index = 0
        for gi, group in enumerate(optimizer.param_groups):
            galore = "rank" in group
            for pos, p in enumerate(group["params"]):
                index += 1
                if p in self._meta:
                    raise ValueError("a parameter appears twice in the optimizer's groups")
                self._meta[p] = _Meta(gi, pos, len(group["params"]) if galore else 0,
                                      index - 1, galore)
                self._params.append(p)
        self._acc: dict[torch.Tensor, torch.Tensor] = {}     # GaLore low-rank accumulators
        self._ready: dict[torch.Tensor, torch.Tensor | None] = {}  # deferred: to update at step()
        self._sq_low: torch.Tensor | None = None
        self._sq_full: torch.Tensor | None = None
        # optimizer state of matrices refreshed in this window, as it was before: a skipped
        # step puts it back (projectors and moments unchanged, as if the step never ran)
        self._undo: dict[torch.Tensor, dict[str, Any]] = {}
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook)
            for p in self._params if p.requires_grad
        ]

    # ------------------------------------------------------------------ public API
    def step(self) -> bool:
        """Call after each micro-batch's backward. Returns True when an optimizer step ended."""
        self.micro_step += 1
        if self.micro_step < self.accumulation_steps:
            return False
        self.micro_step = 0
        with torch.no_grad():
            # Parameters whose gradient arrived earlier in the window but not in its last
            # micro-batch (unused in that forward) are finished here.
            for p in self._params:
                if p not in self._ready and (p in self._acc or p.grad is not None):
                    self._finish(p, defer=True)
            sq_low, sq_full = self._global_sq(self._sq_low, self._sq_full)
            self._sq_low = self._sq_full = None
            self.grad_norm = math.sqrt(sq_low)
            self.full_grad_norm = math.sqrt(sq_full) if self.accumulation_steps == 1 else None
            finite = math.isfinite(self.grad_norm) and math.isfinite(self.full_grad_norm or 0.0)
            if self.deferred and not finite:
                self._skip_window()
                return True
            norm = self.full_grad_norm if self.clip_norm == "full" else self.grad_norm
            # torch's clip_grad_norm_ formula
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm is not None else 1.0
            if not self.deferred:  # updates already ran, with the previous step's coefficient
                self.clip_coef = self._immediate_coef()
                if finite:
                    self._next_coef = coef
            else:
                self.clip_coef = coef
            for p, lowrank in self._ready.items():
                self._apply(p, lowrank, self.clip_coef)
            self._ready = {}
            self._undo = {}
        self.global_step += 1
        if self.lr_scheduler is not None:
            # The optimizer's step() is never called (updates ran per parameter); tell the
            # scheduler an optimizer step happened, as torch's step wrapper would.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            self.lr_scheduler.step()
        return True

    def _immediate_coef(self) -> float:
        """Clip coefficient of an update that runs inside its hook (delayed clipping)."""
        return self._next_coef if self.max_grad_norm is not None else 1.0

    def _skip_window(self) -> None:
        """A NaN/Inf gradient norm: drop the whole step. Weights, moments, projectors, step
        counts and the lr schedule stay as they were (refreshes of this window undone)."""
        for p in list(self._undo):
            self._undo_refresh(p)
        for p in self._ready:
            p.grad = None
        self._ready = {}
        self.skipped_steps += 1

    def _undo_refresh(self, p: torch.Tensor) -> None:
        """Put back the optimizer state `p` had before this window's refresh (if it had one)."""
        saved = self._undo.pop(p, None)
        if saved is not None:
            state = self.optimizer.state[p]
            state.clear()
            state.update(saved)

    def _global_sq(self, sq_low: torch.Tensor | None, sq_full: torch.Tensor | None) -> tuple[float, float]:
        """Squared norms of the window's gradient (low-rank view, full view) over all of it.
        One process holds all of it; sharded subclasses sum them across ranks."""
        return (float(sq_low) if sq_low is not None else 0.0,
                float(sq_full) if sq_full is not None else 0.0)

    def _refresh(self, job: RefreshJob) -> None:
        """Compute and install one matrix's new projector (the optimizer's own refresh: local
        here, owner-based in sharded optimizers)."""
        self.optimizer._refresh([job])

    def zero_grad(self) -> None:
        """Drop a partial window (accumulators and partial gradients)."""
        self._acc.clear()
        self._ready = {}
        self._undo = {}
        self._sq_low = self._sq_full = None
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
        lw: dict[str, Any] = {
            "micro_step": self.micro_step,
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "next_clip_coef": self._next_coef,
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
        by_index = {self._meta[p].index: p for p in self._params}
        self.micro_step = int(lw["micro_step"])
        self.global_step = int(lw["global_step"])
        self.skipped_steps = int(lw.get("skipped_steps", 0))
        self._next_coef = float(lw.get("next_clip_coef", 1.0))
        self._acc = {by_index[int(i)]: t.to(by_index[int(i)].device, self.accum_dtype).clone()
                     for i, t in lw["acc"].items()}
        for p in self._params:
            p.grad = None
        for i, g in lw["grads"].items():
            p = by_index[int(i)]
            p.grad = g.to(p.device, p.dtype).clone()
        self._ready = {}
        self._sq_low = self._sq_full = None
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    # ------------------------------------------------------------------ internals
    def _group(self, meta: _Meta) -> dict:
        return self.optimizer.param_groups[meta.group_index]

    def _refreshing(self, p: torch.Tensor) -> bool:
        meta = self._meta[p]
        state = self.optimizer.state[p]
        state.setdefault("step", 0)
        return self.optimizer._refresh_due(state, self._group(meta), meta.pos, meta.n_in_group)

    def _add_sq(self, attr: str, t: torch.Tensor) -> torch.Tensor:
        """Add |t|^2 to the window's sum; returns it (non-finite iff t has a NaN/Inf)."""
        sq = torch.linalg.vector_norm(t, dtype=torch.float32).square()
        cur = getattr(self, attr)
        setattr(self, attr, sq if cur is None else cur + sq)
        return sq

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if p.grad.is_sparse:
            raise RuntimeError("LayerwiseOptimizer does not support sparse gradients")
        last = self.micro_step + 1 >= self.accumulation_steps
        if last:
            self._finish(p, defer=self.deferred)
        elif self._meta[p].galore and not self._refreshing(p):
            # Mid-window, projector fixed for this step: keep only the projected gradient.
            opt = self.optimizer
            param, grad = opt._local(p)
            item = ParamItem(param, grad, opt.state[p], self._group(self._meta[p]), True, source=p)
            low = opt._low_rank_grad(item).to(self.accum_dtype)
            if p in self._acc:
                self._acc[p].add_(low)
            else:
                self._acc[p] = low  # a fresh tensor (a matmul result)
            p.grad = None
        # else: refreshing GaLore matrix or full-rank parameter: autograd accumulates p.grad.

    def _finish(self, p: torch.Tensor, defer: bool) -> None:
        """End of the window for `p`: refresh if due, project, count norms, update or stage."""
        opt, meta = self.optimizer, self._meta[p]
        state = opt.state[p]
        param, grad = opt._local(p)
        acc = self._acc.pop(p, None)
        if grad is not None and self.accumulation_steps == 1:
            self._add_sq("_sq_full", grad)
        if not meta.galore:
            sq = self._add_sq("_sq_low", grad)
            if defer:
                self._ready[p] = None          # p.grad is consumed at step()
            elif self._finite_or_restore(p, sq):
                self._apply(p, None, self._immediate_coef())
            return
        low = acc
        if grad is not None:
            item = ParamItem(param, grad, state, self._group(meta), True, source=p)
            if self._refreshing(p):
                group = self._group(meta)
                reset = group["moments"] == "reset"  # the only policy that edits in place
                self._undo[p] = {k: v.clone() if reset and torch.is_tensor(v) else v
                                 for k, v in state.items()}
                shape = opt._global_shape(p)
                job = RefreshJob(item, pj.choose_side(shape, group["proj_type"]),
                                 shape, meta.index, state["step"])
                self._refresh(job)
            low_g = opt._low_rank_grad(item)
            if low is None:
                low = low_g.to(self.accum_dtype)
            else:
                low.add_(low_g.to(self.accum_dtype))
            p.grad = None
        low = low.float() if low.dtype != torch.float32 else low
        sq = self._add_sq("_sq_low", low)
        if defer:
            self._ready[p] = low
        elif self._finite_or_restore(p, sq):
            self._apply(p, low, self._immediate_coef())

    def _finite_or_restore(self, p: torch.Tensor, sq: torch.Tensor) -> bool:
        """Immediate mode cannot drop the whole step (other layers are already updated), but
        it never writes NaN/Inf into a weight: this parameter's update (and refresh) is
        dropped and counted. `sq` is the gradient's squared norm (already computed for the
        logged norm: no extra pass, no full-size mask)."""
        if bool(torch.isfinite(sq)):
            self._undo.pop(p, None)
            return True
        self._undo_refresh(p)
        p.grad = None
        self.nonfinite_params_skipped += 1
        return False

    def _apply(self, p: torch.Tensor, low: torch.Tensor | None, coef: float) -> None:
        opt, meta = self.optimizer, self._meta[p]
        state = opt.state[p]
        state.setdefault("step", 0)
        param, grad = opt._local(p)
        if meta.galore:
            if coef != 1.0:
                low.mul_(coef)
            item = ParamItem(param, low, state, self._group(meta), True, lowrank_grad=low, source=p)
        else:
            if coef != 1.0:
                grad.mul_(coef)
            item = ParamItem(param, grad, state, self._group(meta), False, source=p)
        opt._update_items([item])   # one parameter: the rule's temporaries stay one matrix big
        state["step"] += 1
        p.grad = None


def attach(model_or_optimizer: Any, optimizer: GaLoreOptimizer | None = None, **kwargs: Any) -> LayerwiseOptimizer:
    """`attach(opt, ...)` or `attach(model, opt, ...)`: a LayerwiseOptimizer with its hooks."""
    opt = optimizer if optimizer is not None else model_or_optimizer
    return LayerwiseOptimizer(opt, **kwargs)


__all__ = ["LayerwiseOptimizer", "attach", "CLIP_NORMS"]


def __getattr__(name: str) -> Any:
    # The engine registry names "galore_ds.layerwise:LayerwiseEngine"; the engine lives in
    # galore_ds/train/engine_layerwise.py (imported lazily: it needs transformers and config).
    if name == "LayerwiseEngine":
        from galore_ds.train.engine_layerwise import LayerwiseEngine

        return LayerwiseEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
