"""Multi-process DeepSpeed GaLore cases: one process group per world size, every case inside.

Run by tests/test_deepspeed.py:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/ds_cases.py --out /tmp/r.json
    DS_ACCELERATOR=cpu mpirun -n 2 .venv/bin/python tests/dist/ds_cases.py --out /tmp/r.json
Each case builds the same tiny model on every rank, trains it through deepspeed.initialize
with the JSON optimizer "GaLoreAdamW" on a global batch split across ranks, and trains an
unsharded copy with the single-process core GaLoreAdamW (proj_type="right") on the whole
global batch inside the same rank. Rank 0 writes one JSON with every case's numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import deepspeed  # noqa: E402

import galore_ds  # noqa: E402,F401  (registers the JSON names)
from galore_ds.distributed.common import count_collectives  # noqa: E402
from galore_ds.distributed.deepspeed import DeepSpeedGaLoreMixin  # noqa: E402
from galore_ds.optim.adamw import GaLoreAdamW  # noqa: E402

IN, OUT, MB = 16, 8, 2
LR, WD, RANK, GAP = 1e-2, 0.01, 4, 2


SHAPES = {
    # W1 15x16 (odd rows: ZeRO-3 chunks cut a row on 2 ranks), W2 20x15, W3 7x20 (wide)
    "odd": (15, 20, 7),
    # every chunk/partition boundary on a row edge at world 2: no split rows
    "even": (16, 20, 8),
}


class Tiny(nn.Module):
    """Three GaLore matrices (see SHAPES), a full-rank head and biases."""

    def __init__(self, kind: str = "odd") -> None:
        super().__init__()
        a, b, c = SHAPES[kind]
        self.w1 = nn.Linear(IN, a)
        self.w2 = nn.Linear(a, b, bias=False)
        self.w3 = nn.Linear(b, c, bias=False)
        self.head = nn.Linear(c, OUT)

    def forward(self, x):
        h = torch.tanh(self.w1(x))
        h = torch.tanh(self.w2(h))
        h = torch.tanh(self.w3(h))
        return self.head(h)


GALORE = ("w1.weight", "w2.weight", "w3.weight")


def groups(model):
    named = dict(model.named_parameters())
    g = [named[n] for n in GALORE]
    rest2 = [p for n, p in named.items() if n not in GALORE and p.dim() >= 2]
    rest1 = [p for n, p in named.items() if p.dim() < 2]
    return [
        dict(params=g, rank=RANK, update_proj_gap=GAP, scale=0.25, proj_type="right",
             weight_decay=WD),
        dict(params=rest2, weight_decay=WD),
        dict(params=rest1, weight_decay=0.0),
    ]


def data(step: int, micro: int, world: int):
    gen = torch.Generator().manual_seed(10_000 + 97 * step + micro)
    x = torch.randn(world * MB, IN, generator=gen)
    y = torch.randn(world * MB, OUT, generator=gen)
    return x, y


def ds_config(stage: int, gas: int, world: int, opt: str = "GaLoreAdamW", clip: float = 0.0):
    params = {"lr": LR, "weight_decay": WD}
    if opt == "AdamW":
        params = {"lr": LR, "weight_decay": WD, "torch_adam": True}
    return {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MB * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": opt, "params": params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def full_params(engine):
    """name -> full fp32 tensor of the engine's model (gathers ZeRO-3 partitions)."""
    params = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)) for n in b)


def ds_train_step(engine, step, gas, world, rank):
    loss_fn = nn.MSELoss()
    for micro in range(gas):
        x, y = data(step, micro, world)
        xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
        loss = loss_fn(engine(xs), ys)
        engine.backward(loss)
        engine.step()


def ref_train_step(model, opt, step, gas, world, clip):
    loss_fn = nn.MSELoss()
    opt.zero_grad(set_to_none=True)
    for micro in range(gas):
        x, y = data(step, micro, world)
        (loss_fn(model(x), y) / gas).backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def make_engine(stage, gas, world, opt="GaLoreAdamW", clip=0.0, kind="odd"):
    torch.manual_seed(0)
    model = Tiny(kind)
    ref = copy.deepcopy(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                           config=ds_config(stage, gas, world, opt, clip))
    return engine, ref


