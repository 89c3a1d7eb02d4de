"""The DeepSpeed engine: ZeRO 0/1/2/3 (fp32, bf16, fp16 at stage >= 1) + the public GaLore
optimizers, which DeepSpeed's wrappers drive (galore_ds/integrations/deepspeed.py).

    deepspeed --num_gpus N launch/train.py --config configs/<recipe>.json --set engine.mode=deepspeed
    mpirun -n N python launch/train.py --config configs/<recipe>.json --set engine.mode=deepspeed

- engine.deepspeed is DeepSpeed's own JSON (zero_optimization, bf16, ...); this engine fills
  what the recipe owns: micro batch, accumulation (global_batch / (micro * W)), the
  optimizer (the recipe's, on name-based groups, as a client optimizer) and clipping: the
  GaLore optimizers clip by the norm of what they consume, so DeepSpeed's own
  gradient_clipping is 0 for them (the AdamW baseline gets training.grad_clip).
- One train_step = len(micro_batches) engine.backward/engine.step calls: DeepSpeed averages
  over the accumulation, reduces, steps the optimizer and the scheduler once at the boundary.
- Checkpoints: DeepSpeed's own (engine.save_checkpoint: a resume on the same world size and
  stage is bit-identical), plus a copy that does not depend on the layout
  (optim/checkpoint/ save_pieces: fp32 weights and GaLore state as pieces of whole
  tensors, by parameter): a resume on another world size or ZeRO stage loads that, puts the
  weights into every copy DeepSpeed keeps (fp32 masters, 16-bit partitions and parameters),
  and restores the schedule and DeepSpeed's step counters. fp16's dynamic loss scale restarts
  from its initial value there. DeepSpeed's elastic and universal checkpoint formats cannot hold
  GaLore's state: engine.deepspeed naming them is a recipe error.
- On CPU, DeepSpeed's shared-memory all-reduce leaves one buffer per rank in /dev/shm that it
  never unlinks; this engine unlinks its own at exit (however the process ends short of a kill).
"""
from __future__ import annotations

import atexit
import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from galore_ds.optim.checkpoint import load_pieces, load_torch_pieces, save_pieces, save_torch_pieces
from galore_ds.layouts.zero import read_zero_layout
from galore_ds.train import faults
from galore_ds.train.config import ConfigError
from galore_ds.train.engines.base import TIMEOUT, Engine, StepResult
from galore_ds.train.optim import build_optimizer, build_param_groups, is_galore, warmup_cosine

TAG = "galore_ds"
PIECES_DIR = "galore_state"
META = "engine_meta.pt"


def unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce buffer of this rank (/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<addr>_<port>_<rank>, named in deepspeed/ops/csrc/cpu/comm/shm.cpp): ~69 MB each
    launch never frees. Other ranks have it mapped already; unlinking only drops the name."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK"))
    if addr and port and rank is not None:
        path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
        try:
            path.unlink()
        except OSError:
            pass


