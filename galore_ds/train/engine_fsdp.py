"""The FSDP2 engine: fully_shard (row shards) + FSDPGaLoreAdamW (local steps, owner refresh).

    torchrun --nproc_per_node N launch/train.py --config configs/<recipe>.json engine.mode=fsdp

- Each decoder layer and then the root are fully_shard-ed (Shard(0): contiguous row blocks,
  torch.chunk sizes). Mixed precision from engine.fsdp.param_dtype / reduce_dtype.
- Gradient accumulation: backward on every micro-batch with loss / n, gradient sync
  (reduce-scatter) only on the last one (set_requires_gradient_sync), one clip
  (torch's clip_grad_norm_ on DTensor grads: exact global norm), one optimizer step, one
  scheduler step.
- HSDP (engine.fsdp.replicate = R > 1): a (R, W/R) mesh; the model is sharded on the shard
  mesh only and the optimizer averages gradients over replicas in low rank (R_i, m_i x r:
  one all-reduce per step, n/r less traffic than G). With grad_clip > 0 the pre-clip norm
  of the replica-averaged gradient is needed first, so the engine then averages the full
  gradients over replicas itself (exact, no low-rank saving).
- Per-layer mode (engine.fsdp.layerwise = true): FSDPLayerwiseOptimizer updates each row
  shard inside the FSDP2 backward, from the hook FSDP2 runs right after the shard's
  reduce-scatter, and frees the gradient (galore_ds/distributed/fsdp_layerwise.py). Gradient
  sync stays on for every micro-batch (each one's shard is projected and freed at once);
  accumulation is exact in low rank, clipping uses the global norm (one 2-float all-reduce per
  step; with one micro-batch the full-gradient norm, as clip_grad_norm_), a NaN/Inf norm skips
  the step on every rank, and the scheduler steps once per optimizer step. With HSDP the model
  is sharded on FSDP2's own 2-D mesh, which all-reduces each gradient shard over the replicas
  before the hook (full shards, not the low-rank R_i of step-time mode).
- Checkpoints: torch.distributed.checkpoint (model + GaLore state: a run saved on W ranks
  resumes on any W'. Moments are row-sharded DTensors; GaLoreAdamW8bit's codes are saved per
  shard as they are, put back unchanged on the same world size (bit-identical) and re-formed
  from the overlapping shards on another: galore_ds/distributed/fsdp_checkpoint.py); the
  scheduler goes into scheduler.pt (torch.load(weights_only=True)).
- The model is built on CPU (wants_meta_model = False): very large recipes need a sharded
  initialiser first (not done).
"""
from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galore_ds.config import Config, ConfigError, DistEnv
from galore_ds.distributed.common import COMM
from galore_ds.distributed.fsdp import (
    FSDPGaLoreAdafactor,
    FSDPGaLoreAdamW,
    FSDPGaLoreAdamW8bit,
    FSDPGaLoreMixin,
)
from galore_ds.distributed.fsdp_checkpoint import dcp_load, dcp_state_dict
from galore_ds.distributed.fsdp_layerwise import FSDPLayerwiseOptimizer
from galore_ds.model import DTYPES
from galore_ds.train import faults
from galore_ds.train.engine import Engine, StepResult
from galore_ds.train.optim import build_optimizer, build_param_groups
from galore_ds.train.scheduler import warmup_cosine

FSDP_OPTIMIZERS = {"galore_adamw": FSDPGaLoreAdamW, "galore_adamw8bit": FSDPGaLoreAdamW8bit,
                   "galore_adafactor": FSDPGaLoreAdafactor}


