"""Checkpoints of an FSDP2 model's GaLore optimizer through the two APIs users call, on CPU ranks.

    torchrun --nproc_per_node 2 tests/dist/fsdp_checkpoint_worker.py OUT_DIR {torchtitan|torch} [OPTIMIZER]

torchtitan: what its Trainer does, in order: fully_shard each block and the root, then
`config.optimizer.build(model_parts=[model])`; checkpoints go through the container's flat,
name-keyed state_dict and DCP, and a load first asks a fresh container for its state_dict (the
zero-gradient state-creation step). torch: a public galore_ds optimizer in the user's own FSDP2
code, checkpointed with torch's get_/set_optimizer_state_dict and DCP. Every rank trains the FSDP2 model on its half of each global
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
from shutdown import exit_worker  # noqa: E402

HYPER = dict(rank=8, update_proj_gap=3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS, SAVE_AT = 7, 4   # refreshes at 0, 3 and, after the resume, 6


def run(out_dir: Path, api: str, optimizer: str = "GaLoreAdamW") -> dict:
    """Launch this worker on 2 ranks (from a test) and return rank 0's result."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out_dir), api, optimizer]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "result.json").read_text())


def sharded_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = TitanLike()
    for block in model.layers.values():
        fully_shard(block)
    return fully_shard(model)


def optimizer(model: torch.nn.Module, api: str, name: str) -> torch.optim.Optimizer:
    """torchtitan: what its Trainer does with config.optimizer, Config.build(model_parts=...)
    (implementation left at torchtitan's default, "fused": every group gets fused=True);
    torch: the public class on the user's model. Both with the same HYPER settings."""
    if api == "torchtitan":
        rule = {} if name == "GaLoreAdafactor" else {k: HYPER[k] for k in ("betas", "eps")}
        config = GaLoreOptimizersContainer.Config(param_groups=galore_param_groups(
            lr=1e-2, optimizer=name, **{k: HYPER[k] for k in ("rank", "update_proj_gap", "weight_decay")}, **rule))
        return config.build(model_parts=[model])
    return plain_optimizer(model, name)


def plain_optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    """The plain galore_ds loop's optimizer (the reference), by class name."""
    groups = galore_ds.param_groups(model, target_modules=("attention", "feed_forward"),
                                    **{k: HYPER[k] for k in ("rank", "update_proj_gap", "weight_decay")})
    extra = dict(relative_step=False) if name == "GaLoreAdafactor" else dict(betas=HYPER["betas"], eps=HYPER["eps"])
    return getattr(galore_ds, name)(groups, lr=1e-2, **extra)


def state(model, opt, api: str) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if api == "torchtitan":
        return {"model": model.state_dict(), "optimizer": opt.state_dict()}
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}


def load(model, opt, api: str, ckpt: str) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = state(model, opt, api)   # a fresh optimizer: its state-creation step
    dcp.load(sd, checkpoint_id=ckpt)
    if api == "torchtitan":
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])
    else:
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optimizer"])


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
    out, api = Path(sys.argv[1]), sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "GaLoreAdamW"
    ckpt = str(out / "step-4")

    plain_model = TitanLike()
    plain = plain_optimizer(plain_model, name)
    train(plain_model, plain, range(STEPS), 0, 1)

    model = sharded_model()
    opt = optimizer(model, api, name)
    train(model, opt, range(SAVE_AT), rank, world)
    dcp.save(state(model, opt, api), checkpoint_id=ckpt)
    train(model, opt, range(SAVE_AT, STEPS), rank, world)
    straight = full(model)

    resumed_model = sharded_model()
    resumed = optimizer(resumed_model, api, name)
    load(resumed_model, resumed, api, ckpt)
    train(resumed_model, resumed, range(SAVE_AT, STEPS), rank, world)
    again = full(resumed_model)

    if rank == 0:
        inner = opt.optimizers[0] if api == "torchtitan" else opt
        reference = {k: v.detach() for k, v in plain_model.state_dict().items()}
        result = {
            "dtensor_params": all(hasattr(p, "placements") for g in inner.param_groups for p in g["params"]),
            "rel_diff_vs_plain": max(float((straight[k] - reference[k]).norm() / reference[k].norm())
                                     for k in reference),
            "resume_bit_identical": all(torch.equal(straight[k], again[k]) for k in straight),
            "resume_rel_diff": max(float((straight[k] - again[k]).norm() / straight[k].norm()) for k in straight),
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    exit_worker()   # gloo's threads outlive the optimizers: tests/dist/shutdown.py says why


if __name__ == "__main__":
    main()
