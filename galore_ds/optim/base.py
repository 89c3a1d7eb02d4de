"""What the three GaLore optimizers share: refresh scheduling, projection, state layout.

A step has three phases, so that distributed subclasses can replace exactly one:
  1. collect: every parameter with a gradient becomes a `ParamItem` (local 2-D gradient,
     global shape, side); GaLore matrices due for a refresh become `RefreshJob`s.
  2. refresh: `_refresh(jobs)` computes every due projector. The default runs locally;
     sharded adapters override it (owner-rank SVD + shared projectors, or distributed
     subspace iteration). Between refreshes no phase communicates.
  3. update: each subclass's `_update(item)` does its rule in low-rank coordinates and
     writes the result straight into the weight (`project_back_`, one fused addmm).

Per-parameter state is plain tensors and numbers (torch.load(weights_only=True) works):
  step              optimizer steps taken by this parameter (galore-torch's "step")
  proj              projector tensor (see projector.py for the layout)
  proj_right        True: right projection, False: left (a bool, not a string: torch's
                    load_state_dict rebuilds any iterable state value, strings included)
  refresh_offset    step offset of this matrix's refresh within the update_proj_gap window
  + the rule's moments (exp_avg, ...), shaped like the low-rank gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from galore_ds import projector as pj

# Group keys that make a group a GaLore group, with the defaults used when a group sets
# `rank` but not the others (paper's pre-training recipe; galore-torch needs all four).
GALORE_GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
}
# Optimizer-wide options beyond the paper; any group may override them.
GALORE_OPTION_DEFAULTS: dict[str, Any] = {
    "refresh": "svd",        # "svd" (exact, the paper) | "randomized" (warm subspace iteration)
    "signs": "aligned",      # "aligned" (deterministic) | "lapack" (galore-torch bit for bit)
    "moments": "keep",       # on refresh: "keep" (paper) | "reproject" | "reset"
    "stagger": False,        # spread refreshes of different matrices across the window
    "oversample": 0,         # randomized: extra random vectors (then Rayleigh-Ritz picks rank)
    "power_iters": 1,        # randomized: iterations per warm-started refresh
    "first_power_iters": 4,  # randomized: iterations of a cold start from a sharded Gram operator
    "seed": 0,               # randomized: seeds are (seed, step, parameter index)
}
MOMENT_POLICIES = ("keep", "reproject", "reset")


def check_adam_hyperparameters(lr: float, betas: tuple[float, float], eps: float) -> None:
    """Refuse bad Adam settings where they enter, naming the value."""
    if lr < 0.0:
        raise ValueError(f"lr={lr}: must be >= 0")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas={tuple(betas)}: each must be in [0, 1)")
    if eps < 0.0:
        raise ValueError(f"eps={eps}: must be >= 0")


def side_of(state: dict) -> pj.Side:
    """The projection side recorded in a parameter's state."""
    return "right" if state["proj_right"] else "left"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (FSDP2 shard), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@dataclass
class ParamItem:
    """One parameter in one step: everything the update rule needs."""

    param: torch.Tensor   # local (rank-owned) values, updated in place
    grad: torch.Tensor    # local gradient, same shape as `param`
    state: dict
    group: dict
    galore: bool
    # Already in the rule's coordinates (e.g. a projected gradient accumulated over
    # micro-batches by galore_ds.layerwise); when set, `_low_rank_grad` returns it as is.
    lowrank_grad: torch.Tensor | None = None
    # The parameter as the optimizer holds it (a DTensor under FSDP2): its global shape and
    # mesh, for rules whose statistics span the whole tensor (Adafactor).
    source: torch.Tensor | None = None


@dataclass
class RefreshJob:
    """One GaLore matrix whose projector is due this step."""

    item: ParamItem
    side: pj.Side
    global_shape: tuple[int, ...]
    index: int            # stable parameter index (seeds, owner assignment)
    step: int             # the parameter's step count before this update


