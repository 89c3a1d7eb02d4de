"""Every checkpoint path x optimizer x clip timing, saved on 2 FSDP2 ranks and resumed on 2 and 3.

The suite runs the pairwise cover (SUITE_CASES) inside tests/dist/fsdp_cases.py's process
groups (tests/test_fsdp.py, as ckpt_* cases); benchmarks/checkpoint_paths.py runs the full
product (CASES) standalone (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, like torchrun):
    python tests/dist/checkpoint_paths_worker.py --out R.json --ckpt DIR [--only NAME ...]
On 2 ranks each case trains the FSDP2 model (tests/dist/harness.py's Tiny, sharded as
fsdp_cases.shard does, attn_o by columns) for SAVE_AT steps, saves through its path, trains on
to STEPS, then loads the checkpoint into a fresh model and optimizer and trains the same steps:
the two must be bit-identical. On 3 ranks the case loads what the 2 ranks saved and trains on
to STEPS: within TOL of one process that trained all STEPS (8-bit: EIGHT_BIT_TOL), or refused
with one line naming the paths that reshard. Paths:
  per_rank    torch.save(opt.state_dict()) and model.state_dict() per rank, load_state_dict
  torch_dcp   get_/set_model_state_dict and get_/set_optimizer_state_dict + DCP (sharded)
  torch_full  full_state_dict=True, cpu_offload=True to save (rank 0 writes one file);
              full_state_dict=True, broadcast_from_rank0=True to load (Accelerate's FSDP full state)
  galore_dcp  galore_ds.optim.checkpoint.dcp_state_dict / dcp_load
  flat        torchtitan's form: optim_state_dict / load_optim_state_dict + DCP
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pairwise  # noqa: E402
from harness import EIGHT_BIT_TOL, RANK, TOL, check, data, loss_fn, make_model, rel_diff, run_worker  # noqa: E402

import galore_ds  # noqa: E402

STEPS, SAVE_AT, GAP = 7, 4, 2   # refreshes at 0, 2, 4 (the first resumed step) and 6
ROWS = 12                       # a global batch 2 and 3 ranks split evenly
CLIP = 0.05                     # below the tiny model's gradient norms: clipping is active
PATHS = ("per_rank", "torch_dcp", "torch_full", "galore_dcp", "flat")
OPTIMIZERS = {
    "adamw": lambda g, **kw: galore_ds.GaLoreAdamW(g, lr=1e-2, **kw),
    "adamw8bit": lambda g, **kw: galore_ds.GaLoreAdamW8bit(g, lr=1e-2, min_8bit_size=16, **kw),
    "adafactor": lambda g, **kw: galore_ds.GaLoreAdafactor(g, **kw),   # relative_step=True
    # random projection redrawn from its seeds, the limiter's norm a per-matrix scalar
    "apollo": lambda g, **kw: galore_ds.ApolloAdamW(g, lr=1e-2, **kw),
}
CLIPS = {"exact": dict(max_grad_norm=CLIP), "delayed": dict(max_grad_norm=CLIP, clip_timing="delayed")}


def make(opt: str, clip: str, model):
    groups = galore_ds.param_groups(model, rank=RANK, update_proj_gap=GAP, weight_decay=0.1)
    return OPTIMIZERS[opt](groups, **CLIPS[clip])


def train(model, opt, steps: range, world: int) -> None:
    rank = dist.get_rank() if world > 1 else 0
    for s in steps:
        opt.zero_grad(set_to_none=True)
        x, y = data(s, 0, ROWS)
        loss_fn(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        opt.step()


def sharded(world: int, seed: int = 0):
    from fsdp_cases import shard   # here: fsdp_cases imports this module's cases

    return shard(make_model(seed=seed), world, cols=True)


def save(path: str, model, opt, where: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict)

    from galore_ds.optim.checkpoint import dcp_state_dict, optim_state_dict

    rank = dist.get_rank()
    if path == "per_rank":
        os.makedirs(where, exist_ok=True)
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{where}/rank{rank}.pt")
    elif path == "torch_dcp":
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=where)
    elif path == "torch_full":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = {"model": get_model_state_dict(model, options=options),
              "optim": get_optimizer_state_dict(model, opt, options=options)}
        if rank == 0:
            os.makedirs(where, exist_ok=True)
            torch.save(sd, f"{where}/full.pt")
    elif path == "galore_dcp":
        dcp.save(dcp_state_dict(model, opt), checkpoint_id=where)
    else:
        dcp.save({"model": get_model_state_dict(model), "optim": optim_state_dict(opt)}, checkpoint_id=where)
    dist.barrier()


def load(path: str, model, opt, where: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    from galore_ds.optim.checkpoint import create_state, dcp_load, load_optim_state_dict, optim_state_dict

    rank = dist.get_rank()
    if path == "per_rank":  # on 3 ranks rank 2 reads rank 1's file: only the optimizer can say
        sd = torch.load(f"{where}/rank{min(rank, 1)}.pt", weights_only=False)
        opt.load_state_dict(sd["optim"])
        model.load_state_dict(sd["model"])
    elif path == "torch_dcp":
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=where)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    elif path == "torch_full":
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        sd = torch.load(f"{where}/full.pt", weights_only=False) if rank == 0 else {"model": {}, "optim": {}}
        set_model_state_dict(model, sd["model"], options=options)
        set_optimizer_state_dict(model, opt, sd["optim"], options=options)
    elif path == "galore_dcp":
        dcp_load(model, opt, where)
    else:
        create_state(opt)
        sd = {"model": get_model_state_dict(model), "optim": optim_state_dict(opt)}
        dcp.load(sd, checkpoint_id=where)
        set_model_state_dict(model, sd["model"])
        load_optim_state_dict(opt, sd["optim"])


def full_weights(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def case(path: str, opt_name: str, clip: str):
    def run(world: int) -> dict:
        where = os.environ["GALORE_TEST_CKPT"] + f"/{path}_{opt_name}_{clip}"
        if world == 2:
            model = sharded(world)
            opt = make(opt_name, clip, model)
            train(model, opt, range(SAVE_AT), world)
            coef = opt.next_clip_coef
            save(path, model, opt, where)
            train(model, opt, range(SAVE_AT, STEPS), world)
            model2 = sharded(world, seed=5)   # another init: everything must come from the checkpoint
            opt2 = make(opt_name, clip, model2)
            load(path, model2, opt2, where)
            assert opt2.next_clip_coef == coef, (opt2.next_clip_coef, coef)
            train(model2, opt2, range(SAVE_AT, STEPS), world)
            a, b = full_weights(model), full_weights(model2)
            worst = max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)
            assert all(torch.equal(a[k], b[k]) for k in a), f"same world size: resume {worst:.3e} off"
            return {"bit_identical": True, "carried_clip_coef": coef}
        model = sharded(world, seed=5)
        opt = make(opt_name, clip, model)
        try:
            load(path, model, opt, where)
        except ValueError as exc:   # the one refusal this matrix expects: per-rank files elsewhere
            assert path == "per_rank" and "\n" not in str(exc) and "dcp" in str(exc).lower(), str(exc)
            return {"refused": str(exc)}
        assert path != "per_rank", "a per-rank state dict of 2 ranks loaded on 3 without a word"
        train(model, opt, range(SAVE_AT, STEPS), world)
        ref = make_model()
        ref_opt = make(opt_name, clip, ref)
        train(ref, ref_opt, range(STEPS), 1)
        diff = rel_diff(model, ref)
        check(diff, EIGHT_BIT_TOL if opt_name == "adamw8bit" else TOL)
        return {"rel_diff_vs_one_process": diff}
    return run


FACTORS = dict(path=list(PATHS), opt=list(OPTIMIZERS), clip=list(CLIPS))
PAIRWISE = pairwise.cases(FACTORS)   # the suite's cover (fsdp_cases runs it in its process groups)
CASES = {f"{p}_{o}_{c}": case(p, o, c) for p in PATHS for o in OPTIMIZERS for c in CLIPS}  # the full product


def case_uneven_8bit_shards_torch_dcp(world: int) -> dict:
    """The issue's uneven-shard snippet: 13 rows of mlp_up on 2 ranks (7|6; 5|5|3 on 3) through
    torch's get/set_optimizer_state_dict + DCP, saved and loaded on the same ranks. The
    per-rank 8-bit codes hit DCP's "Size mismatch between saved torch.Size([6, 3]) and current:
    torch.Size([7, 3])"; the fp32 moment values are blocks of one tensor, and every state
    tensor comes back bit for bit."""
    where = os.environ["GALORE_TEST_CKPT"] + f"/uneven{world}"
    model = sharded(world)
    opt = make("adamw8bit", "exact", model)
    train(model, opt, range(SAVE_AT), world)
    save("torch_dcp", model, opt, where)
    model2 = sharded(world, seed=5)
    opt2 = make("adamw8bit", "exact", model2)
    load("torch_dcp", model2, opt2, where)
    for p, q in zip(model.parameters(), model2.parameters()):
        for k, v in opt.state[p].items():
            w = opt2.state[q][k]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), k
    return {"state_bit_identical": True}


def case_ddp_replicas_agree_after_a_full_state_dict_resume(world: int) -> dict:
    """Finding 4 on replicated weights: DDP (whole tensors on every rank), full state dict
    saved from rank 0 and broadcast at load; every rank's state must be the saved one (the
    other ranks got rank 0's column-major projectors read row-major)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = make_model()
    model = DDP(copy.deepcopy(ref))
    opt = make("adamw", "exact", model.module)
    train(model, opt, range(SAVE_AT), world)
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fresh = DDP(copy.deepcopy(model.module))
    opt2 = make("adamw", "exact", fresh.module)
    set_optimizer_state_dict(fresh, opt2, osd if dist.get_rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for p, q in zip(model.module.parameters(), fresh.module.parameters()):
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, opt2.state[q][k]), f"{k} differs from the saved one on rank {dist.get_rank()}"
    train(model, opt, range(SAVE_AT, STEPS), world)
    train(fresh, opt2, range(SAVE_AT, STEPS), world)
    # the replicas stay equal (they diverged by 6.0e-3); against the uninterrupted run within
    # TOL only: a new DDP wrapper's first buckets sum in another order on 3 gloo ranks
    flat = torch.cat([p.detach().reshape(-1) for p in fresh.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(everyone[0], x) for x in everyone), "DDP replicas differ after the resume"
    diff = rel_diff(fresh.module, model.module)
    check(diff, TOL)
    return {"replicas_equal": True, "rel_diff_vs_uninterrupted": diff}


SPECIAL = {"uneven_8bit_shards_torch_dcp": case_uneven_8bit_shards_torch_dcp,
           "ddp_full_state_dict_broadcast": case_ddp_replicas_agree_after_a_full_state_dict_resume}
CASES.update(SPECIAL)
SUITE_CASES = {**{f"{c['path']}_{c['opt']}_{c['clip']}": CASES[f"{c['path']}_{c['opt']}_{c['clip']}"]
                  for c in PAIRWISE}, **SPECIAL}


if __name__ == "__main__":
    run_worker(CASES)
