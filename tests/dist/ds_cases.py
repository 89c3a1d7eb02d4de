"""The public optimizers inside deepspeed.initialize, against one process.

Run by tests/test_deepspeed.py:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/dist/ds_cases.py --out /tmp/r.json
    DS_ACCELERATOR=cpu mpirun -n 2 .venv/bin/python tests/dist/ds_cases.py --out /tmp/r.json --only ...
Every case builds the same model on every rank, hands DeepSpeed a GaLore optimizer (a client
instance, or the JSON type after galore_ds.integrations.deepspeed.register()) and trains on
the rank's slice of a global batch; an unsharded copy trains with the same class on the whole
batch inside the same rank. Pairwise cases cover ZeRO stage x client/JSON x optimizer x
proj_type x group layout x accumulation x clipping (DeepSpeed's gradient_clipping, the
optimizer's max_grad_norm exact and delayed, torch.nn.utils.clip_grad_norm_ on engine.module's
parameters between engine.backward and engine.step). Matrices have odd shapes, so partition
boundaries cut them (rows split across ranks).

Checkpoints (engine.save_checkpoint / load_checkpoint): pairwise over stage x optimizer (AdamW,
8-bit, Adafactor manual lr and its relative-step defaults) x clipping (none, DeepSpeed's, the
optimizer's exact and delayed) x precision, bit-identical on the same world size; the formats
that cannot hold GaLore state (elastic_checkpoint, universal) refused at initialize in one line.
Another world size: the 2-rank launch saves into --ckpt, the 3-rank launch loads it (ZeRO-0
continues as one process would; ZeRO 1-3: DeepSpeed refuses).
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pairwise  # noqa: E402
from harness import (  # noqa: E402
    EIGHT_BIT_TOL, GROUP_SETTINGS, OPTIMIZERS, RANK, TOL, check, data, groups_of, loss_fn, make_model, make_optimizer,
    run_worker,
)

import deepspeed  # noqa: E402

import galore_ds  # noqa: E402
import galore_ds.integrations.deepspeed as gds  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402

STEPS, GAP, MB = 7, 2, 2   # refreshes at steps 0, 2, 4, 6; micro-batch rows per rank
CLIP = 0.05
BF16_TOL = 2e-2            # bf16 forward/backward against the fp32 reference (7 steps)
FP16_TOL = 5e-3            # fp16 (10 mantissa bits), same reference
JSON_NAMES = {"adamw": "GaLoreAdamW", "adamw8bit": "GaLoreAdamW8bit", "adafactor": "GaLoreAdafactor",
              "adafactor_rs": "GaLoreAdafactor", "fira": "FiraAdamW", "apollo": "ApolloAdamW",
              "apollo_mini": "ApolloAdamW"}
# the shared optimizers, plus GaLoreAdafactor as constructed with no lr: relative_step defaults
DS_OPTIMIZERS = {**OPTIMIZERS, "adafactor_rs": (galore_ds.GaLoreAdafactor, dict(weight_decay=0.01))}
# clip settings: "none"; "deepspeed": gradient_clipping in the config; "ours"/"ours_delayed": the
# optimizer's max_grad_norm with clip_timing exact/delayed; "torch": torch.nn.utils.clip_grad_norm_
# on engine.module's parameters at the accumulation boundary. The reference clips with
# clip_grad_norm_ for "deepspeed" and "torch", and with the same optimizer settings otherwise.
OPTIMIZER_CLIPS = {"ours": "exact", "ours_delayed": "delayed"}


def init() -> None:
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=True, verbose=False,
                               distributed_port=int(os.environ.get("GALORE_DS_PORT", "29500")))
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed refuses fp16 on a CPU without mkldnn fp16 kernels; torch's CPU fp16
    # arithmetic is all a tiny model needs, and the loss-scaling code under test is the same.
    get_accelerator().is_fp16_supported = lambda: True


def ds_config(stage: int, gas: int, world: int, *, clip: float = 0.0, precision: str = "fp32",
              sub_group_size: int = 0, zero_extra: dict | None = None, extra: dict | None = None) -> dict:
    zero = {"stage": stage, **({"sub_group_size": sub_group_size} if sub_group_size else {}), **(zero_extra or {})}
    return {**(extra or {}),
        "train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": gas,
        "train_batch_size": MB * gas * world, "gradient_clipping": clip, "zero_optimization": zero,
        "steps_per_print": 10**9,
        **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
        # ZeRO-1 + bf16 + fp32 grad accumulation is DeepSpeed's BF16_Optimizer (flat partitions)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" and stage == 1 else {}),
        # dynamic loss scaling from 2**8 (a tiny model never overflows on its own)
        **({"fp16": {"enabled": True, "initial_scale_power": 8}} if precision == "fp16" else {}),
    }


def build_optimizer(name: str, model, groups: str = "named", *, max_grad_norm: float | None = None,
                    clip_timing: str = "exact", **galore):
    """harness.make_optimizer, with clip_timing and the relative-step Adafactor."""
    if name in OPTIMIZERS and clip_timing == "exact":
        return make_optimizer(name, model, groups, max_grad_norm=max_grad_norm, **galore)
    cls, kw = DS_OPTIMIZERS[name]
    clip = dict(max_grad_norm=max_grad_norm, clip_timing=clip_timing)
    galore = {"rank": RANK, **GROUP_SETTINGS.get(name, {}), **galore}
    if groups == "flat":
        return cls(groups_of(model, groups), **galore, **kw, **clip)
    return cls(groups_of(model, groups, **galore), **kw, **clip)


def make_engine(world: int, *, stage: int, path: str = "client", opt: str = "adamw", groups: str = "named",
                proj: str = "std", gas: int = 1, clip: str = "none", precision: str = "fp32",
                sub_group_size: int = 0, zero_extra: dict | None = None, extra: dict | None = None, **galore):
    """(engine, reference model, reference optimizer)."""
    ref = make_model()
    model = copy.deepcopy(ref)
    ours = CLIP if clip in OPTIMIZER_CLIPS else None
    timing = OPTIMIZER_CLIPS.get(clip, "exact")
    cfg = ds_config(stage, gas, world, clip=CLIP if clip == "deepspeed" else 0.0, precision=precision,
                    sub_group_size=sub_group_size, zero_extra=zero_extra, extra=extra)
    kw = dict(update_proj_gap=GAP, proj_type=proj, max_grad_norm=ours, clip_timing=timing, **galore)
    if path == "client":
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(opt, model, groups, **kw),
                                          config=cfg)
    else:
        cls, params = DS_OPTIMIZERS[opt]
        params = {**params, "update_proj_gap": GAP, "proj_type": proj, **galore,
                  **({"max_grad_norm": ours} if ours else {})}
        rank = GROUP_SETTINGS.get(opt, {}).get("rank", RANK)
        if groups == "flat":
            params["rank"] = rank
            model_parameters = list(model.parameters())
        else:
            model_parameters = groups_of(model, groups, rank=rank, **{k: v for k, v in params.items()
                                                                     if k in ("update_proj_gap", "proj_type")})
        cfg["optimizer"] = {"type": JSON_NAMES[opt], "params": params}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model_parameters, config=cfg)
    reference = build_optimizer(opt, ref, groups, **kw)
    return engine, ref, reference


def ds_step(engine, step: int, gas: int, world: int, rank: int, clip: str = "none") -> list[float]:
    """One optimizer step of DeepSpeed's loop; with clip="torch" the user's
    torch.nn.utils.clip_grad_norm_(engine.module.parameters(), CLIP) at the boundary, whose
    returned norms are returned."""
    dtype = next(engine.module.parameters()).dtype
    norms = []
    for micro in range(gas):
        x, y = data(step, micro, MB * world)
        xs, ys = x[rank * MB:(rank + 1) * MB], y[rank * MB:(rank + 1) * MB]
        engine.backward(((engine(xs.to(dtype)).float() - ys) ** 2).mean())
        if clip == "torch" and engine.is_gradient_accumulation_boundary():
            norms.append(float(torch.nn.utils.clip_grad_norm_(engine.module.parameters(), CLIP)))
        engine.step()
    return norms


def ref_step(model, opt, step: int, gas: int, world: int, clip: str) -> None:
    opt.zero_grad(set_to_none=True)
    for micro in range(gas):
        x, y = data(step, micro, MB * world)
        (loss_fn(model, x, y) / gas).backward()
    if clip in ("deepspeed", "torch"):
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
        ds_step(engine, s, gas, world, rank, clip)
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
               gas=[1, 2], clip=["none", "deepspeed", "ours", "ours_delayed", "torch"])


def valid(c: dict) -> bool:
    """DeepSpeed refuses "max_grad_norm" in a JSON optimizer's params (it means its own
    gradient_clipping): the optimizer's own clipping is for client instances. torch's
    clip_grad_norm_ on engine.module's parameters clips only at ZeRO-0: at ZeRO 1-3 DeepSpeed
    holds the reduced gradients in its partitions and p.grad is None (the
    torch_clip_grad_norm_sees_no_gradients_* cases pin that down)."""
    return not ((c["path"] == "json" and c["clip"] in OPTIMIZER_CLIPS) or (c["clip"] == "torch" and c["stage"]))


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


# ------------------------------------------------------------------ torch's clip_grad_norm_ at ZeRO 1-3
def torch_clip_sees_no_gradients(world: int, *, stage: int) -> dict:
    """The loop users write for torch (engine.backward; torch.nn.utils.clip_grad_norm_(
    engine.module.parameters(), c); engine.step()) at ZeRO 1-3: DeepSpeed has moved the reduced
    gradients into its partitions and set every p.grad to None, so torch's call sees no
    gradient, returns 0 and clips nothing (DeepSpeed's behaviour for any optimizer: nothing in
    galore_ds sees the call). The run is the unclipped one; the idioms that clip are
    "gradient_clipping" in the config and the optimizer's max_grad_norm (the pairwise cases)."""
    rank = dist.get_rank()
    engine, ref, reference = make_engine(world, stage=stage)
    for s in range(2):
        norms = ds_step(engine, s, 1, world, rank, "torch")
        assert norms == [0.0], norms
        ref_step(ref, reference, s, 1, world, "none")
    diff = rel(full_params(engine), ref)
    check(diff, TOL)
    return {"rel_diff_to_unclipped": diff}


