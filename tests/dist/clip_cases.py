"""Every clipping idiom x every data-parallel form, against one process (issue 21).

Run by tests/test_clipping.py on 2 ranks (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT).

Idioms (what the user writes to clip at CLIP = 0.05, below the tiny model's gradient norms, so
clipping is active at every step):
  exact            the optimizer's max_grad_norm=CLIP, clip_timing="exact" (per-layer forms:
                   LayerwiseOptimizer(max_grad_norm=CLIP, clip_timing="exact"))
  delayed          the same with clip_timing="delayed" (step t clipped by step t-1's norm)
  clip_grad_norm_  torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) after backward,
                   before the step; the optimizer does not clip
Forms: one process per rank on the global batch ("plain"), DistributedDataParallel, DDP with
galore_ds.lowrank_comm_hook, replicated weights without a wrapper (the optimizer averages over
reduce_group=WORLD), FSDP2, HSDP on FSDP2's 2-D mesh (2 replicas x 1 shard at 2
ranks), HSDP averaging projected gradients over the replicas (reduce_group), and the per-layer
wrapper on one process, on replicated weights (reduce_group) and on FSDP2.

The reference of a row is one process on the whole global batch with the same idiom (for
clip_grad_norm_: the plain loop calling it on its full gradients). Each row asserts, inside
every rank, the outcome EXPECTED names:
  exact    weights within 1e-5 (relative, per parameter) of the reference after STEPS steps
  refused  the step raises on every rank (no deadlock) one line naming the idiom that works,
           wherever gradients are each rank's own until the optimizer averages them: DDP +
           lowrank_comm_hook, replicated weights and HSDP replicas with reduce_group (the
           optimizer's check), per-layer on replicated weights (LayerwiseOptimizer's: the
           full-rank gradients wait there for their bucket's average)
  no-op    documented, undetectable: per-layer mode without a reduce_group, updates inside
           the hooks (one micro-batch, no wrapper clipping), frees every gradient inside
           backward, so clip_grad_norm_ finds none (it returns 0.0) and the run is the
           unclipped one; the docs say to pass max_grad_norm to the LayerwiseOptimizer (with
           accumulation the call is refused: case per_layer_with_accumulation_...)
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fsdp_cases import shard  # noqa: E402
from harness import OPTIMIZERS, RANK, TOL, check, data, loss_fn, make_model, rel_diff, run_worker  # noqa: E402

import galore_ds  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402
from galore_ds.optim.lowrank_ddp import LowRankHookState, lowrank_comm_hook  # noqa: E402

STEPS, GAP, CLIP = 7, 2, 0.05
CGN = "clip_grad_norm_"
IDIOMS = ("exact", "delayed", CGN)
FORMS = ("plain", "ddp", "ddp_hook", "replicated", "fsdp2", "hsdp", "hsdp_lowrank", "per_layer",
         "per_layer_replicated", "per_layer_fsdp2")
LAYERWISE = ("per_layer", "per_layer_replicated", "per_layer_fsdp2")
EXPECTED: dict[tuple[str, str], str] = {(f, i): "exact" for f in FORMS for i in IDIOMS}
# gradients that are each rank's own until the optimizer averages them: the optimizer refuses
EXPECTED[("ddp_hook", CGN)] = "refused"
EXPECTED[("replicated", CGN)] = "refused"
EXPECTED[("hsdp_lowrank", CGN)] = "refused"
EXPECTED[("per_layer", CGN)] = "no-op"
EXPECTED[("per_layer_fsdp2", CGN)] = "no-op"
# the full-rank parameters' gradients wait in p.grad for their bucket's average, so the call
# scales them after the hooks counted them: LayerwiseOptimizer refuses that step
EXPECTED[("per_layer_replicated", CGN)] = "refused"
# what every refusal names: the idiom that failed and the one that works (one line)
REFUSAL = ("clip_grad_norm_", "max_grad_norm=")
HOOK_REFUSAL = REFUSAL + ("lowrank_comm_hook",)


def groups(model: nn.Module) -> list[dict]:
    return galore_ds.param_groups(model, rank=RANK, weight_decay=0.01, update_proj_gap=GAP)


def optimizer(model: nn.Module, idiom: str, reduce_group: Any = None, clip: bool = True):
    """GaLoreAdamW; clipping by the optimizer for the exact / delayed idioms when `clip`."""
    cls, kw = OPTIMIZERS["adamw"]
    extra: dict[str, Any] = {} if reduce_group is None else {"reduce_group": reduce_group}
    if clip and idiom in ("exact", "delayed"):
        extra.update(max_grad_norm=CLIP, clip_timing=idiom)
    return cls(groups(model), **kw, **extra)


_REFS: dict[tuple[str, int], nn.Module] = {}


def reference(idiom: str, world: int) -> nn.Module:
    """One process on the global batch with the same clipping ("none": unclipped)."""
    if (idiom, world) not in _REFS:
        model = make_model()
        opt = optimizer(model, idiom, clip=idiom != "none")
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            x, y = data(s, 0, 2 * world)
            loss_fn(model, x, y).backward()
            if idiom == CGN:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        _REFS[(idiom, world)] = model
    return _REFS[(idiom, world)]


def build(form: str, idiom: str, world: int, inner: bool = False
          ) -> tuple[nn.Module, nn.Module, Callable[[], Any], Callable[[], None], bool]:
    """(model, what forward runs, step, zero_grad, whether each rank takes its slice of the batch).
    inner: per-layer forms take max_grad_norm / clip_timing from the optimizer they wrap."""
    model = make_model()
    reduce_group = dist.group.WORLD if form == "replicated" else None
    if form in ("plain", "per_layer"):
        net, local = model, False
    elif form in ("replicated", "per_layer_replicated"):  # no wrapper: the optimizer averages (reduce_group)
        net, local = model, True
    elif form in ("ddp", "ddp_hook"):
        net, local = nn.parallel.DistributedDataParallel(model), True
    else:
        local = True
        mesh = None
        if form in ("hsdp", "hsdp_lowrank"):
            from torch.distributed.device_mesh import init_device_mesh

            mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
            mesh = mesh2 if form == "hsdp" else mesh2["shard"]
            reduce_group = mesh2["replicate"].get_group() if form == "hsdp_lowrank" else None
        net = shard(model, world, mesh=mesh)
    if form in LAYERWISE:
        rg = dist.group.WORLD if form == "per_layer_replicated" else None
        own = idiom != CGN and not inner
        lw = galore_ds.LayerwiseOptimizer(
            optimizer(model, idiom, reduce_group=rg, clip=inner), bucket_mb=0.0005,
            max_grad_norm=CLIP if own else None, clip_timing=idiom if own else "exact")
        return model, net, lw.step, lambda: None, local
    opt = optimizer(model, idiom, reduce_group=reduce_group)
    if form == "ddp_hook":
        net.register_comm_hook(LowRankHookState(opt), lowrank_comm_hook)
    return model, net, opt.step, lambda: opt.zero_grad(set_to_none=True), local


def row(form: str, idiom: str, inner: bool = False) -> Callable[[int], dict]:
    def run(world: int) -> dict:
        rank = dist.get_rank()
        expected = EXPECTED[(form, idiom)]
        model, net, step, zero, local = build(form, idiom, world, inner)
        seen = []        # what clip_grad_norm_ returned at each step
        for s in range(STEPS):
            zero()
            x, y = data(s, 0, 2 * world)
            if local:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            loss_fn(net, x, y).backward()
            if idiom == CGN:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                seen.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            try:
                step()
            except RuntimeError as exc:
                msg = str(exc)
                assert expected == "refused", f"{form} x {idiom} raised: {msg}"
                assert all(k in msg for k in REFUSAL) and "\n" not in msg, msg
                # per-layer on replicated weights refuses at the first step where some rank's call
                # scaled a gradient still held for its bucket's average; how many are held
                # depends on how many buckets were averaged (and freed) during backward, so that
                # step varies from run to run. Every rank refuses at it (test_clipping checks)
                assert s == 0 or form == "per_layer_replicated", f"refused only at step {s}"
                return {"outcome": "refused", "message": msg, "at_step": s}
        assert expected != "refused", f"{form} x {idiom} was not refused"
        clipped = rel_diff(model, reference(idiom, world))
        unclipped = rel_diff(model, reference("none", world))
        out = {"outcome": expected, "rel_diff": clipped, "rel_diff_unclipped": unclipped, "clip_grad_norm_": seen[:2]}
        if expected == "exact":
            check(clipped, TOL)
        else:                       # no-op, documented: clip_grad_norm_ sees no gradient in per-layer mode
            assert seen and all(v == 0.0 for v in seen), seen
            check(unclipped, TOL)
            assert clipped > 100 * TOL, clipped
        return out
    return run


def case_references_clip(world: int) -> dict:
    """Every idiom clips at CLIP here (else a row that ignores it would pass): each clipped
    reference is far from the unclipped run."""
    out = {i: rel_diff(reference(i, world), reference("none", world)) for i in IDIOMS}
    assert all(v > 100 * TOL for v in out.values()), out
    return out


# ------------------------------------------------------------------ finding 1 and the hook's check
def _hook_pair(clip: float, accum: int = 1, steps: int = STEPS) -> dict:
    """A user's DDP loop calling clip_grad_norm_(ddp.parameters(), clip) before opt.step(),
    with and without lowrank_comm_hook: equal, or the hooked one refused on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    base = make_model()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ddp_a, ddp_b = nn.parallel.DistributedDataParallel(a), nn.parallel.DistributedDataParallel(b)
    opt_a = galore_ds.GaLoreAdamW(galore_ds.param_groups(a, rank=RANK, update_proj_gap=GAP), lr=1e-2)
    opt_b = galore_ds.GaLoreAdamW(galore_ds.param_groups(b, rank=RANK, update_proj_gap=GAP), lr=1e-2)
    ddp_b.register_comm_hook(LowRankHookState(opt_b), lowrank_comm_hook)
    norms = []
    for s in range(steps):
        for ddp, opt, who in ((ddp_a, opt_a, "plain"), (ddp_b, opt_b, "hook")):
            opt.zero_grad(set_to_none=True)
            for micro in range(accum):
                x, y = data(s, micro, 2 * world)
                ctx = ddp.no_sync() if micro < accum - 1 else _Null()
                with ctx:
                    (loss_fn(ddp, x.chunk(world)[rank], y.chunk(world)[rank]) / accum).backward()
            norms.append((who, float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), clip))))
            try:
                opt.step()
            except RuntimeError as exc:
                return {"refused_at_step": s, "message": str(exc), "norms": norms}
    diff = rel_diff(b, a)
    check(diff, TOL)
    return {"rel_diff": diff, "norms": norms[:4]}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def case_finding1_clip_grad_norm_with_comm_hook(world: int) -> dict:
    """Issue 21 finding 1 as the user wrote it: DDP + lowrank_comm_hook + the usual
    clip_grad_norm_(ddp.parameters(), 0.05) before opt.step(). GaLore matrices' p.grad is each
    rank's own gradient (the hook averages only their projection), so each rank clipped by
    its own norm and the replicas drifted apart silently. Now: one line on every rank at the
    first step, naming max_grad_norm."""
    out = _hook_pair(CLIP)
    assert "refused_at_step" in out, f"not refused, and equal to plain DDP: {out}"
    assert out["refused_at_step"] == 0 and all(k in out["message"] for k in HOOK_REFUSAL), out
    assert "\n" not in out["message"], out["message"]
    return out


