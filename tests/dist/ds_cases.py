"""The public optimizers inside deepspeed.initialize, against one process.

Run by tests/test_deepspeed.py:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/ds_cases.py --out /tmp/r.json
    DS_ACCELERATOR=cpu mpirun -n 2 .venv/bin/python tests/dist/ds_cases.py --out /tmp/r.json --only ...
Every case builds the same model on every rank, hands DeepSpeed a GaLore optimizer (a client
instance, or the JSON type after galore_ds.integrations.deepspeed.register()) and trains on
the rank's slice of a global batch; an unsharded copy trains with the same class on the whole
batch inside the same rank. Pairwise cases cover ZeRO stage x client/JSON x optimizer x
proj_type x group layout x accumulation x clipping (DeepSpeed's, or the optimizer's own).
Matrices have odd shapes, so partition boundaries cut them (rows split across ranks).
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pairwise  # noqa: E402
from harness import (  # noqa: E402
    EIGHT_BIT_TOL, OPTIMIZERS, RANK, TOL, check, data, loss_fn, make_model, make_optimizer, run_worker,
)

import deepspeed  # noqa: E402

import galore_ds.integrations.deepspeed as gds  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402

STEPS, GAP, MB = 7, 2, 2   # refreshes at steps 0, 2, 4, 6; micro-batch rows per rank
CLIP = 0.05
BF16_TOL = 2e-2            # bf16 forward/backward against the fp32 reference (7 steps)
FP16_TOL = 5e-3            # fp16 (10 mantissa bits), same reference
JSON_NAMES = {"adamw": "GaLoreAdamW", "adamw8bit": "GaLoreAdamW8bit", "adafactor": "GaLoreAdafactor"}


def init() -> None:
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False,
                               distributed_port=int(os.environ.get("GALORE_DS_PORT", "29500")))
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed refuses fp16 on a CPU without mkldnn fp16 kernels; torch's CPU fp16
    # arithmetic is all a tiny model needs, and the loss-scaling code under test is the same.
    get_accelerator().is_fp16_supported = lambda: True


def ds_config(stage: int, gas: int, world: int, *, clip: float = 0.0, precision: str = "fp32",
              sub_group_size: int = 0) -> dict:
    zero = {"stage": stage, **({"sub_group_size": sub_group_size} if sub_group_size else {})}
    return {
        "train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": gas,
        "train_batch_size": MB * gas * world, "gradient_clipping": clip, "zero_optimization": zero,
        "steps_per_print": 10**9,
        **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
        # ZeRO-1 + bf16 + fp32 grad accumulation is DeepSpeed's BF16_Optimizer (flat partitions)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" and stage == 1 else {}),
        # dynamic loss scaling from 2**8 (a tiny model never overflows on its own)
        **({"fp16": {"enabled": True, "initial_scale_power": 8}} if precision == "fp16" else {}),
    }


def make_engine(world: int, *, stage: int, path: str = "client", opt: str = "adamw", groups: str = "named",
                proj: str = "std", gas: int = 1, clip: str = "none", precision: str = "fp32",
                sub_group_size: int = 0, **galore):
    """(engine, reference model, reference optimizer)."""
    ref = make_model()
    model = copy.deepcopy(ref)
    ours = CLIP if clip == "ours" else None
    cfg = ds_config(stage, gas, world, clip=CLIP if clip == "deepspeed" else 0.0, precision=precision,
                    sub_group_size=sub_group_size)
    kw = dict(update_proj_gap=GAP, proj_type=proj, max_grad_norm=ours, **galore)
    if path == "client":
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(opt, model, groups, **kw),
                                          config=cfg)
    else:
        cls, params = OPTIMIZERS[opt]
        params = {**params, "update_proj_gap": GAP, "proj_type": proj, **galore,
                  **({"max_grad_norm": ours} if ours else {})}
        if groups == "flat":
            params["rank"] = RANK
            model_parameters = list(model.parameters())
        else:
            from harness import groups_of
            model_parameters = groups_of(model, groups, **{k: v for k, v in params.items()
                                                          if k in ("update_proj_gap", "proj_type")})
        cfg["optimizer"] = {"type": JSON_NAMES[opt], "params": params}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model_parameters, config=cfg)
    reference = make_optimizer(opt, ref, groups, **kw)
    return engine, ref, reference


def ds_step(engine, step: int, gas: int, world: int, rank: int) -> None:
    dtype = next(engine.module.parameters()).dtype
    for micro in range(gas):
        x, y = data(step, micro, MB * world)
        xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
        engine.backward(((engine(xs.to(dtype)).float() - ys) ** 2).mean())
        engine.step()


def ref_step(model, opt, step: int, gas: int, world: int, clip: str) -> None:
    opt.zero_grad(set_to_none=True)
    for micro in range(gas):
        x, y = data(step, micro, MB * world)
        (loss_fn(model, x, y) / gas).backward()
    if clip == "deepspeed":
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()


def full_params(engine) -> dict[str, torch.Tensor]:
    """name -> full fp32 weights: the optimizer's fp32 masters (mixed precision), the module's
    parameters (fp32; ZeRO-3 gathered)."""
    from deepspeed.utils import safe_get_full_fp32_param

    named = list(engine.module.named_parameters())
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        if engine.zero_optimization_stage() == 0:  # FP16_UnfusedOptimizer: per-tensor copies
            master = {id(lp): hp for lg, hg in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
                      for lp, hp in zip(lg, hg)}
            return {n: master[id(p)].detach().float().clone() for n, p in named}
        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in named}
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: p.detach().clone() for n, p in named}


def rel(a: dict, ref) -> float:
    return max(float((a[n] - q.detach()).norm() / q.detach().norm().clamp_min(1e-30))
               for n, q in ref.named_parameters())


def train(world: int, steps: int = STEPS, **case) -> dict:
    rank = dist.get_rank()
    engine, ref, reference = make_engine(world, **case)
    opt = engine.basic_optimizer
    gas, clip = case.get("gas", 1), case.get("clip", "none")
    between = []
    for s in range(steps):
        COMM.reset()
        ds_step(engine, s, gas, world, rank)
        if s % GAP:
            between.append(dict(COMM.calls))
        ref_step(ref, reference, s, gas, world, clip)
    diff = rel(full_params(engine), ref)
    opt_name = case.get("opt", "adamw")
    tol = {"bf16": BF16_TOL, "fp16": FP16_TOL}.get(case.get("precision", "fp32"),
                                                   EIGHT_BIT_TOL if opt_name == "adamw8bit" else TOL)
    check(diff, tol)
    assert opt.zero is not None or case["stage"] == 0, "the ZeRO layout was not bound"
    assert engine.skipped_steps == 0
    return {"rel_diff": diff, "wrapper": type(engine.optimizer).__name__, "between_refreshes": between,
            "flats": len(opt.zero.flats) if opt.zero is not None else 0,
            "split_row_matrices": sum(1 for f in (opt.zero.flats.values() if opt.zero else [])
                                      for seg in f.segments if seg.layout is not None and seg.layout.split_rows)}


FACTORS = dict(stage=[0, 1, 2, 3], path=["client", "json"], opt=list(OPTIMIZERS),
               proj=["std", "left", "right", "reverse_std"], groups=["named", "plain_first", "flat"],
               gas=[1, 2], clip=["none", "deepspeed", "ours"])


def valid(c: dict) -> bool:
    """DeepSpeed refuses "max_grad_norm" in a JSON optimizer's params (it means its own
    gradient_clipping): the optimizer's own clipping is for client instances."""
    return not (c["path"] == "json" and c["clip"] == "ours")