# ------------------------------------------------------------------ checkpoints
def _shared_tmp(prefix: str) -> str:
    box = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box)
    return box[0]


def checkpoint_round_trip(world: int, *, stage: int, opt: str = "adamw", clip: str = "none",
                          precision: str = "fp32", **ds) -> dict:
    """save at step 3, continue 2 steps (across the refresh at step 4); a fresh engine loads and
    takes the same 2 steps: bit-identical weights (the GaLore state is keyed by strings
    DeepSpeed round-trips), and delayed clipping's carried coefficient comes back as saved."""
    rank = dist.get_rank()
    case = dict(stage=stage, opt=opt, clip=clip, precision=precision, **ds)
    engine, _, _ = make_engine(world, **case)
    tmp = _shared_tmp("ds_ckpt_")
    for s in range(3):
        ds_step(engine, s, 1, world, rank)
    engine.save_checkpoint(tmp, tag="t")
    coef = engine.basic_optimizer.next_clip_coef
    if clip == "ours_delayed":
        assert coef < 1.0, f"step 2 did not clip ({coef}): the carried coefficient is not exercised"
    for s in range(3, 5):
        ds_step(engine, s, 1, world, rank)
    a = full_params(engine)
    engine2, _, _ = make_engine(world, **case)
    engine2.load_checkpoint(tmp, tag="t")
    assert engine2.basic_optimizer.next_clip_coef == coef, (engine2.basic_optimizer.next_clip_coef, coef)
    for s in range(3, 5):
        ds_step(engine2, s, 1, world, rank)
    b = full_params(engine2)
    diff = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert diff == 0.0, diff
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"max_abs_diff": diff, "wrapper": type(engine.optimizer).__name__, "carried_coef": coef}


