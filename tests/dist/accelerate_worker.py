"""Accelerate as users call it, on 2 CPU ranks under torchrun: the GaLore optimizer is built on
the plain model, then `accelerator.prepare(model, optimizer)` wraps the model (DDP, or FSDP2:
fully_shard, after which Accelerate swaps the optimizer's parameters for the sharded ones), and
the loop uses `accelerator.accumulate` and `accelerator.backward`. Rank 0 saves each job's final
full weights for tests/test_accelerate.py to compare with the one-process loop.

    torchrun --nproc_per_node 2 accelerate_worker.py OUT [JOB ...] [--cuda]

JOB: a key of JOBS (all by default). The form: ddp, fsdp2, deepspeed (the DeepSpeed plugin,
ZeRO-2; on CPU with DS_ACCELERATOR=cpu). Jobs:
- KIND: the optimizer clips (max_grad_norm=1.0).
- KIND_accelerator_clip: `accelerator.clip_grad_norm_(model.parameters(), CLIP)` at each
  optimizer step, the optimizer without max_grad_norm; with the DeepSpeed plugin that call only
  reads the norm (DeepSpeed clips, from the plugin's gradient_clipping, here CLIP).
- resume_KIND_OPT_CLIP: `accelerator.save_state` after step 3 of 6, then a fresh Accelerator,
  model and optimizer `load_state` it and take steps 3-5: `<job>.pt` holds both runs' weights.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pairwise  # noqa: E402
from hf_worker import RECIPE, VOCAB, samples  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

warnings.filterwarnings("ignore")
STEPS, PER_RANK, ACCUM = 6, 2, 2
CLIP = 0.05          # binds at every step of this model (its norms are ~1)
SAVE_AT = 3          # resume jobs: save after this many steps


def make_optimizer(model, opt: str = "adamw", clip: str = "optimizer"):
    """The user's optimizer, as in the one-process reference. opt: adamw, adamw8bit, or
    adafactor_rs (GaLoreAdafactor's defaults: relative step, no lr, so no lr schedule). clip:
    "optimizer" (max_grad_norm=1.0), "delayed" (max_grad_norm=CLIP, clip_timing="delayed"),
    "accelerator" or "none" (no max_grad_norm)."""
    import galore_ds

    r = RECIPE
    groups = galore_ds.param_groups(model, rank=r["rank"], update_proj_gap=r["update_proj_gap"],
                                    weight_decay=r["weight_decay"])
    kw = {"optimizer": dict(max_grad_norm=1.0),
          "delayed": dict(max_grad_norm=CLIP, clip_timing="delayed")}.get(clip, {})
    if opt == "adafactor_rs":
        return galore_ds.GaLoreAdafactor(groups, weight_decay=r["weight_decay"], **kw)
    cls = {"adamw": galore_ds.GaLoreAdamW, "adamw8bit": galore_ds.GaLoreAdamW8bit}[opt]
    extra = {"min_8bit_size": 16} if opt == "adamw8bit" else {}
    return cls(groups, lr=r["lr"], betas=r["betas"], eps=r["eps"], weight_decay=r["weight_decay"], **extra, **kw)


def make_schedule(opt, steps: int = STEPS):
    from transformers import get_scheduler

    if any(g.get("lr") is None for g in opt.param_groups):
        return None  # relative-step Adafactor computes its own step size
    return get_scheduler("cosine", opt, num_warmup_steps=RECIPE["warmup"], num_training_steps=steps)


def setup(kind: str, cuda: bool = False, opt_name: str = "adamw", clip: str = "optimizer"):
    """(accelerator, prepared model, prepared optimizer, schedule, the GaLore optimizer built)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    plugin = None
    if kind == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    ds_plugin = None
    if kind == "deepspeed":
        import galore_ds.integrations.deepspeed as gds

        gds.register()
        # DeepSpeed clips (the full gradient) when asked to: accelerator.clip_grad_norm_ only reads its norm
        ds_plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=ACCUM,
                                    gradient_clipping=CLIP if clip == "accelerator" else 0.0)
    AcceleratorState._reset_state()  # one Accelerator per job in this process (the process group stays)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=not cuda, fsdp_plugin=plugin, deepspeed_plugin=ds_plugin,
                              gradient_accumulation_steps=ACCUM)
    model = tiny_llama(vocab=VOCAB, seed=0).to(accelerator.device)
    opt = built = make_optimizer(model, opt_name, clip)
    sched = make_schedule(opt)
    if kind == "fsdp2" and not cuda:
        # Accelerate switches FSDP on for GPU process groups only; on CPU this calls what its
        # prepare() calls for FSDP2: fully_shard, then the optimizer's parameters swapped by data_ptr
        accelerator.state.fsdp_plugin = plugin
        model, opt = accelerator._prepare_fsdp2(model, opt)
    else:
        model, opt = accelerator.prepare(model, opt)  # the schedule is stepped once per optimizer step, below
    if kind == "fsdp2":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]), "params not swapped"
    return accelerator, model, opt, sched, built