class DeepSpeedEngine(Engine):
    # what holds the process group besides the optimizer: DeepSpeed's engine and the optimizer it wraps
    _HOLDS_PROCESS_GROUP = Engine._HOLDS_PROCESS_GROUP + ("_engine", "basic_optimizer")
    name = "deepspeed"

    def ds_config(self) -> dict[str, Any]:
        t = self.cfg.training
        c = copy.deepcopy(dict(self.cfg.engine.deepspeed))
        gas = self.accumulation
        c["train_micro_batch_size_per_gpu"] = t.micro_batch
        c["gradient_accumulation_steps"] = gas
        c["train_batch_size"] = t.micro_batch * gas * self.world_size
        c["gradient_clipping"] = 0.0 if is_galore(self.cfg) else t.grad_clip
        c.setdefault("steps_per_print", 10**9)
        c.pop("optimizer", None)  # the recipe's optimizer (training.optimizer, galore.*)
        c.pop("scheduler", None)  # the recipe's warmup + cosine
        mixed = any(isinstance(c.get(k), dict) and c[k].get("enabled") for k in ("bf16", "fp16"))
        if self.cfg.model.dtype == "bfloat16" and not mixed:
            c["bf16"] = {"enabled": True}  # bf16 weights: DeepSpeed keeps their fp32 masters
        return c

    def init_process_group(self) -> None:
        import deepspeed

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            store = faults.elastic_store(self.world_size, TIMEOUT)
            if store is not None:  # a torchrun restart: this attempt's keys only (faults.py)
                dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                        store=store, timeout=TIMEOUT)
            # adopts the group above if any; mpirun: DeepSpeed's MPI discovery sets MASTER_PORT
            # itself (from distributed_port)
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False,
                                       distributed_port=int(os.environ.get("MASTER_PORT", "29500")))

    def setup(self, model: nn.Module) -> None:
        import deepspeed

        from galore_ds.integrations.deepspeed import CheckpointFormatError, register

        register()
        self.init_process_group()
        if self.device.type == "cpu":
            atexit.register(unlink_shm_buffer)
        config = self.ds_config()
        self.check_config(config)
        optimizer = build_optimizer(build_param_groups(model, self.cfg), self.cfg)
        scheduler = warmup_cosine(optimizer, self.cfg)
        try:
            self._engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        except CheckpointFormatError as e:  # a format that cannot hold GaLore's state: a recipe error
            raise ConfigError("engine.deepspeed", e.problem,
                              "remove it: this engine's checkpoints resume bit-identically on the same world "
                              "size, and on another world size or stage through their galore_state copy") from None
        self.basic_optimizer = optimizer

    @staticmethod
    def check_config(config: dict[str, Any]) -> None:
        """DeepSpeed's own parse of engine.deepspeed, before anything is built: a bad section
        is one line naming the key, not a traceback from inside deepspeed.initialize."""
        from deepspeed.runtime.config import DeepSpeedConfig

        try:
            DeepSpeedConfig(copy.deepcopy(config))
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types for a bad config
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError("engine.deepspeed", f"DeepSpeed refuses it: {line}",
                              "fix the section (https://www.deepspeed.ai/docs/config-json/)") from None

    @property
    def model(self) -> nn.Module:
        return self._engine.module

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._engine(**{k: v.to(self._engine.device) for k, v in batch.items()}).loss

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        eng = self._engine
        if len(micro_batches) != eng.gradient_accumulation_steps():
            raise ValueError(f"{len(micro_batches)} micro-batches; DeepSpeed was set up for "
                             f"{eng.gradient_accumulation_steps()}")
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else math.nan
        # the AdamW baseline at fp32 ZeRO-0 has no DeepSpeed wrapper to report the norm:
        # measure it at the boundary, where the gradients are all-reduced and not yet clipped
        own_norm = (not is_galore(self.cfg) and eng.zero_optimization_stage() == 0
                    and not (eng.fp16_enabled() or eng.bfloat16_enabled()))
        total, norm, skipped_before = 0.0, None, int(getattr(eng, "skipped_steps", 0))
        for i, mb in enumerate(micro_batches):
            loss = self.forward_loss(mb)
            eng.backward(loss)
            if own_norm and i == len(micro_batches) - 1:
                norm = torch.nn.utils.get_total_norm([p.grad for p in eng.module.parameters() if p.grad is not None])
            eng.step()
            total += float(loss.detach())
        self.skipped_steps = int(getattr(eng, "skipped_steps", 0))
        if self.skipped_steps > skipped_before:
            norm = math.inf  # DeepSpeed's wrappers skip a NaN/Inf step before the optimizer runs
        elif is_galore(self.cfg):
            norm = self.basic_optimizer.grad_norm
        elif norm is None:
            norm = eng.get_global_grad_norm()
        return StepResult(loss=self.mean_over_ranks(total, len(micro_batches)),
                          grad_norm=float(norm) if norm is not None else math.nan, lr=lr,
                          extra={"skipped_steps": self.skipped_steps})

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        eng = self._engine
        eng.save_checkpoint(str(directory), tag=TAG)
        if is_galore(self.cfg):
            save_pieces(self.basic_optimizer, str(directory / PIECES_DIR), self.rank)
        else:
            save_torch_pieces(self.basic_optimizer, self.torch_binding(), str(directory / PIECES_DIR), self.rank)
        if self.is_main:
            torch.save({"world_size": self.world_size, "stage": eng.zero_optimization_stage(),
                        "scheduler": self.scheduler.state_dict(), "global_steps": eng.global_steps,
                        "global_samples": eng.global_samples, "skipped_steps": eng.skipped_steps,
                        "next_clip_coef": getattr(self.basic_optimizer, "next_clip_coef", 1.0)},
                       directory / META)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta = torch.load(directory / META, weights_only=True) if (directory / META).exists() else None
        same = meta is None or (meta["world_size"] == self.world_size
                                and meta["stage"] == self._engine.zero_optimization_stage())
        if meta is not None and hasattr(self.basic_optimizer, "next_clip_coef"):
            self.basic_optimizer.next_clip_coef = float(meta.get("next_clip_coef", 1.0))
        if same:
            path, _ = self._engine.load_checkpoint(str(directory), tag=TAG)
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/{TAG}")
            return
        self.load_elsewhere(directory, meta)

    def torch_binding(self):
        """The ZeRO layout of the AdamW baseline's flat partitions (GaLore optimizers hold theirs)."""
        eng = self._engine
        wrapper = eng.optimizer if eng.optimizer is not self.basic_optimizer else None
        return read_zero_layout(wrapper, eng.zero_optimization_stage())

    def load_elsewhere(self, directory: Path, meta: dict) -> None:
        """A checkpoint from another world size or ZeRO stage: the layout-independent copy."""
        eng, opt = self._engine, self.basic_optimizer
        if is_galore(self.cfg):
            binding = opt.zero
            full = load_pieces(opt, str(directory / PIECES_DIR))
        else:
            binding = self.torch_binding()
            full = load_torch_pieces(opt, binding, str(directory / PIECES_DIR))
        wrapper = eng.optimizer
        if binding is not None:
            for ft in binding.flats.values():
                for seg in ft.segments:  # ZeRO-1/2 keep whole 16-bit parameters on every rank
                    if seg.key in full and seg.param is not None and seg.param.numel() == full[seg.key].numel():
                        seg.param.data.copy_(full[seg.key].view_as(seg.param).to(seg.param.dtype))
            for ft in binding.flats.values():
                if ft.copy_back is not None:
                    ft.copy_back()
        elif hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):  # FP16_UnfusedOptimizer
            for lg, hg in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lp, hp in zip(lg, hg):
                    lp.data.copy_(hp.data.to(lp.dtype))
        self.scheduler.load_state_dict(meta["scheduler"])
        eng.global_steps, eng.global_samples = int(meta["global_steps"]), int(meta["global_samples"])
        eng.skipped_steps = int(meta["skipped_steps"])

    def galore_stats(self) -> dict[str, Any]:
        return {**dict(getattr(self.basic_optimizer, "galore_stats", {}) or {}),
                "skipped_steps": self.skipped_steps}


__all__ = ["DeepSpeedEngine"]
