"""torchtitan 0.3's optimizer container on an FSDP2 model, as its Trainer uses it, on CPU ranks.

    torchrun --nproc_per_node 2 tests/dist/torchtitan_worker.py OUT_DIR

What torchtitan's Trainer does, in order: fully_shard each block and the root, then
`config.optimizer.build(model_parts=[model])`; checkpoints go through the container's flat,
name-keyed state_dict and DCP, and a load first asks a fresh container for its state_dict (the
zero-gradient state-creation step). Every rank trains the FSDP2 model on its half of each global
batch and, beside it, an unsharded copy with the plain galore_ds loop on the whole batch. Rank 0
writes OUT_DIR/result.json: the sharded run against the plain loop (relative difference) and the
run resumed from step 4 against the uninterrupted one (bit-identical or not).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import galore_ds  # noqa: E402
from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, galore_param_groups  # noqa: E402
from tiny_models import TitanLike, titan_batch, titan_loss  # noqa: E402

HYPER = dict(rank=8, update_proj_gap=3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS, SAVE_AT = 7, 4   # refreshes at 0, 3 and, after the resume, 6


def sharded_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = TitanLike()
    for block in model.layers.values():
        fully_shard(block)
    return fully_shard(model)


def container(model: torch.nn.Module) -> GaLoreOptimizersContainer:
    config = GaLoreOptimizersContainer.Config(param_groups=galore_param_groups(lr=1e-2, **HYPER))
    return config.build(model_parts=[model])


def train(model, opt, steps: range, rank: int, world: int) -> None:
    for s in steps:
        x = titan_batch(s)
        titan_loss(model, x.chunk(world)[rank]).backward()   # FSDP2 averages over the ranks
        opt.step()
        opt.zero_grad()


def full(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(sys.argv[1])
    ckpt = str(out / "step-4")

    plain_model = TitanLike()
    plain = galore_ds.GaLoreAdamW(galore_ds.param_groups(plain_model, target_modules=("attention", "feed_forward"),
                                                         **{k: HYPER[k] for k in ("rank", "update_proj_gap",
                                                                                  "weight_decay")}),
                                  lr=1e-2, betas=HYPER["betas"], eps=HYPER["eps"])
    train(plain_model, plain, range(STEPS), 0, 1)

    model = sharded_model()
    opt = container(model)
    train(model, opt, range(SAVE_AT), rank, world)
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=ckpt)
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    straight = full(model)

    resumed_model = sharded_model()
    resumed = container(resumed_model)
    state = {"model": resumed_model.state_dict(), "optimizer": resumed.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["optimizer"])
    train(resumed_model, resumed, range(SAVE_AT, STEPS), rank, world)
    again = full(resumed_model)

    if rank == 0:
        reference = {k: v.detach() for k, v in plain_model.state_dict().items()}
        result = {
            "dtensor_params": all(hasattr(p, "placements") for g in opt.optimizers[0].param_groups
                                  for p in g["params"]),
            "rel_diff_vs_plain": max(float((straight[k] - reference[k]).norm() / reference[k].norm())
                                     for k in reference),
            "resume_bit_identical": all(torch.equal(straight[k], again[k]) for k in straight),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