def split_row_flats(engine) -> int:
    """Flat tensors whose GaLore matrices have rows cut by rank boundaries (each costs one
    tiny all_reduce per step)."""
    opt = engine.basic_optimizer
    lays = getattr(opt, "_ds_layouts", None) or {}
    return sum(1 for lay in lays.values() if lay.n_split_rows)


def run_case(stage, gas, world, rank, steps, clip=0.0, kind="odd"):
    t0 = time.time()
    engine, ref = make_engine(stage, gas, world, clip=clip, kind=kind)
    opt = engine.basic_optimizer
    assert isinstance(opt, DeepSpeedGaLoreMixin), type(opt)
    ref_opt = GaLoreAdamW(groups(ref), lr=LR, weight_decay=WD)
    errs, calls = [], []
    for step in range(steps):
        with count_collectives() as cnt:
            ds_train_step(engine, step, gas, world, rank)
        calls.append(cnt.total_calls())
        ref_train_step(ref, ref_opt, step, gas, world, clip)
        errs.append(rel(full_params(engine), dict(ref.named_parameters())))
    # baseline: DeepSpeed's own AdamW at the same stage, collectives per step
    base, _ = make_engine(stage, gas, world, opt="AdamW", clip=clip, kind=kind)
    base_calls = []
    for step in range(steps):
        with count_collectives() as cnt:
            ds_train_step(base, step, gas, world, rank)
        base_calls.append(cnt.total_calls())
    refresh_steps = [s for s in range(steps) if s % GAP == 0]
    extra = [calls[s] - base_calls[s] for s in range(steps) if s not in refresh_steps]
    return {
        "stage": stage, "gas": gas, "world": world, "clip": clip, "steps": steps, "model": kind,
        "max_rel": max(errs), "rel_per_step": errs,
        "refreshes": opt.galore_stats["refreshes"], "refresh_steps": refresh_steps,
        "calls": calls, "adamw_calls": base_calls, "extra_calls_between_refreshes": extra,
        "split_row_flats": split_row_flats(engine), "bound_stage": opt._ds_stage,
        "secs": time.time() - t0,
    }


def run_checkpoint(stage, world, rank, tmp):
    """save at step 3, continue 2 steps; fresh engine loads, same 2 steps: bit-identical."""
    engine, _ = make_engine(stage, 1, world)
    for step in range(3):
        ds_train_step(engine, step, 1, world, rank)
    engine.save_checkpoint(tmp, tag="t")
    for step in range(3, 5):
        ds_train_step(engine, step, 1, world, rank)
    a = full_params(engine)
    engine2, _ = make_engine(stage, 1, world)
    engine2.load_checkpoint(tmp, tag="t")
    for step in range(3, 5):
        ds_train_step(engine2, step, 1, world, rank)
    b = full_params(engine2)
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    return {"stage": stage, "world": world, "max_abs_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--gas", default="1,4")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--even", action="store_true", help="also the no-split-row model, gas 1")
    ap.add_argument("--clip", type=float, default=0.0, help="one extra case per stage with clipping")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world, "cases": [], "checkpoints": [], "errors": []}
    for stage in [int(s) for s in args.stages.split(",")]:
        for gas in [int(g) for g in args.gas.split(",")]:
            try:
                results["cases"].append(run_case(stage, gas, world, rank, args.steps))
            except Exception:  # report, keep going: one broken case must not hide the rest
                results["errors"].append({"stage": stage, "gas": gas, "rank": rank,
                                          "trace": traceback.format_exc()})
    extra = []
    if args.even:
        extra += [dict(kind="even")]
    if args.clip > 0:
        extra += [dict(clip=args.clip)]
    for kw in extra:
        for stage in [int(s) for s in args.stages.split(",")]:
            try:
                results["cases"].append(run_case(stage, 1, world, rank, args.steps, **kw))
            except Exception:
                results["errors"].append({"stage": stage, "case": kw, "rank": rank,
                                          "trace": traceback.format_exc()})
    if args.checkpoint:
        tmp = None
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix="galore_ds_ckpt_")
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        for stage in [int(s) for s in args.stages.split(",")]:
            try:
                results["checkpoints"].append(run_checkpoint(stage, world, rank,
                                                             os.path.join(box[0], f"s{stage}")))
            except Exception:
                results["errors"].append({"checkpoint_stage": stage, "rank": rank,
                                          "trace": traceback.format_exc()})
        dist.barrier()
        if rank == 0:
            shutil.rmtree(box[0], ignore_errors=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "per_rank": gathered}, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