PAIRWISE = pairwise.cases(FACTORS, valid)


def case_name(c: dict) -> str:
    return f"zero{c['stage']}_{c['path']}_{c['opt']}_{c['proj']}_{c['groups']}_gas{c['gas']}_clip_{c['clip']}"


# ------------------------------------------------------------------ NaN/Inf on one rank
def nonfinite(world: int, *, stage: int, precision: str = "fp32", gas: int = 1) -> dict:
    """Step 2 (a refresh step) gets +Inf in ONE gradient element on the last rank only. Every
    rank skips the step: master weights, moments, projectors and step counts unchanged, the
    skip counted by the engine; later steps equal the one-process optimizer that skipped it
    too. fp32 ZeRO-0 is the optimizer's own check (no DeepSpeed wrapper); the rest DeepSpeed's."""
    rank, bad = dist.get_rank(), 2
    engine, ref, reference = make_engine(world, stage=stage, precision=precision, gas=gas)
    poison = {"on": False}

    def add_inf(g):
        if poison["on"] and rank == world - 1:
            g = g.clone()
            g.view(-1)[0] = float("inf")
        return g

    dict(engine.module.named_parameters())["mlp_up.weight"].register_hook(add_inf)
    opt = engine.basic_optimizer
    for s in range(5):
        before = (full_params(engine), _state(opt), engine.skipped_steps)
        poison["on"] = s == bad
        ds_step(engine, s, gas, world, rank)
        poison["on"] = False
        if s == bad:
            assert all(torch.equal(before[0][n], t) for n, t in full_params(engine).items()), "weights changed"
            assert _states_equal(before[1], _state(opt)), "optimizer state changed"
            assert engine.skipped_steps == before[2] + 1, "the skip was not counted"
            continue
        ref_step(ref, reference, s, gas, world, "none")
    diff = rel(full_params(engine), ref)
    check(diff, {"bf16": BF16_TOL, "fp16": FP16_TOL}.get(precision, TOL))
    return {"rel_diff": diff, "wrapper": type(engine.optimizer).__name__}


