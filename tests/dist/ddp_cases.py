"""Replicated weights that send low-rank gradients, against one process and against DDP.

Run by tests/test_ddp.py (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, like torchrun).
- per-layer: galore_ds.LayerwiseOptimizer over an optimizer built with reduce_group (no DDP
  wrapper; projected gradients averaged in asynchronous buckets inside backward) equals the
  one-process per-layer run on the global batch: accumulation, clipping, exact (owner) and
  randomized (two-all-reduce subspace iteration, cold start included) refreshes, NaN on one rank;
- the comm hook in a user's plain DistributedDataParallel loop equals the same loop without
  it (GaLore optimizer in both), with no_sync accumulation and clipping;
- what travels: between refreshes only projected gradients (m x r or r x n) and the other
  parameters' full gradients, counted exactly.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from harness import EIGHT_BIT_TOL, TOL, check, data, loss_fn, make_model, make_optimizer, rel_diff, run_worker  # noqa: E402

import galore_ds  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402
from galore_ds.optim.lowrank_ddp import LowRankHookState, lowrank_comm_hook  # noqa: E402

STEPS, GAP, CLIP = 7, 2, 0.05
# bf16 wire: the sum over ranks rounded to bf16 (~3 significant digits) every step; measured
# about 1e-3 over STEPS steps on this model, stated with margin
BF16_WIRE_TOL = 2e-2


def per_layer(world: int, *, opt: str = "adamw", accum: int = 1, clip: float | None = None,
              refresh: str = "svd", timing: str = "exact", poison: int | None = None,
              wire: torch.dtype | None = None) -> dict:
    rank = dist.get_rank()
    ref = make_model()
    model = copy.deepcopy(ref)
    lw = galore_ds.LayerwiseOptimizer(
        make_optimizer(opt, model, update_proj_gap=GAP, refresh=refresh, reduce_group=dist.group.WORLD),
        accumulation_steps=accum, max_grad_norm=clip, clip_timing=timing, bucket_mb=0.0005, reduce_dtype=wire)
    ref_lw = galore_ds.LayerwiseOptimizer(make_optimizer(opt, ref, update_proj_gap=GAP, refresh=refresh),
                                          accumulation_steps=accum, max_grad_norm=clip, clip_timing=timing)
    norms, bytes_between, bytes_refresh = [], [], []
    for s in range(STEPS):
        COMM.reset()
        for micro in range(accum):
            x, y = data(s, micro, 2 * world)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            if s == poison and rank == world - 1 and micro == accum - 1:
                xs = xs * float("nan")
            rx = x * float("nan") if s == poison and micro == accum - 1 else x
            (loss_fn(ref, rx, y) / accum).backward()
            ref_lw.step()
            (loss_fn(model, xs, ys) / accum).backward()
            lw.step()
        if s % GAP and poison is None:  # (a skipped step shifts every later refresh by one)
            bytes_between.append(dict(COMM.bytes))
        elif s and poison is None:
            bytes_refresh.append(dict(COMM.bytes))
        norms.append((lw.grad_norm, ref_lw.grad_norm))
        assert all(p.grad is None for p in model.parameters()), "gradients not freed"
    tol = BF16_WIRE_TOL if wire == torch.bfloat16 else EIGHT_BIT_TOL if opt == "adamw8bit" else TOL
    diff = rel_diff(model, ref)
    check(diff, tol)
    finite = [(a, b) for a, b in norms if b == b and abs(b) != float("inf")]
    norm_diff = max(abs(a - b) / b for a, b in finite)
    check(norm_diff, tol, "grad norm")
    if poison is not None:
        assert lw.skipped_steps == ref_lw.skipped_steps == 1 or (
            lw.nonfinite_params_skipped == ref_lw.nonfinite_params_skipped > 0), (lw.skipped_steps, lw.nonfinite_params_skipped)
    # between refreshes: projected gradients and the other parameters' gradients, nothing else
    groups = lw.optimizer.param_groups
    wire_bytes = 2 if wire == torch.bfloat16 else 4
    expected = wire_bytes * (sum(_lowrank_numel(p, g) for g in groups if "rank" in g for p in g["params"])
                             + sum(p.numel() for g in groups if "rank" not in g for p in g["params"]))
    for b in bytes_between:   # and each micro-step's 4-byte verdict of the gradient check
        assert b.get("layerwise_bucket") == expected and set(b) <= {"layerwise_bucket", "clip_check"}, (b, expected)
        assert b.get("clip_check", 0) == 4 * accum, b
    matrices = [p for g in groups if "rank" in g for p in g["params"]]
    owners = [lw.optimizer.replicated_owner(p) for p in matrices]
    if refresh == "svd":
        # one matrix at a time, yet the SVDs spread over the ranks, and each full gradient is
        # sent once to its owner (a reduce), not world padded copies
        assert len(set(owners)) == min(world, len(matrices)), owners
        for b in bytes_refresh:
            assert b["reduce_to_owners"] == 4 * sum(p.numel() for p in matrices), b
    return {"rel_diff": diff, "norm_rel_diff": norm_diff, "bytes_between": bytes_between[:1], "expected": expected,
            "owners": owners}


def per_layer_float64(world: int) -> dict:
    """accum_dtype=float64: a step's 12 one-row micro-batches spread 12/W per rank give the
    one-process result, and the weights it returns are compared across W by the test (the
    sums no longer depend on how micro-batches are spread over ranks)."""
    rank, k = dist.get_rank(), 12 // world
    ref, model = make_model(), make_model()

    def wrap(m, k, **kw):
        return galore_ds.LayerwiseOptimizer(
            make_optimizer("adamw", m, update_proj_gap=GAP, refresh="randomized", **kw), accumulation_steps=k,
            max_grad_norm=CLIP, accum_dtype=torch.float64, bucket_mb=0.0005)

    lw, ref_lw = wrap(model, k, reduce_group=dist.group.WORLD), wrap(ref, 12)
    assert lw.loss_divisor == 1
    for s in range(STEPS):
        x, y = data(s, 0, 12)
        for i in range(12):
            loss_fn(ref, x[i:i + 1], y[i:i + 1]).backward()
            ref_lw.step()
        for i in range(rank * k, (rank + 1) * k):
            loss_fn(model, x[i:i + 1], y[i:i + 1]).backward()
            lw.step()
    diff = rel_diff(model, ref)
    check(diff, TOL)
    return {"rel_diff": diff, "params": [p.detach().flatten().tolist() for p in model.parameters()]}


def _lowrank_numel(p: torch.Tensor, group: dict) -> int:
    m, n = p.shape
    r = group["rank"]
    from galore_ds.core.projector import choose_side

    return m * r if choose_side((m, n), group["proj_type"]) == "right" else r * n


def comm_hook(world: int, *, opt: str = "adamw", accum: int = 1, clip: float | None = None,
              refresh: str = "svd", wire: torch.dtype = torch.float32) -> dict:
    """A user's DDP loop with the hook vs the same loop without it: equal."""
    rank = dist.get_rank()
    base = make_model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ddp_a = nn.parallel.DistributedDataParallel(a)
    ddp_b = nn.parallel.DistributedDataParallel(b)
    opt_a = make_optimizer(opt, a, update_proj_gap=GAP, refresh=refresh, max_grad_norm=clip)
    opt_b = make_optimizer(opt, b, update_proj_gap=GAP, refresh=refresh, max_grad_norm=clip)
    ddp_b.register_comm_hook(LowRankHookState(opt_b, reduce_dtype=wire), lowrank_comm_hook)
    sent = []
    for s in range(STEPS):
        for o in (opt_a, opt_b):
            o.zero_grad(set_to_none=True)
        COMM.reset()
        for micro in range(accum):
            x, y = data(s, micro, 2 * world)
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            for ddp in (ddp_a, ddp_b):
                ctx = ddp.no_sync() if micro < accum - 1 else _null()
                with ctx:
                    (loss_fn(ddp, xs, ys) / accum).backward()
        opt_a.step()
        opt_b.step()
        sent.append(dict(COMM.bytes))
        tol = BF16_WIRE_TOL if wire == torch.bfloat16 else 1e-5
        assert abs(opt_a.grad_norm - opt_b.grad_norm) <= tol * opt_a.grad_norm, (opt_a.grad_norm, opt_b.grad_norm)
    diff = rel_diff(b, a)
    check(diff, BF16_WIRE_TOL if wire == torch.bfloat16 else EIGHT_BIT_TOL if opt == "adamw8bit" else TOL)
    full = sum(p.numel() for p in b.parameters()) * 4
    between = [x.get("lowrank_comm_hook", 0) for s, x in enumerate(sent) if s % GAP]
    assert all(0 < v < full for v in between), (between, full)  # less than DDP's full gradient
    return {"rel_diff": diff, "hook_bytes_between": between[:1], "ddp_full_bytes": full}


