"""The replicated-weights engine (engine.mode = "ddp"): every rank holds the whole model (the
24 GB per-layer setup on each GPU) and only low-rank gradients cross the network.

    torchrun --nnodes 1:4 --nproc_per_node 1 --max-restarts 3 launch/train.py --config c.json \\
        --set engine.mode=ddp --set engine.ddp.layerwise=true

- Per-layer (engine.ddp.layerwise): no DDP wrapper. Each parameter's backward hook projects
  its gradient (GaLore matrices), frees the full one, and the projected gradients (and the
  full gradients of embeddings, lm_head and norms) are averaged in asynchronous buckets
  while backward goes on (galore_ds.LayerwiseOptimizer over an optimizer built with
  reduce_group); then each update runs. Accumulation keeps projected sums locally and
  averages once per step.
- Step time: torch's DistributedDataParallel with galore_ds's communication hook
  (optim/lowrank_ddp.py): DDP's buckets carry R of every GaLore matrix instead of G.
- Refresh: galore.refresh=randomized is a subspace iteration whose Gram products are two
  low-rank all-reduces per round (cold: first_power_iters rounds from a seeded start, then
  warm); svd sends each matrix's summed gradient to one owner rank (one reduce_scatter) and
  shares the basis. galore.stagger spreads the refreshes over the window.
- Clipping and NaN: the norm of the averaged projected gradients plus the other averaged
  gradients, the same on every rank with no extra collective; a NaN/Inf skips the step
  everywhere.
- Checkpoints hold whole tensors (every rank has all of them): rank 0 writes, any world size
  reads. Under torchrun --nnodes MIN:MAX a rank leaving or joining restarts every rank, and
  --resume continues from the latest checkpoint on the new world size with the recipe's
  global batch (accumulation re-derived).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from galore_ds.optim.lowrank_ddp import LowRankHookState, lowrank_comm_hook
from galore_ds.train.engines.base import Engine, StepResult
from galore_ds.train.engines.per_layer import layerwise_step


class DDPEngine(Engine):
    # what holds the process group besides the optimizer: the DDP wrapper and the module it wraps
    _HOLDS_PROCESS_GROUP = Engine._HOLDS_PROCESS_GROUP + ("_ddp", "_module")
    name = "ddp"
    wants_meta_model = True

    def setup(self, model: nn.Module) -> None:
        self.init_process_group()
        self._module = self.place_model(model)
        group = dist.group.WORLD if self.world_size > 1 else None
        per_layer = self.cfg.engine.ddp.layerwise
        layout = {"reduce_group": group} if per_layer and group is not None else {}
        wire = getattr(torch, self.cfg.engine.ddp.reduce_dtype)
        self.build_optimizer(self._module, per_layer=dict(
            accum_dtype=torch.float64 if wire == torch.float64 else torch.float32,
            reduce_dtype=wire if wire == torch.bfloat16 else None) if per_layer else None, **layout)
        self._ddp = None
        if per_layer:
            self.layerwise.bucket_numel = int(self.cfg.engine.ddp.bucket_mb * 2**20 // 4)
        elif group is not None:
            # find_unused_parameters: DDP then keeps its first bucket layout instead of
            # rebuilding it in gradient-ready order after its first iteration (torch's reducer:
            # should_rebuild_buckets). A rebuild makes a resumed run's first step sum in another
            # layout than the uninterrupted run's, and with 3+ ranks a ring all-reduce rounds by
            # position: the resume would not be bit-identical. Cost: one walk of the autograd
            # graph and one all-reduce of a used-parameter bitmap (one int per tensor) per step.
            self._ddp = nn.parallel.DistributedDataParallel(
                self._module, bucket_cap_mb=self.cfg.engine.ddp.bucket_mb, find_unused_parameters=True)
            self._ddp.register_comm_hook(LowRankHookState(self.optimizer, reduce_dtype=wire), lowrank_comm_hook)

    @property
    def model(self) -> nn.Module:
        return self._module

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        module = self._ddp if self._ddp is not None and self._module.training else self._module
        return module(**self.to_device(batch)).loss

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        n = len(micro_batches)
        if self.layerwise is not None:
            total, result = layerwise_step(self, self.layerwise, micro_batches)
        else:
            total, result = self.accumulate_and_step(
                micro_batches, lambda last: self._ddp.no_sync() if self._ddp and not last else contextlib.nullcontext())
        result.loss = self.mean_over_ranks(total, n)
        result.extra["skipped_steps"] = self.skipped_steps
        return result

    def save(self, directory: Path) -> None:
        """Whole tensors, identical on every rank: rank 0 writes them."""
        if self.is_main:
            self.save_engine_file(directory)

    def load(self, directory: Path) -> None:
        self.load_engine_file(directory)


__all__ = ["DDPEngine"]
