"""The public optimizers inside a user's own FSDP2 / HSDP code, against one process.

Run by tests/test_fsdp.py (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, like torchrun):
    torchrun --nproc_per_node 4 tests/dist/fsdp_cases.py --out /tmp/r.json [--only NAME ...]
Every case builds the same model on every rank, shards it with fully_shard as a user would,
trains it with galore_ds.GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor on the rank's slice of
a global batch, and trains an unsharded copy with the same class on the whole global batch
inside the same rank. Pairwise cases cover optimizer x proj_type x group layout x gradient
accumulation x clipping x placement (rows, or columns for left-projected matrices).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))  # collectives.py

import pairwise  # noqa: E402
from collectives import count_collectives  # noqa: E402
from harness import (  # noqa: E402
    EIGHT_BIT_TOL, OPTIMIZERS, RANK, TOL, check, data, loss_fn, make_model, make_optimizer, params_equal,
    rel_diff, run_worker, snapshot,
)

import galore_ds  # noqa: E402
from galore_ds.core import projector as pj  # noqa: E402
from galore_ds.optim.checkpoint import dcp_load, dcp_state_dict  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402

STEPS, GAP = 7, 2          # refreshes at steps 0, 2, 4, 6
DCP_ROWS = 12              # a global batch that 2 and 3 ranks split evenly
CLIP = 0.05                # below the tiny model's gradient norms: clipping is active
LINEARS = ("embed", "attn_q", "attn_o", "mlp_up", "mlp_down", "mlp_out", "head")


# ------------------------------------------------------------------ sharding as users do it
def shard(model, world: int, *, cols: bool = False, mesh=None, proj_type: str = "std"):
    """fully_shard every Linear, then the root. cols: a left-projected matrix whose columns the
    shard count divides is sharded by columns (shard_placement_fn Shard(1))."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    shards = mesh.size(mesh.ndim - 1) if mesh is not None else world

    def placement(p):
        left = p.dim() == 2 and pj.choose_side(tuple(p.shape), proj_type) == "left"
        return Shard(1) if cols and left and p.shape[1] % shards == 0 else None

    kw = {"mesh": mesh} if mesh is not None else {}
    for name in LINEARS:
        fully_shard(getattr(model, name), shard_placement_fn=placement, **kw)
    fully_shard(model, shard_placement_fn=placement, **kw)
    return model


def train(world: int, *, opt: str = "adamw", groups: str = "named", proj: str = "std", accum: int = 1,
          clip: float | None = None, cols: bool = False, steps: int = STEPS, hsdp: str | None = None,
          poison: tuple[int, int] | None = None, rows: int | None = None, **galore):
    """Train the sharded model and the one-process reference side by side.

    hsdp: None (1-D mesh), "2d" (FSDP2's own HSDP: fully_shard on a (2, W/2) mesh) or
    "lowrank" (fully_shard on the shard mesh, the optimizer averages R over replicas).
    poison: (step, rank) whose local gradient of mlp_up gets an Inf just before the step."""
    rank = dist.get_rank()
    ref = make_model()
    model = copy.deepcopy(ref)
    mesh, reduce_group = None, None
    if hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        mesh = mesh2 if hsdp == "2d" else mesh2["shard"]
        reduce_group = mesh2["replicate"].get_group() if hsdp == "lowrank" else None
    shard(model, world, cols=cols, mesh=mesh, proj_type=proj)
    kw = dict(update_proj_gap=GAP, proj_type=proj, max_grad_norm=clip, **galore)
    sharded = make_optimizer(opt, model, groups, reduce_group=reduce_group, **kw) if reduce_group is not None \
        else make_optimizer(opt, model, groups, **kw)
    reference = make_optimizer(opt, ref, groups, **kw)
    log = []
    rows = rows or 2 * world
    for s in range(steps):
        sharded.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        for micro in range(accum):
            x, y = data(s, micro, rows)
            (loss_fn(ref, x, y) / accum).backward()
            model.set_requires_gradient_sync(micro == accum - 1)
            (loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]) / accum).backward()
        if poison is not None and poison[0] == s:
            if rank == poison[1]:
                g = model.mlp_up.weight.grad.to_local()
                if g.numel():
                    g.view(-1)[0] = float("inf")
            ref.mlp_up.weight.grad.view(-1)[0] = float("inf")
        before = snapshot(model, sharded) if poison is not None and poison[0] == s else None
        sharded.step()
        reference.step()
        log.append({"norm": sharded.grad_norm, "ref_norm": reference.grad_norm, "skipped": sharded.overflow})
        if before is not None:
            assert sharded.overflow and reference.overflow, "a step with an Inf gradient was not skipped"
            assert params_equal(before, snapshot(model, sharded)), "a skipped step changed weights or state"
    return model, sharded, ref, reference, log


