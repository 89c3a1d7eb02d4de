"""The engine protocol: what the train loop asks of a way to run a training step.

The loop (trainer.py) owns data, logging, evaluation cadence and checkpoint layout; an engine
owns everything that depends on how parameters live: wrapping/sharding the model, the
optimizer and LR scheduler, gradient accumulation, clipping, the step, its own state on disk,
and every collective. The loop never calls torch.distributed itself, so one loop serves the
single-process, per-layer (24 GB), DeepSpeed ZeRO and FSDP2 engines.

Adding an engine is one line in ENGINES ("name": "module:Class"); a module that does not exist
yet makes `make_engine` raise EngineUnavailable, which launch/train.py turns into exit 2.

Contract (all engines):
  - constructed as Engine(cfg, dist) with the validated Config and the DistEnv read from the
    launcher's environment; `setup(model)` is called once, before any step or `load`.
    The model arrives on the meta device when `wants_meta_model` is True (large models:
    the engine materialises it, e.g. after sharding, with `galore_ds.model.materialize`);
    otherwise on CPU in cfg.model.dtype.
  - `train_step(micro_batches)`: one optimizer step over this rank's micro-batches
    (len == cfg accumulation steps; each a dict with input_ids and labels, [micro_batch, seq]).
    Gradients are accumulated over ALL micro-batches, clipped once (cfg.training.grad_clip,
    0 = off), the optimizer steps once and the scheduler steps once. Returns a StepResult
    whose loss is the mean over every micro-batch of every rank and whose grad_norm is the
    global pre-clip norm (identical on all ranks); lr is the LR the step used.
  - `eval_loss(batches)`: mean loss over this rank's batches averaged across ranks, no grads.
  - `save(dir)` / `load(dir)`: this rank's model + optimizer + scheduler state, written under an
    existing directory (the loop makes it, atomically renames it afterwards, and stores data
    position and RNG itself). Files must load with torch.load(weights_only=True).
  - `barrier()` and `broadcast_object(obj)` are the only collectives the loop needs.
  - `memory_stats()`: {"mem_gb": ..., ...} peak memory of this rank (device when available).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep this module cheap to import
    import torch
    from torch import nn

    from galore_ds.config import Config, DistEnv

# name -> "module:Class". One line per engine. Modules that do not exist yet are reported as
# unavailable (exit 2 with a clear line), not as a crash.
ENGINES: dict[str, str] = {
    "single": "galore_ds.train.engine_single:SingleEngine",
    "layerwise": "galore_ds.train.engine_layerwise:LayerwiseEngine",
    "deepspeed": "galore_ds.train.engine_deepspeed:DeepSpeedEngine",
    "fsdp": "galore_ds.train.engine_fsdp:FSDPEngine",
}


class EngineUnavailable(Exception):
    """The recipe names an engine whose implementation is not installed/landed yet."""


@dataclass
class StepResult:
    loss: float            # mean over all micro-batches of all ranks
    grad_norm: float       # global L2 norm before clipping (nan if the engine cannot compute it)
    lr: float              # learning rate used by this step (first param group)
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific numbers to log


class Engine(ABC):
    """Base class of every engine (see the module docstring for the contract)."""

    name: str = "abstract"
    wants_meta_model: bool = False  # True: setup() receives a meta-device model to materialise

    def __init__(self, cfg: "Config", dist: "DistEnv") -> None:
        self.cfg = cfg
        self.dist = dist

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @abstractmethod
    def setup(self, model: "nn.Module") -> None:
        """Wrap/shard the model, build optimizer + scheduler."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict[str, "torch.Tensor"]]) -> StepResult:
        """Accumulate over micro_batches, clip, optimizer.step() and scheduler.step() once."""

    @abstractmethod
    def eval_loss(self, batches: list[dict[str, "torch.Tensor"]]) -> float:
        """Mean loss over batches, averaged across ranks; no gradients, model left in train mode."""

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

    def galore_stats(self) -> dict[str, Any]:
        """Optimizer counters to log (refreshes, svd_failures, ...)."""
        return {}

    def memory_stats(self) -> dict[str, float]:
        import torch

        if torch.cuda.is_available():
            return {"mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return {"mem_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}

    def barrier(self) -> None:
        """Single-process engines: nothing to wait for."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's obj on every rank (single-process engines: obj itself)."""
        return obj

    def close(self) -> None:
        """Release the process group after a successful run. An interpreter exit that finds
        gloo's worker threads alive can abort ("terminate called without an active
        exception") and turn a finished run into a failed job."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def engine_class(mode: str) -> type[Engine]:
    """Resolve a registry name; EngineUnavailable if its module has not landed."""
    if mode not in ENGINES:
        raise EngineUnavailable(
            f"engine.mode: unknown engine {mode!r}; use one of {sorted(ENGINES)} or auto")
    module_name, cls_name = ENGINES[mode].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name) or e.name == module_name:
            raise EngineUnavailable(
                f"engine.mode: the {mode!r} engine is not available yet ({module_name} is missing); "
                f"use engine.mode=single (one process) or another engine") from None
        raise  # a missing dependency inside the engine: a real error, show it
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise EngineUnavailable(
            f"engine.mode: {module_name} has no {cls_name} yet; use engine.mode=single")
    return cls


def make_engine(cfg: "Config", dist: "DistEnv") -> Engine:
    return engine_class(cfg.resolved_mode(dist))(cfg, dist)


__all__ = ["ENGINES", "Engine", "EngineUnavailable", "StepResult", "engine_class", "make_engine"]