def refused_or_bit_identical(world: int, **case) -> dict:
    """A user's DeepSpeed config with a checkpoint format as the issue wrote it: either the
    save/load round trip is bit-identical, or deepspeed.initialize refuses it in one line that
    names the key."""
    try:
        return checkpoint_round_trip(world, **case)
    except gds.CheckpointFormatError as e:
        assert "\n" not in str(e), str(e)
        return {"refused": str(e)}


def recipe_refuses(world: int, section: str) -> dict:
    """launch/train.py's DeepSpeed engine given such a format in engine.deepspeed: a recipe
    error (exit 2, one line) naming the section, before anything trains or is written."""
    from galore_ds.train.config import ConfigError, dist_env, load_config
    from galore_ds.train.engines.deepspeed import DeepSpeedEngine

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    cfg = load_config(os.path.join(root, "configs", "tiny.json"),
                      ["engine.mode=deepspeed", f"engine.deepspeed={section}", "galore.rank=2",
                       "training.micro_batch=1", f"training.global_batch={world}"])
    engine = DeepSpeedEngine(cfg, dist_env())
    try:
        engine.setup(make_model())
    except ConfigError as e:
        assert str(e).startswith("engine.deepspeed: ") and "\n" not in str(e), str(e)
        return {"refused": str(e)}
    raise AssertionError(f"engine.deepspeed={section} was accepted")


