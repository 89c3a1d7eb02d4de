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
from shutdown import exit_worker  # noqa: E402

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


# JSON optimizer params per type (and the core class + kwargs of the single-process reference)
OPT_PARAMS = {
    "GaLoreAdamW": {"lr": LR, "weight_decay": WD},
    "GaLoreAdamW8bit": {"lr": LR, "weight_decay": WD, "min_8bit_size": 16},
    "GaLoreAdafactor": {"lr": LR, "weight_decay": WD, "relative_step": False,
                        "scale_parameter": False},
}


def ref_optimizer(opt: str, params):
    from galore_ds.optim import GaLoreAdafactor, GaLoreAdamW8bit
    cls = {"GaLoreAdamW": GaLoreAdamW, "GaLoreAdamW8bit": GaLoreAdamW8bit,
           "GaLoreAdafactor": GaLoreAdafactor}[opt]
    return cls(params, **OPT_PARAMS[opt])


def ds_config(stage: int, gas: int, world: int, opt: str = "GaLoreAdamW", clip: float = 0.0,
              bf16: bool = False, sub_group_size: int = 0, fp16: bool = False):
    params = dict(OPT_PARAMS.get(opt, {}))
    if opt == "AdamW":
        params = {"lr": LR, "weight_decay": WD, "torch_adam": True}
    return {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": gas,
        "train_batch_size": MB * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage,
                              **({"sub_group_size": sub_group_size} if sub_group_size else {})},
        "optimizer": {"type": opt, "params": params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **({"bf16": {"enabled": True}} if bf16 else {}),
        # dynamic loss scaling from 2**8 (a tiny model never overflows on its own)
        **({"fp16": {"enabled": True, "initial_scale_power": 8}} if fp16 else {}),
        # ZeRO-1 + bf16 + fp32 grad accumulation is DeepSpeed's BF16_Optimizer (flat partitions)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 and stage == 1 else {}),
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
        dtype = next(engine.module.parameters()).dtype
        loss = loss_fn(engine(xs.to(dtype)).float(), ys)
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


def make_engine(stage, gas, world, opt="GaLoreAdamW", clip=0.0, kind="odd", bf16=False,
                sub_group_size=0, fp16=False):
    torch.manual_seed(0)
    model = Tiny(kind)
    ref = copy.deepcopy(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                           config=ds_config(stage, gas, world, opt, clip, bf16,
                                                            sub_group_size, fp16))
    return engine, ref


def allow_cpu_fp16() -> None:
    """DeepSpeed refuses fp16 on a CPU without mkldnn fp16 kernels; torch's CPU fp16
    arithmetic is all a tiny model needs, and the loss-scaling code under test is the same."""
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True


def optimizer_state(engine) -> dict:
    """Every tensor and number in the GaLore optimizer's state, copied."""
    return {str(k): {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
            for k, v in engine.basic_optimizer.state.items()}


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(
            torch.equal(x, b[k][kk]) if torch.is_tensor(x) else x == b[k][kk]
            for kk, x in a[k].items()) for k in a)


NONFINITE_STEP, NONFINITE_STEPS = 2, 5


def run_nonfinite(stage, world, rank, precision, gas):
    """Step NONFINITE_STEP gets +Inf in ONE gradient element, on the last rank only (a local
    overflow). Every rank must skip the whole step: master weights, moments, projectors and
    step counts unchanged, the skip counted by the engine; later steps then match the
    single-process optimizer that never saw that step."""
    engine, ref = make_engine(stage, gas, world, bf16=precision == "bf16", fp16=precision == "fp16")
    poison = {"on": False}

    def add_inf(g):
        if not (poison["on"] and rank == world - 1):
            return g
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g

    dict(engine.module.named_parameters())["w2.weight"].register_hook(add_inf)
    ref_opt = ref_optimizer("GaLoreAdamW", groups(ref))
    mixed = precision != "fp32"
    errs, unchanged, skipped = [], None, None
    for step in range(NONFINITE_STEPS):
        before = (master_params(engine) if mixed else full_params(engine), optimizer_state(engine),
                  engine.skipped_steps)
        poison["on"] = step == NONFINITE_STEP
        ds_train_step(engine, step, gas, world, rank)
        poison["on"] = False
        after = master_params(engine) if mixed else full_params(engine)
        if step == NONFINITE_STEP:
            unchanged = {"weights": all(torch.equal(before[0][n], after[n]) for n in after),
                         "optimizer_state": states_equal(before[1], optimizer_state(engine))}
            skipped = engine.skipped_steps - before[2]
            continue
        ref_train_step(ref, ref_opt, step, gas, world, 0.0)
        errs.append(rel({n: t.float() for n, t in after.items()}, dict(ref.named_parameters())))
    return {"stage": stage, "world": world, "precision": precision, "gas": gas,
            "wrapper": type(engine.optimizer).__name__, "unchanged": unchanged,
            "skipped": skipped, "max_rel": max(errs),
            "galore_steps": sorted({int(st["step"]) for st in engine.basic_optimizer.state.values()
                                    if "step" in st})}


def split_row_flats(engine) -> int:
    """Flat tensors whose GaLore matrices have rows cut by rank boundaries (each costs one
    tiny all_reduce per step)."""
    opt = engine.basic_optimizer
    lays = getattr(opt, "_ds_layouts", None) or {}
    return sum(1 for lay in lays.values() if lay.n_split_rows)


def master_params(engine):
    """fp32 master weights (bf16 runs): the optimizer's own copies, gathered to full tensors."""
    from deepspeed.utils import safe_get_full_fp32_param
    if engine.zero_optimization_stage() == 0:  # FP16_UnfusedOptimizer: per-tensor fp32 copies
        master = {id(lp): hp for lg, hg in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
                  for lp, hp in zip(lg, hg)}
        return {n: master[id(p)].detach().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def run_case(stage, gas, world, rank, steps, clip=0.0, kind="odd", opt_name="GaLoreAdamW",
             bf16=False, sub_group_size=0, fp16=False):
    t0 = time.time()
    engine, ref = make_engine(stage, gas, world, opt=opt_name, clip=clip, kind=kind, bf16=bf16,
                              sub_group_size=sub_group_size, fp16=fp16)
    opt = engine.basic_optimizer
    assert isinstance(opt, DeepSpeedGaLoreMixin), type(opt)
    ref_opt = ref_optimizer(opt_name, groups(ref))
    errs, calls = [], []
    for step in range(steps):
        with count_collectives() as cnt:
            ds_train_step(engine, step, gas, world, rank)
        calls.append(cnt.total_calls())
        ref_train_step(ref, ref_opt, step, gas, world, clip)
        mine = master_params(engine) if bf16 or fp16 else full_params(engine)
        mine = {n: t.float() for n, t in mine.items()}
        errs.append(rel(mine, dict(ref.named_parameters())))
    final = torch.cat([mine[n].reshape(-1) for n in sorted(mine)]).tolist()
    # baseline: DeepSpeed's own AdamW at the same stage, collectives per step
    base, _ = make_engine(stage, gas, world, opt="AdamW", clip=clip, kind=kind, bf16=bf16,
                          sub_group_size=sub_group_size, fp16=fp16)
    base_calls = []
    for step in range(steps):
        with count_collectives() as cnt:
            ds_train_step(base, step, gas, world, rank)
        base_calls.append(cnt.total_calls())
    refresh_steps = [s for s in range(steps) if s % GAP == 0]
    extra = [calls[s] - base_calls[s] for s in range(steps) if s not in refresh_steps]
    return {
        "stage": stage, "gas": gas, "world": world, "clip": clip, "steps": steps, "model": kind,
        "optimizer": opt_name, "bf16": bf16, "fp16": fp16, "sub_group_size": sub_group_size,
        "skipped_steps": engine.skipped_steps,
        "flats": len(getattr(opt, "_ds_layouts", None) or {}), "wrapper": type(engine.optimizer).__name__,
        "max_rel": max(errs), "rel_per_step": errs,
        "refreshes": opt.galore_stats["refreshes"], "refresh_steps": refresh_steps,
        "calls": calls, "adamw_calls": base_calls, "extra_calls_between_refreshes": extra,
        "split_row_flats": split_row_flats(engine), "bound_stage": opt._ds_stage,
        "secs": time.time() - t0, "final": final,
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


CONVERT = [(1, 1), (2, 2), (3, 3), (1, 3)]  # (stage saved on world 2, stage loaded on world 3)
SAVE_STEPS, MORE_STEPS = 3, 2


def convert_save(stage, world, rank, directory):
    """World-size conversion, part 1: train SAVE_STEPS steps, write the GaLore state pieces
    (one file per rank) and the full weights."""
    engine, _ = make_engine(stage, 1, world)
    for step in range(SAVE_STEPS):
        ds_train_step(engine, step, 1, world, rank)
    engine.basic_optimizer.save_state_pieces(directory)
    params = full_params(engine)
    if rank == 0:
        torch.save({"world": world, "params": params}, os.path.join(directory, "params.pt"))
    dist.barrier()


def convert_load(stage, world, rank, directory):
    """Part 2, on another world size: resume from the pieces, train MORE_STEPS steps; the
    reference replays all steps single-process with each phase's global batch."""
    saved = torch.load(os.path.join(directory, "params.pt"), weights_only=True)
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    model.load_state_dict(saved["params"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups(model),
                                           config=ds_config(stage, 1, world))
    engine.basic_optimizer.load_state_pieces(directory)
    ref_opt = ref_optimizer("GaLoreAdamW", groups(ref))
    for step in range(SAVE_STEPS):
        ref_train_step(ref, ref_opt, step, 1, saved["world"], 0.0)
    errs = []
    for step in range(SAVE_STEPS, SAVE_STEPS + MORE_STEPS):
        ds_train_step(engine, step, 1, world, rank)
        ref_train_step(ref, ref_opt, step, 1, world, 0.0)
        errs.append(rel(full_params(engine), dict(ref.named_parameters())))
    return {"from_world": saved["world"], "world": world, "stage": stage, "max_rel": max(errs),
            "rel_per_step": errs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--gas", default="1,4")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--convert-save", default=None, help="directory: write world-size-free state")
    ap.add_argument("--convert-load", default=None, help="directory written by --convert-save")
    ap.add_argument("--even", action="store_true", help="also the no-split-row model, gas 1")
    ap.add_argument("--variants", action="store_true",
                    help="also GaLoreAdamW8bit and GaLoreAdafactor at ZeRO-0, gas 1")
    ap.add_argument("--subgroups", action="store_true", help="also ZeRO-3 with sub_group_size=200")
    ap.add_argument("--bf16", action="store_true", help="also bf16 at every stage, gas 1")
    ap.add_argument("--fp16", action="store_true", help="also fp16 (loss scaling) at ZeRO 1-3, gas 1")
    ap.add_argument("--clip", type=float, default=0.0, help="one extra case per stage with clipping")
    ap.add_argument("--nonfinite", action="store_true",
                    help="an Inf gradient on one rank, fp32/bf16/fp16 at every stage: skipped whole")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    # mpirun: DeepSpeed's MPI discovery sets MASTER_PORT from distributed_port (default 29500)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False,
                               distributed_port=int(os.environ.get("GALORE_DS_PORT", "29500")))
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
    cases = [(stage, kw) for kw in extra for stage in [int(s) for s in args.stages.split(",")]]
    if args.bf16:
        cases += [(stage, dict(bf16=True)) for stage in [int(s) for s in args.stages.split(",")]]
    if args.fp16:
        allow_cpu_fp16()
        # not ZeRO-0: DeepSpeed 0.19.8 never scales its loss there (PR #8393; the recipe refuses it)
        cases += [(stage, dict(fp16=True)) for stage in [int(s) for s in args.stages.split(",")] if stage]
    if args.subgroups:  # ZeRO-3 with several sub-groups per param group (step() once per sub-group)
        cases += [(3, dict(sub_group_size=200))]
    if args.variants:
        cases += [(0, dict(opt_name="GaLoreAdamW8bit")), (0, dict(opt_name="GaLoreAdafactor"))]
    for stage, kw in cases:
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
    results["nonfinite"] = []
    if args.nonfinite:
        allow_cpu_fp16()
        for precision in ("fp32", "bf16", "fp16"):
            for stage in [int(s) for s in args.stages.split(",")]:
                for gas in ((1, 4) if precision == "fp32" else (1,)):
                    try:
                        results["nonfinite"].append(run_nonfinite(stage, world, rank, precision, gas))
                    except Exception:
                        results["errors"].append({"nonfinite": [precision, stage, gas], "rank": rank,
                                                  "trace": traceback.format_exc()})
    results["convert"] = []
    for k, (s_save, s_load) in enumerate(CONVERT):
        try:
            if args.convert_save:
                convert_save(s_save, world, rank, os.path.join(args.convert_save, f"c{k}"))
            if args.convert_load:
                r = convert_load(s_load, world, rank, os.path.join(args.convert_load, f"c{k}"))
                results["convert"].append(dict(r, saved_stage=s_save))
        except Exception:
            results["errors"].append({"convert": k, "rank": rank, "trace": traceback.format_exc()})
            print(f"rank {rank} convert {k}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "per_rank": gathered}, f, indent=1)
    dist.barrier()
    exit_worker()


if __name__ == "__main__":
    main()