def compare(world, model, opt, ref, ref_opt, log, name: str) -> dict:
    diff = rel_diff(model, ref)
    check(diff, EIGHT_BIT_TOL if name == "adamw8bit" else TOL)
    norms = [(e["norm"], e["ref_norm"]) for e in log if not e["skipped"]]
    norm_diff = max(abs(a - b) / b for a, b in norms)
    check(norm_diff, EIGHT_BIT_TOL if name == "adamw8bit" else TOL, "grad norm")
    return {"rel_diff": diff, "norm_rel_diff": norm_diff, "refreshes": opt.galore_stats["refreshes"]}


# ------------------------------------------------------------------ the pairwise matrix
FACTORS = dict(opt=list(OPTIMIZERS), proj=["std", "left", "right", "reverse_std"],
               groups=["named", "plain_first", "flat"], accum=[1, 2], clip=[None, CLIP], cols=[False, True])
PAIRWISE = pairwise.cases(FACTORS)


def case_name(c: dict) -> str:
    return (f"{c['opt']}_{c['proj']}_{c['groups']}_k{c['accum']}_{'clip' if c['clip'] else 'noclip'}_"
            f"{'cols' if c['cols'] else 'rows'}")


def pairwise_case(c: dict):
    def run(world: int) -> dict:  # refreshes at steps 0, 2, 4 and 6
        return compare(world, *train(world, **c), c["opt"])
    return run


# ------------------------------------------------------------------ layouts and their costs
def case_layout_of_each_parameter(world: int) -> dict:
    """What each rank holds, read from the placements: rows for right-projected matrices,
    columns for left-projected ones the shard count divides; 2,2,1,0 rows at 4 ranks."""
    model = shard(make_model(), world, cols=True)
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=RANK))
    out = {}
    for name, p in model.named_parameters():
        lay = opt.layout_of(p)
        out[name] = {"split_dim": lay.split_dim, "rows": list(lay.rows), "cols": list(lay.cols)}
    assert out["attn_q.weight"]["split_dim"] == 0
    assert out["mlp_out.weight"]["split_dim"] == 1  # 12 columns: 2, 3 and 4 divide them
    assert out["attn_o.weight"]["split_dim"] == (1 if world == 2 else 0)
    return out


def case_collectives_between_refreshes(world: int) -> dict:
    """Between refreshes: right-projected row shards and left-projected column shards need no
    projection collective, only the step's one scalar norm all-reduce; a left-projected matrix
    held by rows adds ONE packed all-reduce of its r x n partial sums."""
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    for proj, cols in (("right", False), ("std", True), ("left", False)):
        model = shard(make_model(), world, cols=cols, proj_type=proj)
        opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=RANK, update_proj_gap=GAP, proj_type=proj))
        calls = []
        for s in range(3):
            x, y = data(s, 0, 2 * world)
            opt.zero_grad()
            loss_fn(model, x.chunk(world)[dist.get_rank()], y.chunk(world)[dist.get_rank()]).backward()
            COMM.reset()
            cdm = CommDebugMode()
            with count_collectives() as counted, cdm:
                opt.step()
            calls.append({"calls": counted.total_calls(), "implicit": cdm.get_total_counts(),
                          "names": dict(COMM.calls), "bytes": dict(COMM.bytes)})
        between = calls[1]  # step 1: no refresh (gap 2)
        assert between["implicit"] == between["calls"], between  # DTensor never communicates on its own
        left_by_rows = [n for n, p in model.named_parameters() if p.dim() == 2 and "rank" in
                        next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                        and opt.layout_of(p).split_dim == 0 and pj.choose_side(tuple(p.shape), proj) == "left"]
        expected = {"grad_norm": 1}
        if left_by_rows:
            expected["partial_sums"] = 1
        assert between["names"] == expected, (proj, cols, between)
        assert between["calls"] == sum(expected.values()), between
        out[f"{proj}_{'cols' if cols else 'rows'}"] = {"between": between, "left_by_rows": left_by_rows}
    return out


