"""Accelerate as users call it, on 2 CPU ranks under torchrun: the GaLore optimizer is built on
the plain model, then `accelerator.prepare(model, optimizer)` wraps the model (DDP, or FSDP2:
fully_shard, after which Accelerate swaps the optimizer's parameters for the sharded ones), and
the loop uses `accelerator.accumulate` and `accelerator.backward`. Rank 0 saves each job's final
full weights for tests/test_accelerate.py to compare with the one-process loop.

    torchrun --nproc_per_node 2 accelerate_worker.py OUT [KIND ...] [--cuda]

KIND: ddp, fsdp2, deepspeed (the DeepSpeed plugin, ZeRO-2; on CPU with DS_ACCELERATOR=cpu);
all three by default.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_worker import RECIPE, VOCAB, samples  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

warnings.filterwarnings("ignore")
STEPS, PER_RANK, ACCUM = 6, 2, 2


def run(kind: str, cuda: bool = False) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from transformers import get_scheduler

    import galore_ds

    plugin = None
    if kind == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    ds_plugin = None
    if kind == "deepspeed":
        import galore_ds.integrations.deepspeed as gds

        gds.register()
        ds_plugin = DeepSpeedPlugin(zero_stage=2, gradient_accumulation_steps=ACCUM, gradient_clipping=0.0)
    AcceleratorState._reset_state()  # one Accelerator per job in this process (the process group stays)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=not cuda, fsdp_plugin=plugin, deepspeed_plugin=ds_plugin,
                              gradient_accumulation_steps=ACCUM)
    r = RECIPE
    model = tiny_llama(vocab=VOCAB, seed=0).to(accelerator.device)
    groups = galore_ds.param_groups(model, rank=r["rank"], update_proj_gap=r["update_proj_gap"],
                                    weight_decay=r["weight_decay"])
    opt = galore_ds.GaLoreAdamW(groups, lr=r["lr"], betas=r["betas"], eps=r["eps"],
                                weight_decay=r["weight_decay"], max_grad_norm=1.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=r["warmup"], num_training_steps=STEPS)
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
    rank, world = accelerator.process_index, accelerator.num_processes
    global_batch = PER_RANK * ACCUM * world
    data = samples(STEPS * global_batch)
    for s in range(STEPS):
        step = torch.stack(data[s * global_batch:(s + 1) * global_batch]).to(accelerator.device)
        for micro in range(ACCUM):
            # the reference's global batch, in the order the micro-batches and ranks split it
            chunk = step.chunk(ACCUM)[micro].chunk(world)[rank]
            with accelerator.accumulate(model):
                # each micro-batch's mean loss; DDP/FSDP average over ranks, accumulate over micro-batches
                accelerator.backward(model(input_ids=chunk, labels=chunk).loss)
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                sched.step()
    full = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        full[k.removeprefix("module.")] = v.detach().float().cpu().clone()
    return full


def main() -> None:
    out, cuda = Path(sys.argv[1]), "--cuda" in sys.argv
    kinds = [a for a in sys.argv[2:] if not a.startswith("--")] or ["ddp", "fsdp2", "deepspeed"]
    for kind in kinds:
        weights = run(kind, cuda)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(weights, out / f"{kind}.pt")
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