def case_clip_grad_norm_that_never_clips_runs_as_plain_ddp_with_the_hook(world: int) -> dict:
    """clip_grad_norm_ above every rank's norm scales nothing: no refusal, and the run equals
    plain DDP with the same call (with no_sync accumulation too)."""
    out = _hook_pair(1e6, accum=2)
    assert "refused_at_step" not in out, out
    return out


def case_only_one_rank_clips_and_every_rank_refuses(world: int) -> dict:
    """A threshold between the ranks' own norms: one rank scales its gradients, the others do
    not; every rank raises the same line at the same step (an all-reduce of the verdict), so no
    rank is left waiting in a collective."""
    rank = dist.get_rank()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=RANK, update_proj_gap=GAP), lr=1e-2)
    ddp.register_comm_hook(LowRankHookState(opt), lowrank_comm_hook)
    x, y = data(1, 0, 2 * world)
    loss_fn(ddp, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
    own = float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), float("inf")))  # measures, scales by 1
    norms = [None] * world
    dist.all_gather_object(norms, own)
    threshold = (min(norms) + max(norms)) / 2
    assert min(norms) < threshold < max(norms), norms
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), threshold)  # only the rank above it scales
    COMM.reset()
    try:
        opt.step()
    except RuntimeError as exc:
        msg = str(exc)
        assert all(k in msg for k in HOOK_REFUSAL) and "\n" not in msg, msg
        assert COMM.calls.get("clip_check") == 1, dict(COMM.calls)
        return {"norms": norms, "threshold": threshold, "clipped_here": own > threshold, "message": msg}
    raise AssertionError(f"rank {rank} (norm {own}, threshold {threshold}) was not refused")