CKPT_FACTORS = dict(stage=[0, 1, 2, 3], opt=list(DS_OPTIMIZERS), clip=["none", "deepspeed", "ours", "ours_delayed"],
                    precision=["fp32", "bf16"])
CKPT_PAIRWISE = pairwise.cases(CKPT_FACTORS)


def ckpt_case_name(c: dict) -> str:
    return f"checkpoint_zero{c['stage']}_{c['opt']}_clip_{c['clip']}_{c['precision']}"


# ------------------------------------------------------------------ another world size
XWS_STEPS = 3   # the 2-rank launch saves after 3 steps; the 3-rank launch takes 2 more


def other_world_size(world: int, *, stage: int) -> dict:
    """engine.save_checkpoint on 2 ranks, engine.load_checkpoint on 3 (the directory comes with
    --ckpt; the 2-rank launch runs first). ZeRO-0 keeps whole tensors and the GaLore state of
    the whole model on every rank: the 3-rank run continues as one process fed the same global
    batches (2 x MB rows, then 3 x MB). ZeRO 1-3: DeepSpeed 0.19.8 refuses a new data-parallel
    world size for partitioned optimizer state (its ZeRORuntimeException; at ZeRO-3 a rank that
    had no file fails on DeepSpeed's bare assert first); galore_ds's path there is
    optim.checkpoint.save_pieces/load_pieces (launch/train.py: tests/test_resume.py)."""
    rank, root = dist.get_rank(), os.environ.get("GALORE_TEST_CKPT")
    if world not in (2, 3) or not root:
        return {"skipped": "runs as a 2-rank save and a 3-rank load with --ckpt"}
    path = os.path.join(root, f"xws_zero{stage}")
    engine, ref, reference = make_engine(world, stage=stage, clip="ours_delayed")
    if world == 2:
        for s in range(XWS_STEPS):
            ds_step(engine, s, 1, world, rank)
        engine.save_checkpoint(path, tag="t")
        return {"saved": path}
    if stage:
        try:
            engine.load_checkpoint(path, tag="t")
        except Exception as e:  # noqa: BLE001 - DeepSpeed's exception types are the point
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if type(e).__name__ == "ZeRORuntimeException":
                assert "world size of 2 but the current world size is 3" in first, first
            else:  # ZeRO-3, the rank with no saved file: DeepSpeed's bare assert
                assert stage == 3 and isinstance(e, AssertionError), repr(e)
            return {"refused_by_deepspeed": f"{type(e).__name__}: {first}"}
        raise AssertionError("DeepSpeed loaded partitioned optimizer state on another world size")
    engine.load_checkpoint(path, tag="t")
    for s in range(XWS_STEPS):
        ref_step(ref, reference, s, 1, 2, "none")
    for s in range(XWS_STEPS, XWS_STEPS + 2):
        ds_step(engine, s, 1, world, rank)
        ref_step(ref, reference, s, 1, world, "none")
    diff = rel(full_params(engine), ref)
    check(diff, TOL)
    return {"rel_diff": diff}