def case_hsdp_on_fsdp2s_2d_mesh(world: int) -> dict:
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    return compare(world, *train(world, hsdp="2d", clip=CLIP), "adamw")


def case_hsdp_lowrank_replicas_adamw(world: int) -> dict:
    """HSDP that averages projected gradients over replicas (reduce_group): n/r less traffic."""
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    return compare(world, *train(world, hsdp="lowrank", accum=2, clip=CLIP), "adamw")


def case_hsdp_lowrank_replicas_adafactor_left_cols(world: int) -> dict:
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    return compare(world, *train(world, opt="adafactor", hsdp="lowrank", cols=True, clip=CLIP), "adafactor")


def case_randomized_refresh_equals_one_process(world: int) -> dict:
    """refresh="randomized": a cold seeded start, then warm subspace iterations answered by
    one packed all-reduce of Gram products per round (row blocks of the to_right view), the
    same basis as the one-process randomized refresh."""
    out = compare(world, *train(world, refresh="randomized", cols=True, clip=CLIP), "adamw")
    return out


def case_stagger_and_reprojected_moments(world: int) -> dict:
    return compare(world, *train(world, stagger=True, moments="reproject", accum=2), "adamw")


def case_reset_moments_adafactor(world: int) -> dict:
    return compare(world, *train(world, opt="adafactor", moments="reset", cols=True), "adafactor")


# ------------------------------------------------------------------ NaN/Inf on one rank
def _nonfinite(world: int, **kw) -> dict:
    bad_rank = world - 1
    model, opt, ref, ref_opt, log = train(world, steps=5, poison=(2, bad_rank), clip=CLIP, **kw)
    out = compare(world, model, opt, ref, ref_opt, log, kw.get("opt", "adamw"))
    assert opt.skipped_steps == 1 and [e["skipped"] for e in log] == [False, False, True, False, False], log
    assert all(e["norm"] == e["norm"] and abs(e["norm"]) != float("inf") for e in log if not e["skipped"])
    return {**out, "skip_log": [e["skipped"] for e in log]}


def case_inf_on_one_rank_skips_everywhere_rows(world: int) -> dict:
    """An Inf in one rank's shard at a refresh step: every rank skips the step (weights,
    moments, projectors, step counts bit-identical), counts it, and trains on exactly."""
    return _nonfinite(world)


def case_inf_on_one_rank_skips_everywhere_cols_adafactor(world: int) -> dict:
    return _nonfinite(world, opt="adafactor", cols=True)


def case_inf_on_one_replica_skips_everywhere_hsdp_lowrank(world: int) -> dict:
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    return _nonfinite(world, hsdp="lowrank")


# ------------------------------------------------------------------ per-layer mode
def layerwise(world: int, *, opt: str = "adamw", accum: int = 1, clip: float | None = None,
              timing: str = "exact", cols: bool = False, steps: int = 5, refresh: str = "svd") -> dict:
    """Per-layer updates inside the FSDP2 backward against one process's per-layer run."""
    rank = dist.get_rank()
    ref = make_model()
    model = shard(copy.deepcopy(ref), world, cols=cols)
    mk = lambda m: galore_ds.LayerwiseOptimizer(  # noqa: E731
        make_optimizer(opt, m, update_proj_gap=GAP, refresh=refresh), accumulation_steps=accum,
        max_grad_norm=clip, clip_timing=timing)
    lw, ref_lw = mk(model), mk(ref)
    norms = []
    for s in range(steps):
        for micro in range(accum):
            x, y = data(s, micro, 2 * world)
            (loss_fn(ref, x, y) / accum).backward()
            ref_lw.step()
            (loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]) / accum).backward()
            lw.step()
        norms.append((lw.grad_norm, ref_lw.grad_norm))
        assert all(p.grad is None for p in model.parameters()), "gradients not freed"
    diff = rel_diff(model, ref)
    check(diff, EIGHT_BIT_TOL if opt == "adamw8bit" else TOL)
    norm_diff = max(abs(a - b) / b for a, b in norms)
    check(norm_diff, EIGHT_BIT_TOL if opt == "adamw8bit" else TOL, "grad norm")
    return {"rel_diff": diff, "norm_rel_diff": norm_diff, "coefs": lw.clip_coef}


