"""The FSDP2 engine: fully_shard + the public GaLore optimizers, which read the shards'
placements (galore_ds/layouts).

    torchrun --nproc_per_node N launch/train.py --config configs/<recipe>.json --set engine.mode=fsdp

- Each decoder layer and then the root are fully_shard-ed. A GaLore matrix projected on the
  left (proj_type std: a wide matrix such as LLaMA's down_proj) is sharded by columns
  (shard_placement_fn Shard(1)) when the world size divides its columns, so its projected
  gradient P^T G_j stays local; otherwise by rows, at one r x n all-reduce per step (FSDP2
  refuses uneven Shard(1)). Everything else is sharded by rows, where right projection
  costs no collective between refreshes.
- Gradient accumulation: backward on every micro-batch with loss / n, gradient sync
  (reduce-scatter) only on the last one, then one optimizer step (it clips by the global norm
  of what it consumes and skips NaN/Inf steps on every rank), one scheduler step.
- HSDP (engine.fsdp.replicate = R > 1): a (R, W/R) mesh; the model is sharded on the shard
  mesh and the optimizer averages projected gradients over the replicas (reduce_group: one
  all-reduce of every R_i, n/r less traffic than averaging G). The AdamW baseline uses FSDP2's
  own 2-D mesh.
- Per-layer mode (engine.fsdp.layerwise): the per-layer wrapper updates each shard inside the
  FSDP2 backward, from the hook FSDP2 runs after the shard's reduce-scatter, and frees the
  gradient; with HSDP, on FSDP2's 2-D mesh (its replica all-reduce runs before the hook).
- Checkpoints: torch.distributed.checkpoint, the optimizer state keyed by parameter name and
  split like its parameter (optim/checkpoint/), so a run saved on W ranks resumes on W'.
"""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galore_ds.core import projector as pj
from galore_ds.optim.checkpoint import dcp_load, dcp_state_dict
from galore_ds.layouts.comm import COMM
from galore_ds.train.engines.base import Engine, StepResult
from galore_ds.train.engines.per_layer import layerwise_step
from galore_ds.train.config import FULL_GRADIENT_OPTIMIZERS
from galore_ds.train.model import DTYPES
from galore_ds.train.optim import build_param_groups, is_galore


def left_projected(model: nn.Module, groups: list[dict[str, Any]]) -> set[int]:
    """ids of the GaLore matrices projected on the left (from their global shape)."""
    return {id(p) for g in groups if "rank" in g for p in g["params"]
            if pj.choose_side(tuple(p.shape), g["proj_type"]) == "left"}


class FSDPEngine(Engine):
    # what holds the process group besides the optimizer: the model (its DTensor meshes) and the replica group
    _HOLDS_PROCESS_GROUP = Engine._HOLDS_PROCESS_GROUP + ("_model", "reduce_group")
    name = "fsdp"

    def __init__(self, cfg, dist_env) -> None:
        super().__init__(cfg, dist_env)
        self.layerwise = None
        self.reduce_group = None

    # ------------------------------------------------------------------ setup
    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        reps = self.cfg.engine.fsdp.replicate
        if reps <= 1:
            return init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("shard",))
        mesh = init_device_mesh(self.device.type, (reps, self.world_size // reps),
                                mesh_dim_names=("replicate", "shard"))
        full = self.cfg.training.optimizer in FULL_GRADIENT_OPTIMIZERS   # Fira, APOLLO read full gradients
        if self.cfg.engine.fsdp.layerwise or not is_galore(self.cfg) or full:
            return mesh  # FSDP2's own HSDP: its replica all-reduce runs on full gradient shards
        self.reduce_group = mesh["replicate"].get_group()  # the optimizer averages R over replicas
        return mesh["shard"]

    def setup(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import Shard

        self.init_process_group()
        f = self.cfg.engine.fsdp
        mesh = self._mesh()
        shards = mesh.size(mesh.ndim - 1)
        left = left_projected(model, build_param_groups(model, self.cfg)) if is_galore(self.cfg) else set()

        def placement(p: nn.Parameter):
            return Shard(1) if id(p) in left and p.shape[1] % shards == 0 else None

        mp = MixedPrecisionPolicy(param_dtype=DTYPES[f.param_dtype], reduce_dtype=DTYPES[f.reduce_dtype])
        model = model.to(self.device)
        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=f.reshard_after_forward,
                        shard_placement_fn=placement)
        # The root (embedding, lm_head, final norm) keeps FSDP2's own default: its weights stay
        # gathered from forward to backward, which runs them first (no second all-gather).
        fully_shard(model, mesh=mesh, mp_policy=mp, shard_placement_fn=placement)
        self._model = model
        self._model.train()
        layout = {"reduce_group": self.reduce_group} if self.reduce_group is not None else {}
        self.build_optimizer(model, per_layer={} if f.layerwise else None, **layout)

    @property
    def model(self) -> nn.Module:
        return self._model

    # ------------------------------------------------------------------ steps
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        n = len(micro_batches)
        if self.layerwise is not None:
            # gradient sync on for every micro-batch: each one's shard is reduce-scattered,
            # then projected and freed by its hook (no unsharded gradient kept across them)
            total, result = layerwise_step(self, self.layerwise, micro_batches)
        else:
            total, result = self.accumulate_and_step(micro_batches, self._gradient_sync)
        result.loss = self.mean_over_ranks(total, n)
        result.extra.update({"galore_comm_bytes": COMM.total_bytes(), "skipped_steps": self.skipped_steps})
        return result

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """FSDP2 reduce-scatters gradients only at the last micro-batch of a step."""
        self._model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def after_eval(self) -> None:
        # An eval forward leaves the root's parameters gathered (FSDP2 keeps the root unsharded
        # until backward); reshard so they are the optimizer's sharded parameters again.
        self._model.reshard()

    # ------------------------------------------------------------------ state
    def save(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        if is_galore(self.cfg):
            state = dcp_state_dict(self._model, self.optimizer)
        else:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            state = {"model": get_model_state_dict(self._model),
                     "optim": get_optimizer_state_dict(self._model, self.optimizer)}
        dcp.save(state, checkpoint_id=str(directory / "dcp"))
        if self.is_main:
            extra = {}
            if self.layerwise is not None:  # saved between steps: the window is closed
                extra["layerwise"] = {"global_step": self.layerwise.global_step,
                                      "skipped_steps": self.layerwise.skipped_steps}
            torch.save({"scheduler": self.scheduler.state_dict(), "world_size": self.world_size,
                        "skipped_steps": self.skipped_steps,
                        "next_clip_coef": getattr(self.optimizer, "next_clip_coef", 1.0), **extra},
                       directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        directory = Path(directory)
        if is_galore(self.cfg):
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
        self.skipped_steps = int(sched.get("skipped_steps", 0))
        if hasattr(self.optimizer, "next_clip_coef"):
            self.optimizer.next_clip_coef = float(sched.get("next_clip_coef", 1.0))
            self.optimizer.skipped_steps = self.skipped_steps
        if self.layerwise is not None and "layerwise" in sched:
            lw = sched["layerwise"]
            self.layerwise.load_window({"micro_step": 0, **lw})
            self.skipped_steps = self.layerwise.skipped_steps

    def galore_stats(self) -> dict[str, Any]:
        return {**super().galore_stats(), "galore_comm_calls": COMM.total_calls()}


__all__ = ["FSDPEngine"]
