"""The Fira rule (arXiv 2410.01623; PyPI `fira` 1.0.2): GaLore's Adam on the projected gradient
R, plus the part of the gradient GaLore discards, scaled per channel by what Adam does to R.

For a GaLore matrix W with gradient G and projector P (left, R = P^T G) or Q (right, R = G Q^T):

    N    = m / (sqrt(v) + eps)                 Adam on R (core/adamw.py), fp32
    phi  = ||N|| / (||R|| + 1e-8)              norms over the rank dimension: one factor per row
                                               (right projection) or column (left) of W
    S    = phi * (G - P R)                     the residual, scaled per channel
    S   /= max(||S|| / (prev + 1e-8), gamma) / gamma
                                               the norm-growth limiter: prev is the last step's
                                               ||S|| after it (a per-matrix scalar in state)
    W   -= step_size * (scale * P N + S);  then W -= lr * weight_decay * W

Parameters outside the GaLore groups take plain AdamW. Memory is GaLore's (Adam's two moments
of R, the projector, and one scalar per matrix); the full gradient is read, never copied.

`NormScaledAdamRule` is the part APOLLO shares (core/apollo.py): Adam on R, a per-channel norm
ratio, a full-size gradient term scaled by it, the limiter. Each matrix's update takes two
passes: the first updates the moments and computes its factors and this rank's part of its
per-matrix sums, ONE `reduce` call completes the sums of matrices split across ranks (the
limiter's norm, as Adafactor's statistics in core/adafactor.py), the second applies. A matrix
whose sums are all on this rank takes its second pass at once, and Fira's reuses the residual
the first made; one that waits for the reduce drops it and applies G and P R separately (a
third product), since every waiting residual alive at once would be a full gradient's copy.
Neither pass makes a full-size temporary beyond Fira's residual of one matrix at a time.
signs="lapack" (galore-torch compatibility, core/update.py: apply_update) takes the reference
package's unfused arithmetic instead, operation for operation, on matrices held whole: with its
LAPACK signs the run is the package's bit for bit (a 1-ulp difference would flip a singular
vector's sign at the next refresh, and the runs would part).

Where fira 1.0.2 does something else (docs/family.md, tests/test_family_reference.py):
- residual: its project_back multiplies by alpha (`scale`), so its residual is G - scale * P R,
  which keeps (1 - scale) of the projected gradient: that part is then updated twice, by Adam
  in the subspace and by phi outside it. The paper's S is G - P R (residual="exact", the
  default); residual="scaled" reproduces the package (the runs behind its published numbers).
  At scale 1 (its default) the two agree.
- the limiter's previous norm 0 (a step whose scaled term was all zero): the package then
  divides the next step's term by ~||S|| / 1e-8, and the term stays near zero for thousands of
  steps (it may grow by 1.01x per step); here a zero previous norm means there is none.
- phi's dimension: the package picks it from R's shape (the smaller one); for a left projection
  of rank n (R square) that is the wrong one. Here it is always the rank dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from galore_ds.core import projector as pj
from galore_ds.core.adafactor import Reduce
from galore_ds.core.adamw import AdamWRule
from galore_ds.core.rule import adam_state_shapes
from galore_ds.core.update import Item, Split, apply_update, decay_weight


def rank_dim(item: Item) -> int:
    """The rank dimension of R: 1 for R = G Q^T (m, r), 0 for R = P^T G (r, n). Norms over it
    give one value per row (right) or column (left) of the matrix, R and W alike."""
    return 1 if item.right else 0


def norm_ratio(normed: torch.Tensor, grad: torch.Tensor, dim: int | None) -> torch.Tensor:
    """||N|| / (||R|| + 1e-8) over `dim` (keepdim: it broadcasts over the matrix), or over the
    whole tensor when `dim` is None."""
    if dim is None:
        return torch.linalg.vector_norm(normed) / (torch.linalg.vector_norm(grad) + 1e-8)
    return (torch.linalg.vector_norm(normed, dim=dim, keepdim=True)
            / (torch.linalg.vector_norm(grad, dim=dim, keepdim=True) + 1e-8))


def channel_norms(t: torch.Tensor, dim: int) -> torch.Tensor:
    """||t|| over `dim`, keepdim, accumulated in fp32 (bf16 gradients included)."""
    return torch.linalg.vector_norm(t, dim=dim, keepdim=True, dtype=torch.float32)


def limit(state: dict, norm: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Fira's norm-growth limiter on a matrix's scaled term of norm `norm`: the divisor that
    keeps it within `gamma` times the last step's (1 without a last step, or gamma None); the
    limited norm becomes the next step's reference. Tensors throughout (no host sync)."""
    prev = state["prev_norm"]
    divisor = torch.ones_like(norm)
    if gamma is not None:
        grown = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma
        divisor = torch.where(prev > 0, grown, divisor)
    state["prev_norm"] = norm / divisor
    return divisor