def other_world_size_pieces(world: int, *, stage: int) -> dict:
    """galore_ds's path to another world size at ZeRO 1-3 in a user's own loop (docs/engines.md):
    save_pieces on 2 ranks, load_pieces on 3 after deepspeed.initialize, the full weights copied
    into DeepSpeed's 16-bit parameters. With delayed clipping the carried coefficient travels
    too (it was lost: 1.0 after load_pieces), so the 3-rank run continues as one process would."""
    from galore_ds.optim.checkpoint import load_pieces, save_pieces

    rank, root = dist.get_rank(), os.environ.get("GALORE_TEST_CKPT")
    if world not in (2, 3) or not root:
        return {"skipped": "runs as a 2-rank save and a 3-rank load with --ckpt"}
    path = os.path.join(root, f"pieces_zero{stage}")
    engine, ref, reference = make_engine(world, stage=stage, clip="ours_delayed")
    opt = engine.basic_optimizer
    if world == 2:
        for s in range(XWS_STEPS):
            ds_step(engine, s, 1, world, rank)
        save_pieces(opt, path, rank)
        return {"saved_coef": opt.next_clip_coef}
    full = load_pieces(opt, path)
    loaded = opt.next_clip_coef
    for ft in opt.zero.flats.values():
        for seg in ft.segments:   # ZeRO-1/2 keep whole 16-bit parameters on every rank
            if seg.param is not None and seg.param.numel() == full[seg.key].numel():
                seg.param.data.copy_(full[seg.key].view_as(seg.param).to(seg.param.dtype))
        ft.copy_back()
    for s in range(XWS_STEPS):
        ref_step(ref, reference, s, 1, 2, "none")
    assert opt.next_clip_coef == reference.next_clip_coef, (opt.next_clip_coef, reference.next_clip_coef)
    for s in range(XWS_STEPS, XWS_STEPS + 2):
        ds_step(engine, s, 1, world, rank)
        ref_step(ref, reference, s, 1, world, "none")
    diff = rel(full_params(engine), ref)
    check(diff, TOL)
    return {"rel_diff": diff, "loaded_coef": loaded}


CASES: dict = {f"pairwise_{case_name(c)}": (lambda w, c=c: train(w, **c)) for c in PAIRWISE}
for _stage in range(4):
    CASES[f"bf16_zero{_stage}"] = lambda w, s=_stage: train(w, stage=s, precision="bf16", clip="ours")
    CASES[f"inf_on_one_rank_fp32_zero{_stage}_gas2"] = lambda w, s=_stage: nonfinite(w, stage=s, gas=2)
    CASES[f"inf_on_one_rank_bf16_zero{_stage}"] = lambda w, s=_stage: nonfinite(w, stage=s, precision="bf16")
    CASES[f"other_world_size_zero{_stage}"] = lambda w, s=_stage: other_world_size(w, stage=s)
CASES["other_world_size_save_pieces_zero2"] = lambda w: other_world_size_pieces(w, stage=2)
for _stage in (1, 2, 3):
    CASES[f"fp16_loss_scaling_zero{_stage}"] = lambda w, s=_stage: train(w, stage=s, precision="fp16")
    CASES[f"inf_on_one_rank_fp16_zero{_stage}"] = lambda w, s=_stage: nonfinite(w, stage=s, precision="fp16")
    CASES[f"torch_clip_grad_norm_sees_no_gradients_zero{_stage}"] = (
        lambda w, s=_stage: torch_clip_sees_no_gradients(w, stage=s))
CASES["zero3_many_sub_groups_clip_ours"] = lambda w: train(w, stage=3, sub_group_size=40, clip="ours", gas=2)
CASES["zero3_many_sub_groups_adafactor_left"] = lambda w: train(w, stage=3, sub_group_size=40, opt="adafactor",
                                                              proj="left")
for _c in CKPT_PAIRWISE:
    CASES[ckpt_case_name(_c)] = lambda w, c=_c: checkpoint_round_trip(w, **c)
# issue 21, finding 6: the user's ZeRO-2 config with "elastic_checkpoint": true (refused at
# initialize); ZeRO-1 in bf16 with fp32 accumulation (BF16_Optimizer) has no elastic format
CASES["elastic_checkpoint_zero2"] = lambda w: refused_or_bit_identical(
    w, stage=2, zero_extra={"elastic_checkpoint": True})
CASES["elastic_checkpoint_zero1_delayed_clip"] = lambda w: refused_or_bit_identical(
    w, stage=1, clip="ours_delayed", zero_extra={"elastic_checkpoint": True})
CASES["elastic_checkpoint_zero1_bf16_optimizer"] = lambda w: refused_or_bit_identical(
    w, stage=1, precision="bf16", zero_extra={"elastic_checkpoint": True})
CASES["universal_checkpoint_zero2"] = lambda w: refused_or_bit_identical(
    w, stage=2, extra={"checkpoint": {"load_universal": True}})
CASES["recipe_elastic_checkpoint_zero2"] = lambda w: recipe_refuses(
    w, '{"zero_optimization": {"stage": 2, "elastic_checkpoint": true}}')


if __name__ == "__main__":
    run_worker(CASES, init=init)
