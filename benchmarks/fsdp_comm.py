"""Communication, refresh time and optimizer memory of GaLore on FSDP2 (CPU, gloo).

    torchrun --nproc_per_node W benchmarks/fsdp_comm.py [--hidden 256 --inter 688 --layers 2 --rank 64]

Writes benchmarks/results/fsdp_comm_w{W}.json. Model: LLaMA-shaped linear blocks (q, k, v, o:
h x h; gate, up: i x h; down: h x i), fully_shard per block, batch 8 per rank. Optimizers
(galore_ds's public classes, which read the placements):
  galore_right      GaLoreAdamW, proj_type right: every matrix by rows (exact SVD on an owner)
  galore_std_cols   proj_type std, down (left-projected) sharded by columns (shard_placement_fn)
  galore_std_rows   proj_type std, down sharded by rows: its P^T G_i partial sums all-reduced
  galore_randomized proj_type right, refresh=randomized (distributed subspace iteration)
  adamw             torch.optim.AdamW on the same FSDP2 model (no GaLore)
  galore_torch      galore-torch 1.0 GaLoreAdamW handed the DTensor parameters
  galore_adafactor  GaLoreAdafactor, proj_type right (one statistics all-reduce per step)
  galore_torch_adafactor  galore-torch 1.0 GaLoreAdafactor handed the DTensor parameters
For each: collectives and bytes issued by optimizer.step() on a refresh step and between
refreshes (torch.distributed calls counted by wrapping, plus CommDebugMode, which also sees
DTensor's implicit collectives), step time (max over ranks), optimizer state bytes per rank.
FSDP's own all-gather / reduce-scatter in forward/backward are the same for all four and
are not counted here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import galore_ds  # noqa: E402
from collectives import count_collectives  # noqa: E402  (benchmarks/, this script's folder)
from galore_ds.layouts.comm import COMM  # noqa: E402


class Block(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)
        self.norm = nn.Parameter(torch.ones(h))

    def forward(self, x):
        a = self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))
        x = (x + a) * self.norm
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def build(args, cols: bool = False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    model = nn.Sequential(*(Block(args.hidden, args.inter) for _ in range(args.layers)))
    world = dist.get_world_size()
    downs = {id(blk.down.weight) for blk in model}

    def placement(p):  # the left-projected (wide) down_proj by columns, where they divide
        return Shard(1) if cols and id(p) in downs and p.shape[1] % world == 0 else None

    for blk in model:
        fully_shard(blk, shard_placement_fn=placement)
    fully_shard(model)
    return model


def make_opt(name, model, args):
    mats = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    g = dict(params=mats, rank=args.rank, update_proj_gap=args.gap, scale=0.25, proj_type="right")
    if name == "galore_right":
        return galore_ds.GaLoreAdamW([g, dict(params=rest)], lr=1e-3)
    if name in ("galore_std_cols", "galore_std_rows"):
        return galore_ds.GaLoreAdamW([dict(g, proj_type="std"), dict(params=rest)], lr=1e-3)
    if name == "galore_randomized":
        return galore_ds.GaLoreAdamW([dict(g, refresh="randomized"), dict(params=rest)], lr=1e-3)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW([dict(g, proj_type="std"), dict(params=rest)], lr=1e-3)
    adafactor = dict(lr=1e-3, relative_step=False, scale_parameter=False)
    if name == "galore_adafactor":
        return galore_ds.GaLoreAdafactor([g, dict(params=rest)], **adafactor)
    if name == "galore_torch_adafactor":
        from galore_torch import GaLoreAdafactor

        return GaLoreAdafactor([dict(g, proj_type="std"), dict(params=rest)], **adafactor)
    raise ValueError(name)


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:  # galore-torch projector
                m = v.ortho_matrix
                m = m.to_local() if hasattr(m, "to_local") else m
                total += m.numel() * m.element_size()
    return total


def measured_step(opt):
    from torch.distributed.tensor.debug import CommDebugMode

    COMM.reset()
    cdm = CommDebugMode()
    dist.barrier()
    t0 = time.perf_counter()
    with count_collectives() as c, cdm:
        opt.step()
    dt = time.perf_counter() - t0
    t = torch.tensor([dt])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"seconds_max_over_ranks": float(t), "dist_calls": c.total_calls(),
            "dist_bytes_first_tensor_arg": c.total_bytes(), "commdebug_ops": cdm.get_total_counts(),
            "commdebug_by_op": {str(k): v for k, v in cdm.get_comm_counts().items()},
            "galore_helper_bytes": COMM.total_bytes(), "galore_ops": dict(COMM.calls)}


def run(name, args):
    rank = dist.get_rank()
    model = build(args, cols=name == "galore_std_cols")
    try:
        opt = make_opt(name, model, args)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = {"steps": []}
    try:
        for step in range(args.gap + 1):
            gen = torch.Generator().manual_seed(step * 100 + rank)
            x = torch.randn(8, args.hidden, generator=gen)
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            out["steps"].append(measured_step(opt))
    except Exception as exc:  # noqa: BLE001 - galore-torch on DTensors may fail
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return out
    s = out["steps"]
    out["cold_refresh"] = s[0]
    out["warm_refresh"] = s[args.gap]
    out["between"] = {
        "galore_ops_per_step": s[1].get("galore_ops"),
        "dist_calls_per_step": sum(x["dist_calls"] for x in s[1:args.gap]) / (args.gap - 1),
        "commdebug_ops_per_step": sum(x["commdebug_ops"] for x in s[1:args.gap]) / (args.gap - 1),
        "seconds_per_step": sum(x["seconds_max_over_ranks"] for x in s[1:args.gap]) / (args.gap - 1),
    }
    out["optimizer_state_bytes_this_rank"] = state_bytes(opt)
    sb = torch.tensor([float(out["optimizer_state_bytes_this_rank"])])
    dist.all_reduce(sb, op=dist.ReduceOp.MAX)
    out["optimizer_state_bytes_max_rank"] = int(sb)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--gap", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=["galore_right", "galore_std_cols", "galore_std_rows",
                                                  "galore_randomized", "adamw", "galore_torch",
                                                  "galore_adafactor", "galore_torch_adafactor"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    results = {"world": world, "args": vars(args), "torch": torch.__version__,
               "threads_per_rank": torch.get_num_threads(), "device": "cpu/gloo"}
    for name in args.only:
        res = run(name, args)
        if dist.get_rank() == 0:
            res.pop("steps", None)
            results[name] = res
            print(name, json.dumps({k: v for k, v in res.items() if k != "steps"})[:600], flush=True)
    if dist.get_rank() == 0:
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"fsdp_comm_w{world}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