class GaLoreOptimizer(Optimizer):
    """Base class; subclasses implement `_update` and `_init_moments`."""

    #: moment policies a subclass supports on refresh
    supported_moment_policies: tuple[str, ...] = MOMENT_POLICIES

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        for key, value in GALORE_OPTION_DEFAULTS.items():
            defaults.setdefault(key, value)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)
        # Counters a trainer can log; not part of the state dict (they describe this process).
        self.galore_stats: dict[str, int] = {
            "refreshes": 0, "svd_failures": 0, "nonfinite_refresh_skipped": 0,
        }

    # ----------------------------------------------------------------- validation
    def _check_group(self, group: dict) -> None:
        if "rank" not in group:
            return
        for key, value in GALORE_GROUP_DEFAULTS.items():
            group.setdefault(key, value)
        rank, gap = group["rank"], group["update_proj_gap"]
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"param group rank={rank!r}: must be an integer >= 1")
        if not isinstance(gap, int) or gap < 1:
            raise ValueError(f"param group update_proj_gap={gap!r}: must be an integer >= 1")
        pj.choose_side((1, 1), group["proj_type"])  # validates proj_type
        if group["refresh"] not in pj.REFRESH_METHODS:
            raise ValueError(f"refresh={group['refresh']!r}: expected one of {pj.REFRESH_METHODS}")
        if group["signs"] not in pj.SIGN_RULES:
            raise ValueError(f"signs={group['signs']!r}: expected one of {pj.SIGN_RULES}")
        if group["moments"] not in self.supported_moment_policies:
            raise ValueError(
                f"moments={group['moments']!r}: {type(self).__name__} supports "
                f"{self.supported_moment_policies}"
            )
        for p in group["params"]:
            shape = self._global_shape(p)
            if len(shape) != 2:
                raise ValueError(
                    f"GaLore group holds a parameter of shape {tuple(shape)}: only 2-D matrices "
                    "can be projected; put it in a group without 'rank'"
                )
            if rank > min(shape):
                raise ValueError(
                    f"rank={rank} exceeds min{tuple(shape)}={min(shape)} for a GaLore matrix: "
                    "lower rank or leave this matrix out of the GaLore group"
                )

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "galore_stats"):  # groups added after construction
            self._check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader casts floating state to the parameter's dtype; GaLore keeps fp32
        moments for bf16 weights, so saved tensors are re-installed with their saved dtype
        (moved to the parameter's device only)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in saved.get(pid, {}).items():
                    if torch.is_tensor(value):
                        self.state[p][key] = value.to(device=local_tensor(p).device, copy=True)

    # ------------------------------------------------- hooks for sharded subclasses
    def _global_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        """Shape of the full matrix (DTensor.shape is global; ZeRO-3 keeps ds_shape)."""
        return tuple(getattr(p, "ds_shape", p.shape))

    def _local(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(local parameter, local gradient) views for the update."""
        grad = p.grad
        return local_tensor(p), None if grad is None else local_tensor(grad)

    def _refresh(self, jobs: list[RefreshJob]) -> None:
        """Compute every due projector. Default: locally, from the local gradient."""
        for job in jobs:
            self._set_projector(job, self._compute_basis(job, job.item.grad))

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items, jobs = self._collect()
        if jobs:
            self._refresh(jobs)
        self._update_items(items)
        for item in items:
            item.state["step"] += 1
        return loss

    def _collect(self) -> tuple[list[ParamItem], list[RefreshJob]]:
        items: list[ParamItem] = []
        jobs: list[RefreshJob] = []
        index = 0
        for group in self.param_groups:
            galore = "rank" in group
            n_galore = len(group["params"]) if galore else 0
            for pos, p in enumerate(group["params"]):
                index += 1
                param, grad = self._local(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                item = ParamItem(param, grad, state, group, galore, source=p)
                items.append(item)
                if galore and self._refresh_due(state, group, pos, n_galore):
                    shape = self._global_shape(p)
                    jobs.append(RefreshJob(item, pj.choose_side(shape, group["proj_type"]),
                                           shape, index - 1, state["step"]))
        return items, jobs

    @staticmethod
    def _refresh_due(state: dict, group: dict, pos: int, n_in_group: int) -> bool:
        gap = group["update_proj_gap"]
        if "refresh_offset" not in state:
            # Staggered: matrix `pos` of the group refreshes at offset pos*gap/n in the window,
            # so no single step refreshes every layer (latency and memory spikes).
            state["refresh_offset"] = (pos * gap) // max(n_in_group, 1) if group["stagger"] else 0
        step = state["step"]
        if "proj" not in state:
            return True
        return step >= state["refresh_offset"] and (step - state["refresh_offset"]) % gap == 0

    # ------------------------------------------------------------ refresh helpers
    def _compute_basis(
        self, job: RefreshJob, grad: torch.Tensor,
        gram: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """New basis rows for `job` from a full gradient (or a sharded Gram operator).

        Returns None when the gradient is non-finite or the SVD fails in fp32 and fp64:
        the previous projector is kept and the event counted (never crash, never corrupt).
        """
        state, group = job.item.state, job.item.group
        if gram is None and not bool(torch.isfinite(grad).all()):
            self.galore_stats["nonfinite_refresh_skipped"] += 1
            return None
        prev = pj.proj_to_basis(state["proj"], job.side).float() if "proj" in state else None
        try:
            return pj.compute_basis(
                grad, job.side, group["rank"], group["refresh"], prev,
                signs=group["signs"], oversample=group["oversample"],
                iters=group["power_iters"], first_iters=group["first_power_iters"],
                generator=pj.refresh_generator(group["seed"], job.step, job.index), gram=gram,
            )
        except RuntimeError:
            self.galore_stats["svd_failures"] += 1
            return None

    def _set_projector(self, job: RefreshJob, basis: torch.Tensor | None) -> None:
        """Install a new basis (None: keep the old one) and apply the moment policy."""
        state, group = job.item.state, job.item.group
        if basis is None:
            if "proj" in state:
                return
            # First refresh failed: any fixed orthonormal basis keeps training well-defined
            # until the next refresh replaces it.
            dim = job.global_shape[1] if job.side == "right" else job.global_shape[0]
            gen = pj.refresh_generator(group["seed"], job.step, job.index)
            basis = pj.random_basis(dim, group["rank"], gen, job.item.grad.device)
        dtype = torch.float32
        basis = basis.to(job.item.grad.device, dtype)
        if "proj" in state:
            policy = group["moments"]
            if policy == "reproject":
                old = pj.proj_to_basis(state["proj"], job.side).to(dtype)
                self._rotate_moments(state, pj.rotation(old, basis), job.side)
            elif policy == "reset":
                self._reset_moments(state)
        # No .contiguous(): with signs="lapack" the projector keeps LAPACK's memory layout,
        # as galore-torch's does, because the matmul's rounding depends on it.
        state["proj"] = pj.basis_to_proj(basis.to(pj.storage_dtype(job.item.param.dtype)), job.side)
        state["proj_right"] = job.side == "right"
        self.galore_stats["refreshes"] += 1

    # ------------------------------------------------------------ update helpers
    @staticmethod
    def _low_rank_grad(item: ParamItem) -> torch.Tensor:
        """The gradient in the rule's coordinates: projected (fp32) or the full gradient."""
        if item.lowrank_grad is not None:
            return item.lowrank_grad
        if not item.galore:
            return item.grad
        proj = item.state["proj"]
        grad = item.grad
        if grad.dtype != proj.dtype:
            proj = proj.to(grad.dtype)
        return pj.project(grad, proj, side_of(item.state)).float()  # moments are fp32

    @staticmethod
    def _apply_update(item: ParamItem, update: torch.Tensor, alpha: float) -> None:
        """param += alpha * update, mapped back through the projector for GaLore items.

        Default: one fused addmm into the weight (no full-size temporary). signs="lapack"
        is galore-torch compatibility mode: its unfused arithmetic, (N Q) * scale then add,
        so that the run is bit-identical (a 1-ulp difference would flip a LAPACK sign at
        the next refresh and the runs would part).
        """
        if not item.galore:
            item.param.add_(update.to(item.param.dtype), alpha=alpha)
        elif item.group["signs"] == "lapack":
            back = pj.project_back(update, item.state["proj"], side_of(item.state))
            item.param.add_((back * item.group["scale"]).to(item.param.dtype), alpha=alpha)
        else:
            pj.project_back_(item.param, update, item.state["proj"], side_of(item.state),
                             alpha * item.group["scale"])

    # ------------------------------------------------------------ subclass API
    def _update(self, item: ParamItem) -> None:
        """Apply the rule to one parameter (does not advance state["step"])."""
        raise NotImplementedError

    def _update_items(self, items: list[ParamItem]) -> None:
        """Apply the rule to every parameter of a step; a rule may batch across them."""
        for item in items:
            self._update(item)

    def _rotate_moments(self, state: dict, rot: torch.Tensor, side: pj.Side) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot reproject moments")

    def _reset_moments(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot reset moments")


def rotate_low_rank(t: torch.Tensor, rot: torch.Tensor, side: pj.Side) -> torch.Tensor:
    """Coordinates in the old basis -> the new one: right (m, r) @ C; left C^T @ (r, n)."""
    return t @ rot if side == "right" else rot.t() @ t
