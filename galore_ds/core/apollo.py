"""The APOLLO rule (arXiv 2412.05270; PyPI `apollo-torch` 1.0.3): Adam's moments of a randomly
projected gradient decide how much to scale the full gradient, per channel or per tensor.

For a GaLore matrix W with gradient G and projector P (left, R = P^T G) or Q (right, R = G Q^T),
by default a seeded Gaussian matrix N(0, 1/r) drawn anew at every refresh (core/projector.py:
gaussian_basis; `proj="svd"` takes GaLore's subspace instead):

    N   = m / (sqrt(v) + eps)                  Adam on R (core/adamw.py), fp32
    s   = ||N|| / (||R|| + 1e-8)               scale_type="channel": over the rank dimension, one
                                               factor per row (right) or column (left) of W;
                                               "tensor": one per matrix
    U   = s * G, then Fira's norm-growth limiter on ||U|| (core/fira.py)
    W  -= step_size * sqrt(scale) * U;  then W -= lr * weight_decay * W

APOLLO-Mini is rank 1, scale_type="tensor", scale=128. `scale` keeps apollo-torch's meaning:
the update is multiplied by its square root (GaLore's and Fira's `scale` multiplies by itself).
Parameters outside the GaLore groups take plain AdamW. Memory: Adam's two moments of R, the
projector (regenerated from its seed, see docs/family.md) and one scalar per matrix; the update
is applied from G in place, without a full-size temporary. Per-matrix sums (the limiter's norm;
the tensor-wise norms of N, R and G) are completed across ranks by the step's `reduce`.

Where apollo-torch 1.0.3 does something else (docs/family.md, tests/test_family_reference.py):
- channel factors: it takes the norms over dim 1 when G has at least as many rows as columns,
  else dim 0: the rank dimension only under proj_type="std". Under reverse_std, left or right
  its factors are per rank index, and the broadcast onto G fails (or, when the other dimension
  happens to equal the rank, scales the wrong axis). Here they are always over the rank
  dimension, so every proj_type works.
- the limiter's previous norm 0: as for Fira (core/fira.py), a zero previous norm means none.
- its random matrices come from a generator on the gradient's device, so a GPU run draws other
  matrices than a CPU run; proj_seeds="hashed" (the default) draws on the CPU (the same on every
  device), proj_seeds="apollo" reproduces its seeds and its device choice.
"""
from __future__ import annotations

import math

import torch

from galore_ds.core.fira import NormScaledAdamRule, Scaled, channel_norms, limit, norm_ratio, owned_part, r_group, rank_dim
from galore_ds.core.update import Item

# A random basis has no meaningful rotation into the next one: moments are kept or zeroed.
MOMENT_POLICIES = ("keep", "reset")


class ApolloRule(NormScaledAdamRule):
    moment_policies = MOMENT_POLICIES
    projections = ("random", "svd")

    def reference_step(self, item: Item, normed: torch.Tensor, step_size: float) -> None:
        # apollo-torch 1.0.3 (scale_front=False): G * s, limited, times sqrt(scale), added at -step_size
        group = item.group
        s = norm_ratio(normed, item.grad, None if group["scale_type"] == "tensor" else rank_dim(item))
        scaled = item.full_grad * s
        scaled = scaled / limit(item.state, torch.linalg.vector_norm(scaled), group["norm_growth_limit"])
        scaled.mul_(math.sqrt(group["scale"]))
        item.param.add_(scaled, alpha=-step_size)

    def plan(self, item: Item, normed: torch.Tensor, step_size: float) -> Scaled:
        grad, sp = item.full_grad, item.split
        if item.group["scale_type"] == "tensor":
            # s needs the whole-matrix norms of N and R; the limiter's norm is s ||G||
            r_sums = torch.stack([owned_part(normed, sp).square().sum(), owned_part(item.grad, sp).square().sum()])
            g_sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
            return Scaled(item, step_size, None, [(r_sums, r_group(sp)), (g_sq.reshape(1), sp.param_group)])
        dim = rank_dim(item)
        factor = norm_ratio(normed, item.grad, dim)
        sq = torch.linalg.vector_norm(factor * channel_norms(grad, dim)).square()
        return Scaled(item, step_size, factor, [(sq.reshape(1), sp.param_group)])

    def apply(self, plan: Scaled, sums: torch.Tensor) -> None:
        item, group = plan.item, plan.item.group
        if plan.factor is None:
            factor = sums[0].sqrt() / (sums[1].sqrt() + 1e-8)
            norm = factor * sums[2].sqrt()
        else:
            factor, norm = plan.factor, sums[0].sqrt()
        coef = factor / limit(item.state, norm, group["norm_growth_limit"])
        item.param.addcmul_(item.full_grad, coef, value=-plan.step_size * math.sqrt(group["scale"]))


__all__ = ["ApolloRule", "MOMENT_POLICIES"]