def plain_ddp_family(world: int) -> dict:
    """Fira and APOLLO-Mini read each matrix's full gradient, so the low-rank hook cannot carry
    them (refused: tests/test_family_reference.py); a user's plain DDP loop (full gradients
    averaged, every rank steps whole tensors) equals one process on the global batch."""
    rank = dist.get_rank()
    out = {}
    for opt in ("fira", "apollo_mini"):
        ref = make_model()
        model = copy.deepcopy(ref)
        ddp = nn.parallel.DistributedDataParallel(model)
        ours = make_optimizer(opt, model, update_proj_gap=GAP, max_grad_norm=CLIP)
        single = make_optimizer(opt, ref, update_proj_gap=GAP, max_grad_norm=CLIP)
        for s in range(STEPS):
            ours.zero_grad(set_to_none=True)
            single.zero_grad(set_to_none=True)
            x, y = data(s, 0, 2 * world)
            loss_fn(ref, x, y).backward()
            loss_fn(ddp, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
            ours.step()
            single.step()
        diff = rel_diff(model, ref)
        check(diff, TOL)
        out[opt] = diff
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


CASES = {
    "per_layer_k1_owner_svd": lambda w: per_layer(w),
    "per_layer_k2_clip_owner_svd": lambda w: per_layer(w, accum=2, clip=CLIP),
    "per_layer_k1_clip_delayed_randomized": lambda w: per_layer(w, clip=CLIP, timing="delayed", refresh="randomized"),
    "per_layer_k2_randomized_adafactor": lambda w: per_layer(w, opt="adafactor", accum=2, refresh="randomized"),
    "per_layer_adamw8bit_k1_clip": lambda w: per_layer(w, opt="adamw8bit", clip=CLIP),
    "per_layer_nan_on_one_rank_k2_clip": lambda w: per_layer(w, accum=2, clip=CLIP, poison=3),
    "per_layer_float64_any_world": per_layer_float64,
    "comm_hook_equals_plain_ddp": lambda w: comm_hook(w),
    "comm_hook_accumulation_and_clipping": lambda w: comm_hook(w, accum=2, clip=CLIP),
    "comm_hook_randomized_adafactor": lambda w: comm_hook(w, opt="adafactor", refresh="randomized"),
    "per_layer_bf16_wire_half_the_bytes": lambda w: per_layer(w, accum=2, clip=CLIP, wire=torch.bfloat16),
    "comm_hook_bf16_wire": lambda w: comm_hook(w, accum=2, clip=CLIP, wire=torch.bfloat16),
    "plain_ddp_fira_and_apollo_mini": plain_ddp_family,
}


if __name__ == "__main__":
    run_worker(CASES)