# ------------------------------------------------------------------ the family (issue 23)
def case_family_hsdp_on_fsdp2s_2d_mesh(world: int) -> dict:
    """Fira and APOLLO-Mini on FSDP2's own HSDP (replicas hold the same shards; FSDP2 averages
    full gradients over them): the limiter's and tensor-wise norms sum over the shard group only."""
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    return {opt: compare(world, *train(world, opt=opt, hsdp="2d", clip=CLIP, cols=True), opt)
            for opt in ("fira", "apollo_mini")}


def case_family_reduce_group_is_refused(world: int) -> dict:
    """reduce_group (HSDP low-rank replicas, replicated weights) averages R only: a rule that
    reads the full gradient cannot run on it, refused in one line that names plain DDP."""
    model = shard(make_model(), world)
    messages = {}
    for opt in ("fira", "apollo"):
        try:
            make_optimizer(opt, model, reduce_group=dist.group.WORLD)
            raise AssertionError(f"{opt}: built with reduce_group")
        except ValueError as e:
            messages[opt] = str(e)
            assert "\n" not in str(e) and "plain DDP" in str(e)
    return messages


# ------------------------------------------------------------------ refusals
def case_refuses_two_sharded_mesh_dims_and_strided_shards(world: int) -> dict:
    """What cannot be done exactly is refused with one line, never run differently."""
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (2, 2))
    messages = {}
    for label, placements in (("two_dims", [Shard(0), Shard(1)]),
                              ("strided", [_StridedShard(0, split_factor=2), Shard(0)])):
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 8), mesh, placements))
        w.grad = distribute_tensor(torch.randn(8, 8), mesh, placements)
        opt = galore_ds.GaLoreAdamW([{"params": [w], "rank": 2}])
        try:
            opt.step()
            raise AssertionError(f"{label}: stepped")
        except NotImplementedError as e:
            messages[label] = str(e)
            assert "\n" not in str(e) and "GaLore" in str(e)
    return messages


# ------------------------------------------------------------------ checkpoints across world sizes
def _ckpt(tag: str) -> str:
    return os.environ["GALORE_TEST_CKPT"] + tag


def dcp_save(world: int, opt_name: str) -> dict:
    """World 2: 4 steps, then a DCP checkpoint (optimizer state keyed by name, split like the
    parameters); world 3 loads it and continues (dcp_load)."""
    import torch.distributed.checkpoint as dcp

    if world != 2:
        return {"skipped": "saves on 2 ranks"}
    model, opt, _, _, _ = train(world, opt=opt_name, steps=4, cols=True, rows=DCP_ROWS)
    dcp.save(dcp_state_dict(model, opt), checkpoint_id=_ckpt(opt_name))
    # same world size: a load puts every tensor back bit for bit
    model2 = shard(make_model(seed=5), world, cols=True)
    opt2 = make_optimizer(opt_name, model2, update_proj_gap=GAP)
    dcp_load(model2, opt2, _ckpt(opt_name))
    a, b = snapshot(model, opt), snapshot(model2, opt2)
    assert a.keys() == b.keys() and params_equal(a, b), "same-world-size DCP round trip is not bit-identical"
    return {"saved": True}


def dcp_load_elsewhere(world: int, opt_name: str) -> dict:
    """World 3 resumes world 2's checkpoint (moments resharded; attn_o's columns were split on
    2 ranks and its rows are on 3) and ends within tolerance of 7 uninterrupted steps."""
    if world != 3:
        return {"skipped": "loads on 3 ranks"}
    rank = dist.get_rank()
    model = shard(make_model(seed=5), world, cols=True)
    opt = make_optimizer(opt_name, model, update_proj_gap=GAP)
    dcp_load(model, opt, _ckpt(opt_name))
    for s in range(4, STEPS):
        opt.zero_grad()
        x, y = data(s, 0, DCP_ROWS)
        loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        opt.step()
    ref = make_model()
    ref_opt = make_optimizer(opt_name, ref, update_proj_gap=GAP)
    for s in range(STEPS):
        ref_opt.zero_grad()
        x, y = data(s, 0, DCP_ROWS)
        loss_fn(ref, x, y).backward()
        ref_opt.step()
    diff = rel_diff(model, ref)
    check(diff, EIGHT_BIT_TOL if opt_name == "adamw8bit" else TOL)
    return {"rel_diff": diff}


