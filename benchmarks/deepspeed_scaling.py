"""DeepSpeed ZeRO 0-3 + GaLoreAdamW: per-rank optimizer state, refresh (SVD) work per rank,
and collectives/bytes per step and per refresh, against DeepSpeed's own AdamW.

One launch per world size (all stages inside it); rank 0 writes one JSON:
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus W benchmarks/deepspeed_scaling.py \
        --out benchmarks/results/deepspeed_w{W}.json
    python benchmarks/deepspeed_scaling.py --merge benchmarks/results/deepspeed_w*.json \
        --out benchmarks/results/deepspeed_scaling.json
Model: a LLaMA-shaped stack of matrices (q,k,v,o: h x h; gate, up: i x h; down: h x i) with
h=256, i=688, 4 blocks (the 60M recipe's shapes scaled down), rank 64, fp32, micro batch 4.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

H, I, BLOCKS, RANK, GAP, STEPS, MB = 256, 688, 4, 64, 4, 8, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(H, H, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down = nn.Linear(I, H, bias=False)
        self.norm = nn.LayerNorm(H)

    def forward(self, x):
        h = self.norm(x)
        a = torch.tanh(self.q(h)) * self.k(h) + self.v(h)
        x = x + self.o(a)
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(H, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def groups(model):
    mats = [p for n, p in model.named_parameters() if "blocks" in n and p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if not ("blocks" in n and p.dim() == 2)]
    return [dict(params=mats, rank=RANK, update_proj_gap=GAP, scale=0.25, proj_type="right"),
            dict(params=rest)]


def config(stage, world, opt):
    params = {"lr": 1e-3}
    if opt == "AdamW":
        params["torch_adam"] = True
    return {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": 1,
            "train_batch_size": MB * world, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
            "optimizer": {"type": opt, "params": params}}


def state_bytes(opt) -> dict:
    out = {"moments": 0, "projectors": 0, "other": 0}
    for st in opt.state.values():
        for k, v in st.items():
            if not torch.is_tensor(v):
                continue
            b = v.numel() * v.element_size()
            key = "projectors" if k == "proj" else ("moments" if k.startswith("exp_avg") else "other")
            out[key] += b
    return out


def run(stage, world, rank, opt_name):
    import deepspeed
    import torch.distributed as dist

    from collectives import count_collectives  # benchmarks/, this script's folder

    torch.manual_seed(0)
    model = Stack()
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                             config=config(stage, world, opt_name))
    basic = engine.basic_optimizer
    svd_time = [0.0]
    if hasattr(basic, "compute_basis"):
        orig = basic.compute_basis

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                svd_time[0] += time.perf_counter() - t0
        basic.compute_basis = timed
    steps = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(world * MB, 8, H, generator=gen)[rank * MB:(rank + 1) * MB]
        y = torch.randn(world * MB, 8, 16, generator=gen)[rank * MB:(rank + 1) * MB]
        s0 = svd_time[0]
        dist.barrier()
        t0 = time.perf_counter()
        with count_collectives() as cnt:
            loss = nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        steps.append({"secs": time.perf_counter() - t0, "svd_secs": svd_time[0] - s0,
                      "calls": cnt.total_calls(), "bytes": cnt.total_bytes(),
                      "by_op": dict(cnt.calls)})
    out = {"stage": stage, "optimizer": opt_name, "steps": steps,
           "state_bytes": state_bytes(basic),
           "refreshes": dict(getattr(basic, "galore_stats", {}) or {}).get("refreshes")}
    del engine
    return out


def summarize(per_rank, world):
    rows = []
    stages = sorted({c["stage"] for c in per_rank[0]})
    for stage in stages:
        g = [[c for c in r if c["stage"] == stage and c["optimizer"] == "GaLoreAdamW"][0] for r in per_rank]
        a = [[c for c in r if c["stage"] == stage and c["optimizer"] == "AdamW"][0] for r in per_rank]
        refresh = [s for s in range(STEPS) if s % GAP == 0 and s > 0]  # skip step 0 (warm-up)
        between = [s for s in range(1, STEPS) if s % GAP]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        rows.append({
            "world": world, "stage": stage,
            "galore_state_bytes_per_rank": [sum(r["state_bytes"].values()) for r in g],
            "galore_moment_bytes_per_rank": [r["state_bytes"]["moments"] for r in g],
            "galore_projector_bytes_per_rank": [r["state_bytes"]["projectors"] for r in g],
            "adamw_state_bytes_per_rank": [sum(r["state_bytes"].values()) for r in a],
            "svd_secs_per_rank_per_refresh": [mean([r["steps"][s]["svd_secs"] for s in refresh]) for r in g],
            "refresh_step_secs": mean([g[0]["steps"][s]["secs"] for s in refresh]),
            "step_secs_between_refreshes": mean([g[0]["steps"][s]["secs"] for s in between]),
            "adamw_step_secs": mean([a[0]["steps"][s]["secs"] for s in range(1, STEPS)]),
            "galore_calls_between_refreshes": mean([g[0]["steps"][s]["calls"] for s in between]),
            "galore_bytes_between_refreshes": mean([g[0]["steps"][s]["bytes"] for s in between]),
            "galore_calls_refresh_step": mean([g[0]["steps"][s]["calls"] for s in refresh]),
            "galore_bytes_refresh_step": mean([g[0]["steps"][s]["bytes"] for s in refresh]),
            "adamw_calls_per_step": mean([a[0]["steps"][s]["calls"] for s in range(1, STEPS)]),
            "adamw_bytes_per_step": mean([a[0]["steps"][s]["bytes"] for s in range(1, STEPS)]),
        })
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--merge", nargs="*")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    if args.merge:
        rows = []
        for f in sorted(args.merge):
            rows += json.load(open(f))["summary"]
        w1 = {r["stage"]: r for r in rows if r["world"] == 1}
        for r in rows:
            base = w1.get(r["stage"])
            if base:
                full = base["galore_state_bytes_per_rank"][0]
                r["state_vs_1_over_W"] = [b / (full / r["world"]) for b in r["galore_state_bytes_per_rank"]]
        meta = {"model": f"{BLOCKS} blocks, h={H}, i={I}, rank={RANK}, gap={GAP}, fp32, CPU gloo",
                "host": "2 shared CPU cores (timings are indicative only)"}
        json.dump({"meta": meta, "rows": rows}, open(args.out, "w"), indent=1)
        return
    import deepspeed
    import torch.distributed as dist

    import galore_ds.integrations.deepspeed as gds

    gds.register()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for stage in [int(s) for s in args.stages.split(",")]:
        for opt in ("GaLoreAdamW", "AdamW"):
            results.append(run(stage, world, rank, opt))
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        json.dump({"world": world, "summary": summarize(gathered, world), "per_rank": gathered},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