CASES: dict[str, Callable[[int], dict]] = {
    "finding1_clip_grad_norm_with_comm_hook": case_finding1_clip_grad_norm_with_comm_hook,
    "clip_grad_norm_that_never_clips_runs_as_plain_ddp_with_the_hook":
        case_clip_grad_norm_that_never_clips_runs_as_plain_ddp_with_the_hook,
    "only_one_rank_clips_and_every_rank_refuses": case_only_one_rank_clips_and_every_rank_refuses,
    "references_clip": case_references_clip,
}
CASES.update({f"row_{form}_x_{idiom}": row(form, idiom) for form in FORMS for idiom in IDIOMS})
# the optimizer's own max_grad_norm / clip_timing inside the per-layer wrapper (whose step never
# runs): the wrapper clips with them (it dropped them before)
INNER_ROWS = [(form, idiom) for form in LAYERWISE for idiom in ("exact", "delayed")]
CASES.update({f"row_{form}_x_{idiom}_on_the_optimizer": row(form, idiom, inner=True) for form, idiom in INNER_ROWS})


def case_per_layer_refuses_two_different_clippings(world: int) -> dict:
    """max_grad_norm on both the optimizer and the wrapper, different: one line, at construction."""
    model = make_model()
    cls, kw = OPTIMIZERS["adamw"]
    try:
        galore_ds.LayerwiseOptimizer(cls(groups(model), **kw, max_grad_norm=CLIP), max_grad_norm=1.0)
    except ValueError as exc:
        assert "max_grad_norm" in str(exc) and "\n" not in str(exc), exc
        return {"message": str(exc)}
    raise AssertionError("two different clip thresholds were accepted")