class FSDPEngine(Engine):
    name = "fsdp"
    wants_meta_model = False

    def __init__(self, cfg: Config, dist_env: DistEnv) -> None:
        super().__init__(cfg, dist_env)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", dist_env.local_rank) if cuda else torch.device("cpu")
        self.replicate_group = None
        self.layerwise: FSDPLayerwiseOptimizer | None = None

    # ------------------------------------------------------------------ setup
    def _init_dist(self) -> None:
        if dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(minutes=30),
                                store=faults.elastic_store(self.world_size, timedelta(minutes=30)))

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        reps = self.cfg.engine.fsdp.replicate
        if reps <= 1:
            return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        if self.world_size % reps:
            raise ValueError(f"engine.fsdp.replicate={reps} does not divide {self.world_size} ranks")
        mesh = init_device_mesh(self.device.type, (reps, self.world_size // reps),
                                mesh_dim_names=("replicate", "shard"))
        if self.cfg.engine.fsdp.layerwise:
            return mesh  # FSDP2's own HSDP: replicas all-reduced before the per-layer hooks
        self.replicate_group = mesh["replicate"].get_group()
        return mesh["shard"]

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._init_dist()
        f = self.cfg.engine.fsdp
        mesh = self._mesh()
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[f.param_dtype], reduce_dtype=DTYPES[f.reduce_dtype])
        model = model.to(self.device)
        layers = getattr(getattr(model, "model", model), "layers", [])
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=f.reshard_after_forward)
        # The root (embedding, lm_head, final norm) keeps FSDP2's own default: its weights stay
        # gathered from forward to backward, which runs them first (no second all-gather).
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self._model = model
        self._model.train()
        self.optimizer = self._build_optimizer(build_param_groups(model, self.cfg))
        t = self.cfg.training
        self.scheduler = warmup_cosine(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
        if f.layerwise:
            self._setup_layerwise()

    def _setup_layerwise(self) -> None:
        """Per-layer mode, set up as the single-process layerwise engine: exact clipping or
        accumulation defer the updates to the end of backward (so a NaN/Inf step is dropped
        whole); without either (or with training.clip_timing=delayed), each shard is updated
        inside its hook."""
        t = self.cfg.training
        if not isinstance(self.optimizer, FSDPGaLoreMixin):
            raise ConfigError("engine.fsdp.layerwise", f"training.optimizer={t.optimizer!r} has no per-layer mode",
                              "use galore_adamw, galore_adamw8bit or galore_adafactor")
        self.accumulation = max(1, self.cfg.accumulation(self.world_size))
        self.layerwise = FSDPLayerwiseOptimizer(
            self.optimizer, accumulation_steps=self.accumulation,
            max_grad_norm=t.grad_clip if t.grad_clip > 0 else None,
            clip_norm="full" if self.accumulation == 1 else "lowrank", clip_timing=t.clip_timing,
            lr_scheduler=self.scheduler)

    def _build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        low_rank_hsdp = self.replicate_group is not None and self.cfg.training.grad_clip <= 0
        return build_optimizer(groups, self.cfg, classes=FSDP_OPTIMIZERS,
                               replicate_group=self.replicate_group if low_rank_hsdp else None)

    @property
    def model(self) -> nn.Module:
        return self._model

    # ------------------------------------------------------------------ steps
    def _batch(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    def _average_full_over_replicas(self) -> None:
        """HSDP without the low-rank path: all-reduce every gradient shard over replicas."""
        grads = [p.grad for p in self._model.parameters() if p.grad is not None]
        locs = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        flat = torch.cat([g.reshape(-1).float() for g in locs])
        dist.all_reduce(flat, group=self.replicate_group)
        flat.div_(dist.get_world_size(self.replicate_group))
        for g, part in zip(locs, torch.split(flat, [g.numel() for g in locs])):
            g.copy_(part.reshape(g.shape))

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        if self.layerwise is not None:
            return self._train_step_layerwise(micro_batches)
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, mb in enumerate(micro_batches):
            self._model.set_requires_gradient_sync(i == n - 1)
            loss = self._model(**self._batch(mb)).loss
            (loss / n).backward()
            total += loss.detach().double()
        low_rank_hsdp = getattr(self.optimizer, "replicate_group", None) is not None
        if self.replicate_group is not None and not low_rank_hsdp:
            self._average_full_over_replicas()
        clip = self.cfg.training.grad_clip
        params = [p for p in self._model.parameters() if p.grad is not None]
        if low_rank_hsdp:
            grad_norm = math.nan  # replica-averaged G never exists: only its projection
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))
        lr = self.optimizer.param_groups[0]["lr"]
        if not low_rank_hsdp and faults.nonfinite(grad_norm):  # global norm: same decision on every rank
            faults.skip_step(self, self.optimizer)  # NaN/Inf gradient: no state changes
        else:
            self.optimizer.step()
            self.scheduler.step()
        dist.all_reduce(total)
        return StepResult(loss=float(total) / (n * self.world_size), grad_norm=grad_norm, lr=lr,
                          extra={"galore_comm_bytes": COMM.total_bytes(),
                                 "skipped_steps": getattr(self, "skipped_steps", 0)})

    def _train_step_layerwise(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """Updates run inside backward (FSDPLayerwiseOptimizer); it also clips, skips a
        non-finite step on every rank and steps the scheduler."""
        n, lw = len(micro_batches), self.layerwise
        if n != self.accumulation:
            raise ValueError(f"train_step got {n} micro-batches; the recipe's accumulation is {self.accumulation}")
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        done = False
        for mb in micro_batches:
            # sync on: each micro-batch's shard is reduce-scattered, then projected and freed
            # by its hook (no unsharded gradient kept across micro-batches)
            self._model.set_requires_gradient_sync(True)
            loss = self._model(**self._batch(mb)).loss
            (loss / n).backward()
            total += loss.detach().double()
            done = lw.step()
        assert done, "the per-layer window did not close at the end of the step"
        self.skipped_steps = lw.skipped_steps
        norm = lw.full_grad_norm if lw.full_grad_norm is not None else lw.grad_norm
        dist.all_reduce(total)
        extra = {"galore_comm_bytes": COMM.total_bytes(), "skipped_steps": lw.skipped_steps,
                 "grad_norm_lowrank": lw.grad_norm, "clip_coef": lw.clip_coef,
                 "nonfinite_params_skipped": lw.nonfinite_params_skipped}
        if lw.full_grad_norm is not None:
            extra["grad_norm_full"] = lw.full_grad_norm
        return StepResult(loss=float(total) / (n * self.world_size),
                          grad_norm=norm if norm is not None else math.nan, lr=lr, extra=extra)

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        self._model.eval()
        try:
            s = torch.zeros(2, dtype=torch.float64, device=self.device)
            for b in batches:
                s[0] += self._model(**self._batch(b)).loss.double()
                s[1] += 1
        finally:
            self._model.train()
        dist.all_reduce(s)
        return float(s[0] / s[1]) if s[1] > 0 else math.nan

    # ------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        if isinstance(self.optimizer, FSDPGaLoreMixin):
            # GaLore state keyed by FQN, moments row-sharded: loads on any world size
            dcp.save(dcp_state_dict(self._model, self.optimizer), checkpoint_id=str(directory / "dcp"))
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            dcp.save({"model": get_model_state_dict(self._model),
                      "optim": get_optimizer_state_dict(self._model, self.optimizer)},
                     checkpoint_id=str(directory / "dcp"))
        if self.is_main:
            extra = {}
            if self.layerwise is not None:
                # saved between steps: the window is closed, so only the counters remain
                extra["layerwise"] = {"global_step": self.layerwise.global_step,
                                      "skipped_steps": self.layerwise.skipped_steps}
            torch.save({"scheduler": self.scheduler.state_dict(), "world_size": self.world_size, **extra},
                       directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        if isinstance(self.optimizer, FSDPGaLoreMixin):
            dcp_load(self._model, self.optimizer, str(directory / "dcp"))
        else:  # plain torch AdamW: torch's own resharding optimizer state dict
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_optimizer_state_dict,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            sd = {"model": get_model_state_dict(self._model),
                  "optim": get_optimizer_state_dict(self._model, self.optimizer)}
            dcp.load(sd, checkpoint_id=str(directory / "dcp"))
            set_model_state_dict(self._model, sd["model"])
            set_optimizer_state_dict(self._model, self.optimizer, sd["optim"])
        sched = torch.load(directory / "scheduler.pt", weights_only=True)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.layerwise is not None and "layerwise" in sched:
            self.layerwise.global_step = int(sched["layerwise"]["global_step"])
            self.layerwise.skipped_steps = self.skipped_steps = int(sched["layerwise"]["skipped_steps"])

    # ------------------------------------------------------------------ misc
    def galore_stats(self) -> dict[str, Any]:
        stats = dict(getattr(self.optimizer, "galore_stats", {}))
        stats["galore_comm_calls"] = COMM.total_calls()
        return stats

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