def owned_part(t: torch.Tensor, split: Split) -> torch.Tensor:
    """The part of an R-shaped tensor this rank counts in whole-tensor sums (see Split)."""
    if split.dim == 0:
        return t[split.owned]
    if split.dim == 1:
        return t[:, split.owned]
    return t


def is_whole(item: Item) -> bool:
    """Whether the item's gradients and parameter are whole here (nothing to sum across ranks)."""
    sp = item.split
    return sp.dim is None and sp.group is None and sp.param_group is None


def r_group(split: Split) -> Any:
    """The group an R-shaped sum runs over: R's split group, None when R is whole here."""
    return split.group if split.dim is not None else None


@dataclass
class Scaled:
    """One matrix between the two passes."""

    item: Item
    step_size: float
    factor: torch.Tensor | None                  # per-channel factor (keepdim), or None
    parts: list[tuple[torch.Tensor, Any]]        # (this rank's part of per-matrix sums, group)
    # a full-size term the first pass made (Fira's residual), for the second pass to reuse
    # when the matrix finishes at once; dropped when it waits for the other matrices' reduce
    term: torch.Tensor | None = None

    @property
    def waits_for_reduce(self) -> bool:
        return any(g is not None for _, g in self.parts)


def complete(plans: list[Scaled], reduce: Reduce | None) -> list[torch.Tensor]:
    """Each matrix's per-matrix sums, as one 1-D tensor: parts with a group summed over it by
    ONE `reduce` call for all matrices; parts without one are whole here."""
    requests = [(t, g) for plan in plans for t, g in plan.parts if g is not None]
    if requests and reduce is None:
        raise RuntimeError("a matrix split across ranks needs the step's reduce for its norms")
    done = iter(reduce(requests) if requests else ())
    return [torch.cat([(next(done) if g is not None else t).reshape(-1) for t, g in plan.parts])
            for plan in plans]