def _state(opt) -> dict:
    return {str(k): {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
            for k, v in opt.state.items()}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(x, b[k][kk]) if torch.is_tensor(x) else x == b[k][kk]
                                           for kk, x in a[k].items()) for k in a)


# ------------------------------------------------------------------ checkpoints
def checkpoint_round_trip(world: int, *, stage: int, opt: str = "adamw") -> dict:
    """save at step 3, continue 2 steps; a fresh engine loads and takes the same 2 steps:
    bit-identical (the GaLore state is keyed by strings DeepSpeed round-trips)."""
    rank = dist.get_rank()
    tmp = tempfile.mkdtemp(prefix="ds_ckpt_") if rank == 0 else None
    box = [tmp]
    dist.broadcast_object_list(box)
    tmp = box[0]
    engine, _, _ = make_engine(world, stage=stage, opt=opt)
    for s in range(3):
        ds_step(engine, s, 1, world, rank)
    engine.save_checkpoint(tmp, tag="t")
    for s in range(3, 5):
        ds_step(engine, s, 1, world, rank)
    a = full_params(engine)
    engine2, _, _ = make_engine(world, stage=stage, opt=opt)
    engine2.load_checkpoint(tmp, tag="t")
    for s in range(3, 5):
        ds_step(engine2, s, 1, world, rank)
    b = full_params(engine2)
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert diff == 0.0, diff
    return {"max_abs_diff": diff}


CASES: dict = {f"pairwise_{case_name(c)}": (lambda w, c=c: train(w, **c)) for c in PAIRWISE}
for _stage in range(4):
    CASES[f"bf16_zero{_stage}"] = lambda w, s=_stage: train(w, stage=s, precision="bf16", clip="ours")
    CASES[f"inf_on_one_rank_fp32_zero{_stage}_gas2"] = lambda w, s=_stage: nonfinite(w, stage=s, gas=2)
    CASES[f"inf_on_one_rank_bf16_zero{_stage}"] = lambda w, s=_stage: nonfinite(w, stage=s, precision="bf16")
    CASES[f"checkpoint_round_trip_zero{_stage}"] = lambda w, s=_stage: checkpoint_round_trip(w, stage=s)
for _stage in (1, 2, 3):
    CASES[f"fp16_loss_scaling_zero{_stage}"] = lambda w, s=_stage: train(w, stage=s, precision="fp16")
    CASES[f"inf_on_one_rank_fp16_zero{_stage}"] = lambda w, s=_stage: nonfinite(w, stage=s, precision="fp16")
CASES["zero3_many_sub_groups_clip_ours"] = lambda w: train(w, stage=3, sub_group_size=40, clip="ours", gas=2)
CASES["zero3_many_sub_groups_adafactor_left"] = lambda w: train(w, stage=3, sub_group_size=40, opt="adafactor",
                                                              proj="left")
CASES["checkpoint_round_trip_zero2_adamw8bit"] = lambda w: checkpoint_round_trip(w, stage=2, opt="adamw8bit")
CASES["checkpoint_round_trip_zero3_adafactor"] = lambda w: checkpoint_round_trip(w, stage=3, opt="adafactor")


if __name__ == "__main__":
    run_worker(CASES, init=init)