CASES["per_layer_refuses_two_different_clippings"] = case_per_layer_refuses_two_different_clippings


def case_per_layer_replicated_gradient_changed_on_one_rank(world: int) -> dict:
    """Per-layer on replicated weights, a gradient held for its bucket's average changed on one
    rank only (there clip_grad_norm_ scaled; a rank whose buckets were averaged and freed sooner
    holds fewer gradients, and its call may scale nothing). Every rank refuses at that step with
    one line: the verdict is agreed before the step's collectives (a rank refusing alone left
    the others waiting in them: the hang CI met)."""
    rank = dist.get_rank()
    model = make_model()
    # buckets larger than the model: nothing is averaged during backward, every gradient waits
    lw = galore_ds.LayerwiseOptimizer(optimizer(model, CGN, reduce_group=dist.group.WORLD, clip=False), bucket_mb=64)
    x, y = data(0, 0, 2 * world)
    loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
    held = [p for p in model.parameters() if p.grad is not None]
    assert held, "no gradient waits in p.grad for its bucket's average"
    if rank == 0:
        held[0].grad.mul_(0.5)
    try:
        lw.step()
    except RuntimeError as exc:
        msg = str(exc)
        assert all(k in msg for k in REFUSAL) and "\n" not in msg, msg
        return {"message": msg, "changed_here": rank == 0}
    raise AssertionError(f"rank {rank} (changed here: {rank == 0}) was not refused")


CASES["per_layer_replicated_gradient_changed_on_one_rank"] = case_per_layer_replicated_gradient_changed_on_one_rank


def _per_layer_window_refuses_clip_grad_norm_(world: int, fsdp2: bool) -> dict:
    """The no-op row's other half: when the per-layer updates wait for lw.step() (accumulation),
    the full-rank gradients are still in p.grad at the call, which scales them after the hooks
    counted them: lw.step() refuses (LayerwiseOptimizer's check), one line naming max_grad_norm.
    fsdp2: the same on FSDP2 shards, whose DTensor gradients clip_grad_norm_ scales in place
    (DTensor-aware, the same coefficient on every rank): every rank refuses."""
    rank = dist.get_rank()
    model = make_model()
    if fsdp2:
        shard(model, world)
    lw = galore_ds.LayerwiseOptimizer(optimizer(model, CGN), accumulation_steps=2)
    for micro in range(2):
        x, y = data(0, micro, 2 * world)
        if fsdp2:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        (loss_fn(model, x, y) / 2).backward()
        if micro == 1:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        try:
            lw.step()
        except RuntimeError as exc:
            msg = str(exc)
            assert micro == 1 and all(k in msg for k in REFUSAL) and "\n" not in msg, msg
            return {"message": msg}
    raise AssertionError(f"clip_grad_norm_ inside a per-layer {'FSDP2 ' if fsdp2 else ''}accumulation window "
                         "was not refused")


CASES["per_layer_with_accumulation_refuses_clip_grad_norm_"] = (
    lambda w: _per_layer_window_refuses_clip_grad_norm_(w, fsdp2=False))
CASES["per_layer_fsdp2_with_accumulation_refuses_clip_grad_norm_"] = (
    lambda w: _per_layer_window_refuses_clip_grad_norm_(w, fsdp2=True))


if __name__ == "__main__":
    run_worker(CASES)
