"""Clipping through torchtitan's container, on 2 FSDP2 CPU ranks, against one process.

    torchrun --nproc_per_node 2 tests/dist/torchtitan_clip_worker.py OUT_DIR

Cases, one process group: the optimizer's own clip given to galore_param_groups
(max_grad_norm, exact and delayed timing), and torchtitan's Trainer's clip (its
dist_utils.clip_grad_norm_ over the model's parameters before the container steps). Each rank
trains the FSDP2 model (fully_shard per block and the root, then Config.build, as torchtitan's
Trainer orders them) on its half of every global batch; the reference is the plain galore_ds
loop with the same clip, in one process on the whole batch. Rank 0 writes OUT_DIR/result.json.
The helpers serve tests/test_torchtitan.py's one-process tests too.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import galore_ds  # noqa: E402
from galore_ds.integrations.torchtitan import (  # noqa: E402
    TORCHTITAN_TARGETS, GaLoreOptimizersContainer, galore_param_groups)
from tiny_models import TitanLike, titan_batch, titan_loss  # noqa: E402
from shutdown import exit_worker  # noqa: E402

GALORE = dict(rank=8, update_proj_gap=3)   # refreshes at steps 0, 3 and 6 of 7
STEPS = 7


def container(model: nn.Module, **optimizer_kwargs: Any) -> GaLoreOptimizersContainer:
    """What a torchtitan user writes: the groups from galore_param_groups, with any optimizer
    keyword (max_grad_norm, clip_timing) among them, built as its Trainer builds them."""
    config = GaLoreOptimizersContainer.Config(
        param_groups=galore_param_groups(lr=1e-2, **GALORE, **optimizer_kwargs))
    return config.build(model_parts=[model])


def reference(model: nn.Module, **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """The plain galore_ds loop's optimizer with the same settings."""
    return galore_ds.GaLoreAdamW(galore_ds.param_groups(model, target_modules=TORCHTITAN_TARGETS, **GALORE),
                                 lr=1e-2, **optimizer_kwargs)


def train(model: nn.Module, opt, steps: range, rank: int, world: int,
          clip: Callable[[list[torch.Tensor]], Any] | None = None) -> None:
    for s in steps:
        titan_loss(model, titan_batch(s).chunk(world)[rank]).backward()   # FSDP2 averages over the ranks
        if clip is not None:
            clip(list(model.parameters()))
        opt.step()
        opt.zero_grad()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def rel(model: nn.Module, ref: nn.Module) -> float:
    """Largest per-parameter relative difference (full tensors)."""
    return max(float((full(p) - q.detach()).norm() / q.detach().norm())
               for p, q in zip(model.parameters(), ref.parameters()))


def sharded_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = TitanLike()
    for block in model.layers.values():
        fully_shard(block)
    return fully_shard(model)


def titan_clip(params: list[torch.Tensor]) -> Any:
    from torchtitan.distributed import utils as dist_utils

    return dist_utils.clip_grad_norm_(params, 0.05, foreach=True)   # torchtitan's Trainer, max_norm 0.05


CASES: dict[str, tuple[dict, Callable | None, Callable | None]] = {
    # name: (optimizer keywords, clip on the FSDP2 run, clip on the reference)
    "max_grad_norm_exact": (dict(max_grad_norm=0.01), None, None),
    "max_grad_norm_delayed": (dict(max_grad_norm=0.01, clip_timing="delayed"), None, None),
    "torchtitan_clip_grad_norm": ({}, titan_clip, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05)),
}


def case(name: str, rank: int, world: int) -> dict:
    kwargs, clip, ref_clip = CASES[name]
    ref_model = TitanLike()
    train(ref_model, reference(ref_model, **kwargs), range(STEPS), 0, 1, clip=ref_clip)
    model = sharded_model()
    opt = container(model, **kwargs)
    train(model, opt, range(STEPS), rank, world, clip=clip)
    inner = opt.optimizers[0]
    return {"dtensor_params": all(hasattr(p, "placements") for g in inner.param_groups for p in g["params"]),
            "rel_diff_vs_one_process": rel(model, ref_model)}


def run(out_dir: Path) -> dict:
    """Launch this worker on 2 ranks (from a test) and return rank 0's results by case."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), str(out_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out_dir / "result.json").read_text())


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in CASES:
        try:
            results[name] = {"ok": True, **case(name, rank, world)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc()[-3000:]}
        dist.barrier()
    if rank == 0:
        (Path(sys.argv[1]) / "result.json").write_text(json.dumps(results))
    dist.barrier()
    exit_worker()   # gloo's threads outlive the optimizers: tests/dist/shutdown.py says why


if __name__ == "__main__":
    main()