CASES: dict = {f"pairwise_{case_name(c)}": pairwise_case(c) for c in PAIRWISE}
CASES.update({
    "layout_of_each_parameter": case_layout_of_each_parameter,
    "collectives_between_refreshes": case_collectives_between_refreshes,
    "hsdp_on_fsdp2s_2d_mesh": case_hsdp_on_fsdp2s_2d_mesh,
    "hsdp_lowrank_replicas_adamw": case_hsdp_lowrank_replicas_adamw,
    "hsdp_lowrank_replicas_adafactor_left_cols": case_hsdp_lowrank_replicas_adafactor_left_cols,
    "randomized_refresh_equals_one_process": case_randomized_refresh_equals_one_process,
    "stagger_and_reprojected_moments": case_stagger_and_reprojected_moments,
    "reset_moments_adafactor": case_reset_moments_adafactor,
    "inf_on_one_rank_skips_everywhere_rows": case_inf_on_one_rank_skips_everywhere_rows,
    "inf_on_one_rank_skips_everywhere_cols_adafactor": case_inf_on_one_rank_skips_everywhere_cols_adafactor,
    "inf_on_one_replica_skips_everywhere_hsdp_lowrank": case_inf_on_one_replica_skips_everywhere_hsdp_lowrank,
    "layerwise_k1": lambda w: layerwise(w),
    "layerwise_k1_clip": lambda w: layerwise(w, clip=CLIP),
    "layerwise_k1_clip_delayed": lambda w: layerwise(w, clip=CLIP, timing="delayed"),
    "layerwise_k2_clip_cols": lambda w: layerwise(w, accum=2, clip=CLIP, cols=True),
    "layerwise_randomized_k2": lambda w: layerwise(w, accum=2, refresh="randomized"),
    "layerwise_adafactor_k1_clip_cols": lambda w: layerwise(w, opt="adafactor", clip=CLIP, cols=True),
    "layerwise_adamw8bit_k2": lambda w: layerwise(w, opt="adamw8bit", accum=2),
    "refuses_two_sharded_mesh_dims_and_strided_shards": case_refuses_two_sharded_mesh_dims_and_strided_shards,
    "family_hsdp_on_fsdp2s_2d_mesh": case_family_hsdp_on_fsdp2s_2d_mesh,
    "family_reduce_group_is_refused": case_family_reduce_group_is_refused,
    "family_inf_on_one_rank_skips_everywhere_apollo_cols": lambda w: _nonfinite(w, opt="apollo", cols=True),
    "layerwise_fira_k2_clip_cols": lambda w: layerwise(w, opt="fira", accum=2, clip=CLIP, cols=True),
    "layerwise_apollo_mini_k1_clip_delayed": lambda w: layerwise(w, opt="apollo_mini", clip=CLIP, timing="delayed"),
    "layerwise_apollo_k1": lambda w: layerwise(w, opt="apollo"),
})
for _name in OPTIMIZERS:
    CASES[f"dcp_save_2_{_name}"] = lambda w, n=_name: dcp_save(w, n)
    CASES[f"dcp_load_3_{_name}"] = lambda w, n=_name: dcp_load_elsewhere(w, n)


# ------------------------------------------------------------------ every checkpoint path (issue 21)
def _on_2_and_3(fn):
    return lambda world: {"skipped": "saves on 2 ranks, loads on 2 and 3"} if world == 4 else fn(world)


from checkpoint_paths_worker import SUITE_CASES  # noqa: E402

CASES.update({f"ckpt_{name}": _on_2_and_3(fn) for name, fn in SUITE_CASES.items()})


if __name__ == "__main__":
    run_worker(CASES)