class NormScaledAdamRule(AdamWRule):
    """Adam on R scaling a full-size gradient term, with the norm-growth limiter (module
    docstring). Subclasses give the first pass (`plan`) and the second (`apply`)."""

    needs_full_grad = True
    sums_over_matrix = True   # the limiter's norm (and APOLLO-Mini's tensor norms)

    @staticmethod
    def state_shapes(grad_shape: tuple[int, ...], group: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Adam's moments; a GaLore matrix also keeps its limiter's previous norm (a scalar)."""
        shapes = adam_state_shapes(grad_shape, group)
        return {**shapes, "prev_norm": ()} if "rank" in group else shapes

    @staticmethod
    def init_state(item: Item) -> None:
        AdamWRule.init_state(item)
        if item.galore and "prev_norm" not in item.state:
            item.state["prev_norm"] = torch.zeros((), dtype=torch.float32, device=item.grad.device)

    def update(self, items: list[Item], reduce: Reduce | None = None) -> None:
        super().update([item for item in items if not item.galore])   # full-rank parameters: AdamW
        waiting = []
        for batch in self.batches([item for item in items if item.galore]):
            for item, normed, step_size in self.directions(batch):
                if item.group["signs"] == "lapack" and is_whole(item):
                    self.reference_step(item, normed, step_size)
                    decay_weight(item, item.group["lr"], item.group["weight_decay"])
                    continue
                plan = self.plan(item, normed, step_size)
                if plan.waits_for_reduce:
                    plan.term = None   # held until the reduce, each matrix's would add up to a full gradient
                    waiting.append(plan)
                else:   # its sums are all here: the second pass now, while its term is alive
                    self.finish(plan, complete([plan], None)[0])
        for plan, sums in zip(waiting, complete(waiting, reduce)):
            self.finish(plan, sums)

    def finish(self, plan: Scaled, sums: torch.Tensor) -> None:
        if not bool(torch.isfinite(sums).all()):
            # a NaN/Inf on any rank of a split matrix reaches every rank's sums: all drop
            # this update alike (the optimizer's step skips such steps before the rule;
            # per-layer immediate mode cannot, as for Adafactor: optim/layerwise.py)
            return
        self.apply(plan, sums)
        decay_weight(plan.item, plan.item.group["lr"], plan.item.group["weight_decay"])

    def reference_step(self, item: Item, normed: torch.Tensor, step_size: float) -> None:
        """The reference package's update of a matrix held whole, in its arithmetic."""
        raise NotImplementedError

    def plan(self, item: Item, normed: torch.Tensor, step_size: float) -> Scaled:
        """First pass, right after Adam's moments: `normed` lives until the next batch."""
        raise NotImplementedError

    def apply(self, plan: Scaled, sums: torch.Tensor) -> None:
        """Second pass, with the matrix's per-matrix sums complete."""
        raise NotImplementedError


class FiraRule(NormScaledAdamRule):
    projections = ("svd",)

    def reference_step(self, item: Item, normed: torch.Tensor, step_size: float) -> None:
        # fira 1.0.2: (G - rho * back(R)) * phi, limited, plus back(N) * scale, added at -step_size
        proj = item.proj.to(item.grad.dtype)   # a bf16 weight's projector: in R's fp32 (no-op in fp32)
        phi = norm_ratio(normed, item.grad, rank_dim(item))
        scaled = (item.full_grad - pj.project_back(item.grad, proj, item.side) * self._rho(item)) * phi
        scaled = scaled / limit(item.state, torch.linalg.vector_norm(scaled), item.group["norm_growth_limit"])
        update = pj.project_back(normed, proj, item.side) * item.group["scale"] + scaled
        item.param.add_(update, alpha=-step_size)

    def plan(self, item: Item, normed: torch.Tensor, step_size: float) -> Scaled:
        apply_update(item, normed, -step_size)      # scale * P N, GaLore's update
        dim = rank_dim(item)
        phi = norm_ratio(normed, item.grad, dim)
        residual = item.full_grad.clone()          # G - rho P R, this matrix only
        pj.project_back_(residual, item.grad, item.proj, item.side, -self._rho(item))
        item.zero_padding_(residual)               # a ZeRO piece counts only what it holds
        sq = torch.linalg.vector_norm(phi * channel_norms(residual, dim)).square()
        return Scaled(item, step_size, phi, [(sq.reshape(1), item.split.param_group)], term=residual)

    def apply(self, plan: Scaled, sums: torch.Tensor) -> None:
        item = plan.item
        coef = plan.factor / limit(item.state, sums[0].sqrt(), item.group["norm_growth_limit"])
        if plan.term is not None:   # W -= step_size * coef * residual
            item.param.addcmul_(plan.term, coef, value=-plan.step_size)
            return
        # the residual was dropped (it waited for a reduce): the same without a full-size
        # temporary, the G part by one addcmul, the P R part (coef scales rows or columns,
        # which commutes with P) by one fused product back
        item.param.addcmul_(item.full_grad, coef, value=-plan.step_size)
        pj.project_back_(item.param, coef * item.grad, item.proj, item.side, plan.step_size * self._rho(item))

    @staticmethod
    def _rho(item: Item) -> float:
        """How much of P R the residual removes: all of it (the paper), or scale (fira 1.0.2)."""
        return item.group["scale"] if item.group["residual"] == "scaled" else 1.0


__all__ = ["FiraRule", "NormScaledAdamRule", "Scaled", "complete", "limit", "norm_ratio", "channel_norms",
           "rank_dim", "owned_part", "r_group", "is_whole"]
