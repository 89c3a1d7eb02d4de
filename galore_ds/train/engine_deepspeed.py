"""The DeepSpeed engine: ZeRO 0/1/2/3 (fp32 or bf16) + DeepSpeedGaLoreAdamW.

    deepspeed --num_gpus N launch/train.py --config configs/<recipe>.json engine.mode=deepspeed
    mpirun -n N python launch/train.py --config configs/<recipe>.json engine.mode=deepspeed

- cfg.engine.deepspeed is DeepSpeed's own JSON (zero_optimization, bf16, ...); this engine
  fills what the recipe owns: micro batch, accumulation (global_batch / (micro * W)),
  gradient_clipping (training.grad_clip; DeepSpeed's default 1.0 is never used silently)
  and the optimizer: the recipe's GaLore optimizer and name-based param groups, handed to
  deepspeed.initialize as a client optimizer (the adapter then sees DeepSpeed's partitions).
- One train_step = len(micro_batches) engine.backward/engine.step calls: DeepSpeed averages
  over the accumulation (loss / gas), reduces once, clips once, steps the optimizer and
  the scheduler once, at the boundary.
- Checkpoints: engine.save_checkpoint / load_checkpoint (DeepSpeed's per-rank layout, same
  world size; the GaLore state is keyed by strings so it round-trips bit-identically).
"""
from __future__ import annotations

import copy
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galore_ds.config import Config, DistEnv
from galore_ds.train import faults
from galore_ds.train.engine import Engine, StepResult
from galore_ds.train.optim import build_optimizer, build_param_groups
from galore_ds.train.scheduler import warmup_cosine

TAG = "galore_ds"


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    wants_meta_model = False

    def __init__(self, cfg: Config, dist_env: DistEnv) -> None:
        super().__init__(cfg, dist_env)
        self.device = (torch.device("cuda", dist_env.local_rank) if torch.cuda.is_available()
                       else torch.device("cpu"))

    def ds_config(self) -> dict[str, Any]:
        t = self.cfg.training
        c = copy.deepcopy(dict(self.cfg.engine.deepspeed))
        gas = max(1, self.cfg.accumulation(self.world_size))
        c["train_micro_batch_size_per_gpu"] = t.micro_batch
        c["gradient_accumulation_steps"] = gas
        c["train_batch_size"] = t.micro_batch * gas * self.world_size
        c["gradient_clipping"] = t.grad_clip
        c.setdefault("steps_per_print", 10**9)
        c.pop("optimizer", None)  # the recipe's optimizer (training.optimizer, galore.*)
        c.pop("scheduler", None)  # the recipe's warmup + cosine
        return c

    def setup(self, model: nn.Module) -> None:
        import deepspeed

        import galore_ds.distributed.deepspeed as dsg

        dsg.register()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            store = faults.elastic_store(self.world_size, timedelta(minutes=30))
            if store is not None:  # a torchrun restart: this attempt's keys only (faults.py)
                dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                        store=store, timeout=timedelta(minutes=30))
            # adopts the group above if any; mpirun: DeepSpeed's MPI discovery sets MASTER_PORT
            # itself (from distributed_port)
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                       distributed_port=int(os.environ.get("MASTER_PORT", "29500")))
        t = self.cfg.training
        optimizer = build_optimizer(build_param_groups(model, self.cfg), self.cfg)
        optimizer = dsg._as_ds_optimizer(optimizer) or optimizer  # before the scheduler wraps step
        scheduler = warmup_cosine(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
        self._engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config())
        self._dtype = next(self._engine.module.parameters()).dtype

    @property
    def model(self) -> nn.Module:
        return self._engine.module

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self._engine.device) for k, v in batch.items()}

    def _mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        eng = self._engine
        if len(micro_batches) != eng.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches; DeepSpeed was set up for "
                             f"{eng.gradient_accumulation_steps()}")
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else float("nan")
        # fp32 ZeRO-0 has no DeepSpeed wrapper to report the norm: measure it at the boundary,
        # where the gradients are already all-reduced (same on every rank) and not yet clipped
        own_norm = eng.zero_optimization_stage() == 0 and not (eng.fp16_enabled() or eng.bfloat16_enabled())
        total, norm = 0.0, None
        for i, mb in enumerate(micro_batches):
            loss = eng(**self._to_device(mb)).loss
            eng.backward(loss)
            if own_norm and i == len(micro_batches) - 1:
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in eng.module.parameters() if p.grad is not None])
            eng.step()
            total += float(loss.detach())
        if norm is None:
            norm = eng.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        extra = {"skipped_steps": int(getattr(eng, "skipped_steps", 0))}
        return StepResult(loss=self._mean(total / len(micro_batches)), grad_norm=norm, lr=lr,
                          extra=extra)

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        if not batches:
            return math.nan
        eng = self._engine
        eng.eval()
        try:
            losses = [float(eng(**self._to_device(b)).loss) for b in batches]
        finally:
            eng.train()
        return self._mean(sum(losses) / len(losses))

    def save(self, directory: Path) -> None:
        self._engine.save_checkpoint(str(directory), tag=TAG)

    def load(self, directory: Path) -> None:
        path, _ = self._engine.load_checkpoint(str(directory), tag=TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{TAG}")

    def galore_stats(self) -> dict[str, Any]:
        opt = self._engine.basic_optimizer
        return dict(getattr(opt, "galore_stats", {}) or {})

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


__all__ = ["DeepSpeedEngine"]
