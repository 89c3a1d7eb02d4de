"""The engine protocol and what every engine shares.

The loop (train/trainer.py) owns data, logging, evaluation cadence and checkpoint layout; an
engine owns everything that depends on how parameters live: wrapping/sharding the model, the
optimizer and LR scheduler, gradient accumulation, clipping, the step, its own state on disk,
and every collective. The loop never calls torch.distributed itself.

Adding an engine is one line in ENGINES ("name": "module:Class").

Contract (all engines):
  - constructed as Engine(cfg, dist) with the validated Config and the DistEnv read from the
    launcher's environment; `setup(model)` is called once, before any step or `load`. The
    model arrives on the meta device when `wants_meta_model` (large models: the engine
    materialises it, e.g. after sharding); otherwise on CPU in cfg.model.dtype.
  - `train_step(micro_batches)`: one optimizer step over this rank's micro-batches (len ==
    the recipe's accumulation). Gradients are accumulated over ALL micro-batches, clipped once
    by the global norm of what the optimizer consumes (training.grad_clip, 0 = off; the GaLore
    optimizers' `max_grad_norm`), the optimizer and the scheduler step once, and a NaN/Inf
    gradient skips the step on every rank. Returns a StepResult whose loss is the mean over
    every micro-batch of every rank and whose grad_norm is that global pre-clip norm.
  - `eval_loss(batches)`: the mean loss over all ranks' batches (the same sequences on every
    world size), no gradients, the model left ready to train.
  - `save(dir)` / `load(dir)`: this rank's model + optimizer + scheduler state, under an
    existing directory (the loop makes it, renames it when complete, and stores data position
    and RNG itself). Files load with torch.load(weights_only=True).
  - `barrier()` and `broadcast_object(obj)` are the only collectives the loop needs.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

if TYPE_CHECKING:  # keep this module cheap to import
    import torch
    from torch import nn

    from galore_ds.train.config import Config, DistEnv

ENGINES: dict[str, str] = {
    "single": "galore_ds.train.engines.single:SingleEngine",
    "layerwise": "galore_ds.train.engines.layerwise:LayerwiseEngine",
    "deepspeed": "galore_ds.train.engines.deepspeed:DeepSpeedEngine",
    "fsdp": "galore_ds.train.engines.fsdp:FSDPEngine",
    "ddp": "galore_ds.train.engines.ddp:DDPEngine",
}
TIMEOUT = timedelta(minutes=30)


class EngineUnavailable(Exception):
    """The recipe names an engine whose implementation is not installed."""


@dataclass
class StepResult:
    loss: float            # mean over all micro-batches of all ranks
    grad_norm: float       # global L2 norm of what the optimizer consumed, before clipping
    lr: float              # learning rate used by this step (first param group)
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific numbers to log


class Engine(ABC):
    """Base class of every engine (see the module docstring)."""

    name: str = "abstract"
    wants_meta_model: bool = False  # True: setup() receives a meta-device model to materialise

    def __init__(self, cfg: "Config", dist: "DistEnv") -> None:
        import torch

        self.cfg = cfg
        self.dist = dist
        self.device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.skipped_steps = 0

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def accumulation(self) -> int:
        return max(1, self.cfg.accumulation(self.world_size))

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def setup(self, model: "nn.Module") -> None:
        """Wrap/shard the model, build optimizer + scheduler."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, "torch.Tensor"]]) -> StepResult:
        """Accumulate over micro_batches, clip, optimizer.step() and scheduler.step() once."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this rank's model/optimizer/scheduler state into an existing directory."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Inverse of save (called after setup)."""

    @property
    @abstractmethod
    def model(self) -> "nn.Module":
        """The (unwrapped) model, e.g. for exporting weights."""

    # ------------------------------------------------------------------ shared: build
    def place_model(self, model: "nn.Module") -> "nn.Module":
        """The whole model on this rank's device, in train mode (a meta-device model is
        materialised there first, straight into its storage dtype)."""
        from galore_ds.train.model import materialize

        if any(p.is_meta for p in model.parameters()):
            materialize(model, self.device, self.cfg.model.init_std, self.cfg.training.seed)
        model = model.to(self.device)
        model.train()
        return model

    def build_optimizer(self, model: "nn.Module", per_layer: dict[str, Any] | None = None, **layout: Any) -> None:
        """The recipe's optimizer over `model`'s parameters (`layout` keywords, reduce_group, go
        to the GaLore optimizers), its LR schedule, and with `per_layer` (the wrapper's keyword
        arguments) the per-layer wrapper that runs them inside backward: the same build on
        every engine that owns its optimizer."""
        from galore_ds.train.engines.per_layer import layerwise_for
        from galore_ds.train.optim import build_optimizer, build_param_groups, warmup_cosine

        self.optimizer = build_optimizer(build_param_groups(model, self.cfg), self.cfg, **layout)
        self.scheduler = warmup_cosine(self.optimizer, self.cfg)
        self.layerwise = None if per_layer is None else layerwise_for(self, self.optimizer, self.scheduler, **per_layer)

    # ------------------------------------------------------------------ shared: engine.pt
    def save_engine_file(self, directory: Path) -> None:
        """engine.pt: whole tensors (one process, or replicas identical on every rank): the
        model, the optimizer (inside the per-layer wrapper's state when there is one: window
        position and accumulators with it), the scheduler and the skipped-step count."""
        import torch

        state = {"model": self.model.state_dict()}
        if getattr(self, "layerwise", None) is not None:
            # the optimizer, window position, accumulators, scheduler and skipped-step count
            state["layerwise"] = self.layerwise.state_dict()
        else:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         skipped_steps=self.skipped_steps)
        torch.save(state, Path(directory) / "engine.pt")

    def load_engine_file(self, directory: Path) -> None:
        """Inverse of save_engine_file (after setup)."""
        import torch

        # mmap: a 7B checkpoint is paged in as it is copied, not held twice in memory
        sd = torch.load(Path(directory) / "engine.pt", map_location=self.device, weights_only=True,
                        mmap=torch.device(self.device).type == "cpu")
        self.model.load_state_dict(sd["model"])
        if getattr(self, "layerwise", None) is not None:
            self.layerwise.load_state_dict(sd["layerwise"])   # its optimizer and scheduler too
            self.skipped_steps = self.layerwise.skipped_steps
        else:
            self.optimizer.load_state_dict(sd["optimizer"])
            self.scheduler.load_state_dict(sd["scheduler"])
            self.skipped_steps = int(sd.get("skipped_steps", 0))

    # ------------------------------------------------------------------ shared: steps
    def accumulate_and_step(self, micro_batches: list[dict[str, "torch.Tensor"]],
                            hold_reduction: Callable[[bool], ContextManager] | None = None) -> tuple[float, StepResult]:
        """A step-time step: backward of every micro-batch (loss / n: equal-length packed
        sequences, so the mean of means is the mean), then one optimizer + scheduler step.
        `hold_reduction(is_last)` is the context each backward runs in (DDP's no_sync, FSDP2's
        gradient-sync switch): gradients cross ranks once, at the last micro-batch.
        Returns (this rank's loss sum, the result with loss still to fill)."""
        n = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, mb in enumerate(micro_batches):
            with hold_reduction(i == n - 1) if hold_reduction else contextlib.nullcontext():
                loss = self.forward_loss(mb)
                (loss / n).backward()
            total += float(loss.detach())
        lr = self.optimizer.param_groups[0]["lr"]
        return total, StepResult(loss=0.0, grad_norm=self.optimizer_step(), lr=lr)

    def optimizer_step(self) -> float:
        """One optimizer + scheduler step; a NaN/Inf gradient changes no state (counted)."""
        from galore_ds.train.optim import clip_full_gradients, is_galore

        opt = self.optimizer
        if is_galore(self.cfg):
            opt.step()
            skipped, norm = opt.overflow, opt.grad_norm
        else:
            norm = clip_full_gradients([p for p in self.model.parameters() if p.grad is not None], self.cfg)
            skipped = not math.isfinite(norm)
            if not skipped:
                opt.step()
        if skipped:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        else:
            self.scheduler.step()
        return norm

    def apply_recipe(self) -> None:
        """After a resume: the schedule and optimizer hyperparameters follow the recipe given
        now, not the checkpoint's (train/optim.py apply_recipe; docs/resume.md)."""
        from galore_ds.train.optim import apply_recipe

        # (the per-layer wrapper clips with the optimizer's clipping state: nothing else to set)
        apply_recipe(getattr(self, "basic_optimizer", self.optimizer), self.scheduler, self.cfg)

    def init_process_group(self) -> None:
        """The default process group (gloo on CPU, nccl on CUDA), once. Under torchrun
        restarts the store is namespaced by attempt (train/faults.py)."""
        import torch
        import torch.distributed as dist

        from galore_ds.train import faults

        if self.world_size == 1 or dist.is_initialized():
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size, timeout=TIMEOUT,
                                store=faults.elastic_store(self.world_size, TIMEOUT))

    def to_device(self, batch: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def mean_over_ranks(self, total: float, count: int) -> float:
        """sum(total) / sum(count) over all ranks (NaN when nothing was counted anywhere)."""
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            from galore_ds.layouts.comm import COMM

            t = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            COMM.record("loss_mean", t.numel() * t.element_size())
            dist.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        return total / count if count else math.nan

    def forward_loss(self, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The model's loss on one micro-batch (engines that wrap the model override it)."""
        return self.model(**self.to_device(batch)).loss

    def eval_loss(self, batches: list[dict[str, "torch.Tensor"]]) -> float:
        """Weighted mean over all ranks (data.loader.eval_batches: every rank runs the same
        number of forwards, padding ones weigh 0)."""
        import torch

        from galore_ds.train.data.loader import EVAL_WEIGHT

        module = self.model
        module.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for b in batches:
                    weight = float(b.get(EVAL_WEIGHT, 1.0))
                    loss = self.forward_loss({k: v for k, v in b.items() if k != EVAL_WEIGHT})
                    total += weight * float(loss)
                    count += int(weight)
        finally:
            module.train()
            self.after_eval()
        return self.mean_over_ranks(total, count)

    def after_eval(self) -> None:
        """Put the model back as training expects it (FSDP2: reshard)."""

    def galore_stats(self) -> dict[str, Any]:
        """Optimizer counters to log (refreshes, svd_failures, skipped steps, ...)."""
        opt = getattr(self, "optimizer", None)
        return {**dict(getattr(opt, "galore_stats", {}) or {}), "skipped_steps": self.skipped_steps}

    def memory_stats(self) -> dict[str, float]:
        import torch

        if torch.cuda.is_available():
            return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"mem_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # What keeps the process group alive after destroy_process_group (close() drops them): the
    # optimizer (its reduce group) and what references it; each engine adds what it holds.
    _HOLDS_PROCESS_GROUP: tuple[str, ...] = ("layerwise", "scheduler", "optimizer")

    def close(self) -> None:
        """Release the process group after a successful run, and with it gloo's worker threads.

        destroy_process_group does not stop gloo's threads while anything still references the
        group; they would live into interpreter exit. A thread that frees a collective's tensors
        just then (it needs the GIL to drop their Python objects) is killed inside a destructor
        and the process aborts ("terminate called without an active exception"): a finished run
        turned into a failed job. So the engine drops what it holds (the per-layer hooks first:
        the parameters would keep the optimizer) and collects it; the group's destructor, which
        releases the GIL, then joins the threads."""
        import gc

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its group down while a peer still uses it
            dist.destroy_process_group()
        if getattr(self, "layerwise", None) is not None:
            self.layerwise.remove()
        for name in self._HOLDS_PROCESS_GROUP:
            if name in vars(self):
                setattr(self, name, None)
        gc.collect()


def engine_class(mode: str) -> type[Engine]:
    """Resolve a registry name; EngineUnavailable if its module is missing."""
    if mode not in ENGINES:
        raise EngineUnavailable(f"engine.mode: unknown engine {mode!r}; use one of {sorted(ENGINES)} or auto")
    module_name, cls_name = ENGINES[mode].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name.startswith(e.name) or e.name == module_name):
            raise EngineUnavailable(f"engine.mode: the {mode!r} engine is not available ({module_name} is "
                                    "missing); use engine.mode=single or another engine") from None
        raise EngineUnavailable(f"engine.mode={mode!r} needs the {e.name!r} package, which is not installed; "
                                f"pip install it (see README: installation) or use another engine") from None
    return getattr(module, cls_name)


def make_engine(cfg: "Config", dist: "DistEnv") -> Engine:
    return engine_class(cfg.resolved_mode(dist))(cfg, dist)


__all__ = ["ENGINES", "Engine", "EngineUnavailable", "StepResult", "engine_class", "make_engine"]