def train(accelerator, model, opt, sched, start: int, stop: int, clip: str) -> None:
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = PER_RANK * ACCUM * world
    data = samples(STEPS * global_batch)
    for s in range(start, stop):
        step = torch.stack(data[s * global_batch:(s + 1) * global_batch]).to(accelerator.device)
        for micro in range(ACCUM):
            # the reference's global batch, in the order the micro-batches and ranks split it
            chunk = step.chunk(ACCUM)[micro].chunk(world)[rank]
            with accelerator.accumulate(model):
                # each micro-batch's mean loss; DDP/FSDP average over ranks, accumulate over micro-batches
                accelerator.backward(model(input_ids=chunk, labels=chunk).loss)
                if clip == "accelerator" and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients and sched is not None:
                sched.step()


def full_weights(model) -> dict[str, torch.Tensor]:
    full = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        full[k.removeprefix("module.")] = v.detach().float().cpu().clone()
    return full


def run(kind: str, cuda: bool = False, opt_name: str = "adamw", clip: str = "optimizer") -> dict[str, torch.Tensor]:
    accelerator, model, opt, sched, _ = setup(kind, cuda, opt_name, clip)
    train(accelerator, model, opt, sched, 0, STEPS, clip)
    return full_weights(model)


def resume(kind: str, opt_name: str, clip: str) -> dict[str, dict[str, torch.Tensor]]:
    """accelerator.save_state after SAVE_AT steps (the schedule registered for checkpointing),
    the run continued; a fresh setup load_state's it and takes the same steps."""
    import torch.distributed as dist

    box = [tempfile.mkdtemp(prefix="acc_state_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box)
    directory = box[0]
    accelerator, model, opt, sched, galore = setup(kind, False, opt_name, clip)
    if sched is not None:
        accelerator.register_for_checkpointing(sched)
    train(accelerator, model, opt, sched, 0, SAVE_AT, clip)
    accelerator.save_state(directory)
    saved_coef = galore.next_clip_coef
    train(accelerator, model, opt, sched, SAVE_AT, STEPS, clip)
    uninterrupted = full_weights(model)
    accelerator, model, opt, sched, galore = setup(kind, False, opt_name, clip)
    if sched is not None:
        accelerator.register_for_checkpointing(sched)
    accelerator.load_state(directory)
    loaded_coef = galore.next_clip_coef
    train(accelerator, model, opt, sched, SAVE_AT, STEPS, clip)
    return {"uninterrupted": uninterrupted, "resumed": full_weights(model),
            "coef": torch.tensor([saved_coef, loaded_coef], dtype=torch.float64)}


JOBS = {kind: (lambda kind=kind, cuda=False: run(kind, cuda)) for kind in ("ddp", "fsdp2", "deepspeed")}
for _kind in ("ddp", "fsdp2", "deepspeed"):
    JOBS[f"{_kind}_accelerator_clip"] = lambda cuda=False, k=_kind: run(k, cuda, clip="accelerator")
# save_state/load_state: form x optimizer x clipping ("optimizer": exact), every pair of values
RESUME_FACTORS = dict(kind=["ddp", "deepspeed"], opt=["adamw", "adamw8bit", "adafactor_rs"],
                      clip=["none", "optimizer", "delayed"])
RESUMES = [(c["kind"], c["opt"], c["clip"]) for c in pairwise.cases(RESUME_FACTORS)]
for _kind, _opt, _clip in RESUMES:
    JOBS[f"resume_{_kind}_{_opt}_{_clip}"] = lambda cuda=False, k=_kind, o=_opt, c=_clip: resume(k, o, c)


def reference_accelerator_clip(steps: int, global_batch: int) -> dict[str, torch.Tensor]:
    """The one-process loop for the *_accelerator_clip jobs: the same optimizer without
    max_grad_norm, torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) before each step."""
    model = tiny_llama(vocab=VOCAB, seed=0)
    opt = make_optimizer(model, "adamw", "accelerator")
    sched = make_schedule(opt, steps)
    data = samples(steps * global_batch)
    for s in range(steps):
        x = torch.stack(data[s * global_batch:(s + 1) * global_batch])
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in model.named_parameters()}


def main() -> None:
    out, cuda = Path(sys.argv[1]), "--cuda" in sys.argv
    jobs = [a for a in sys.argv[2:] if not a.startswith("--")] or list(JOBS)
    for job in jobs:
        weights = JOBS[job](cuda=cuda)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(weights, out / f"{job}.pt")
    import gc

    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    # What holds the process group (Accelerate's state, DeepSpeed's engine) goes before exit, so
    # gloo's threads are joined, not killed at interpreter exit (SIGABRT: Engine.close says why).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    AcceleratorState._reset_state()
    GradientState._reset_state()
    gc.collect()


if __name__ == "__main__":
    main()
