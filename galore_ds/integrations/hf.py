"""Hugging Face Trainer: galore_ds optimizers built from module names, configured like TrainingArguments.

    from transformers import TrainingArguments
    from galore_ds.integrations.hf import GaLoreArguments, GaLoreTrainer

    args = TrainingArguments("out", learning_rate=1e-2, max_grad_norm=1.0, gradient_accumulation_steps=4)
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=ds,
                            galore=GaLoreArguments(rank=128, optimizer="adamw8bit", layerwise=True))
    trainer.train()                       # resume_from_checkpoint=... resumes bit-identically

What it does that transformers' own GaLore (optim="galore_adamw") does not:
- lr, betas (adam_beta1/2), eps (adam_epsilon) and weight_decay come from TrainingArguments
  (optimizer="adafactor": learning_rate with relative_step=False and scale_parameter=False, as
  transformers' own optim="adafactor"); the GaLore groups are the attention/MLP Linears by
  module name (`galore_ds.param_groups`), embeddings, lm_head and norms full-rank (norms and
  biases without weight decay).
- Per-layer mode (`layerwise=True`: each parameter updated inside backward, full gradients
  freed at once) works with gradient accumulation and on several ranks; an epoch that ends
  inside an accumulation window steps on the partial window, as the Trainer does without it.
- Several ranks without FSDP/DeepSpeed: the GaLore matrices' gradients cross the network
  low-rank. Per-layer: the optimizer averages projected gradients in asynchronous buckets
  (no DDP wrapper); otherwise DDP with galore_ds's communication hook, built with
  TrainingArguments' ddp_* options (find_unused_parameters, bucket_cap_mb, broadcast_buffers,
  static_graph) as Accelerate builds its DDP.
- DeepSpeed (ZeRO 0-3, no "optimizer" section in its JSON): the client optimizer is this one,
  bound to ZeRO's partitions (`galore_ds.integrations.deepspeed.register`). FSDP2: the
  optimizer reads each parameter's DTensor placement at every step, so Accelerate swapping
  the parameters after fully_shard needs nothing from it.

Clipping is the optimizer's (the same definition as launch/train.py: the global norm of what
the optimizer consumes, i.e. the projected gradients of GaLore matrices and the full ones of
the rest), with TrainingArguments.max_grad_norm and GaLoreArguments.clip_timing; the
Trainer's own full-gradient clipping, and DeepSpeed's (its "gradient_clipping", "auto" or
not), are switched off so that nothing is clipped twice. The logged grad_norm is that norm in
per-layer mode and the Trainer's full-gradient norm otherwise (the optimizer's is known only
after the step the Trainer logs it before).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from accelerate.utils import DDPCommunicationHookType
    from transformers import Trainer
except ImportError:  # the one line a user without the extra sees
    raise ImportError("galore_ds.integrations.hf needs transformers and accelerate: "
                      "pip install 'galore_ds[hf]'") from None

from galore_ds.core.groups import param_groups
from galore_ds.core.settings import APOLLO_MINI, APOLLO_MINI_RANK, DEFAULTS
from galore_ds.optim.layerwise import CLIP_TIMINGS, LayerwiseOptimizer
from galore_ds.optim.step import GaLoreOptimizer
from galore_ds.optim.lowrank_ddp import LowRankHookState, lowrank_comm_hook
from galore_ds.optim import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

OPTIMIZERS = {"adamw": GaLoreAdamW, "adamw8bit": GaLoreAdamW8bit, "adafactor": GaLoreAdafactor,
              "fira": FiraAdamW, "apollo": ApolloAdamW, "apollo_mini": ApolloAdamW}
# what a name sets besides its class: APOLLO-Mini is rank 1 with one scale per matrix
NAME_SETTINGS = {"apollo_mini": APOLLO_MINI}


@dataclass
class GaLoreArguments:
    """What TrainingArguments does not say: the GaLore recipe (the defaults of
    galore_ds/core/settings.py; `options` left out take them there too)."""

    rank: int = DEFAULTS.rank
    update_proj_gap: int = DEFAULTS.update_proj_gap
    scale: float = DEFAULTS.scale
    proj_type: str = DEFAULTS.proj_type
    target_modules: tuple[str, ...] = DEFAULTS.target_modules
    optimizer: str = "adamw"          # adamw | adamw8bit | adafactor | fira | apollo | apollo_mini
    layerwise: bool = False           # per-layer updates inside backward
    clip_timing: str = "exact"        # max_grad_norm with this step's norm, or "delayed": the previous step's
    options: dict[str, Any] = field(default_factory=dict)  # refresh, signs, moments, stagger, seed, ...

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"GaLoreArguments.optimizer={self.optimizer!r}: expected one of {sorted(OPTIMIZERS)}")
        if self.clip_timing not in CLIP_TIMINGS:
            raise ValueError(f"GaLoreArguments.clip_timing={self.clip_timing!r}: expected one of {CLIP_TIMINGS}")


class PerLayerStep(torch.optim.Optimizer):
    """The Trainer's optimizer in per-layer mode. The updates run inside backward
    (LayerwiseOptimizer, attached at the first training step, after every wrapping), so
    `step()` only checks that an accumulation window just ended; param_groups and state are
    the GaLore optimizer's own objects (the lr scheduler edits the groups that the updates
    read), and state_dict holds the window with them.

    torch.optim.Optimizer.__init__ is not called on purpose: it would build param groups of
    its own, and the scheduler must see the GaLore optimizer's."""

    def __init__(self, optimizer: GaLoreOptimizer) -> None:  # noqa: D107
        self.galore = optimizer
        self.defaults = optimizer.defaults
        self.layerwise: LayerwiseOptimizer | None = None
        self._window: dict[str, Any] | None = None   # a loaded window, until layerwise exists

    param_groups = property(lambda self: self.galore.param_groups,
                            lambda self, groups: setattr(self.galore, "param_groups", groups))
    state = property(lambda self: self.galore.state, lambda self, state: setattr(self.galore, "state", state))

    def attach(self, layerwise: LayerwiseOptimizer) -> None:
        self.layerwise = layerwise
        if self._window is not None:
            layerwise.load_window(self._window)
            self._window = None

    def step(self, closure: Any = None) -> None:
        # GaLoreTrainer.training_step ends the window on the micro-batch the Trainer syncs on
        # (a full window, or the partial one at an epoch's end), so none is open here
        if self.layerwise is not None and self.layerwise.micro_step != 0:
            raise RuntimeError("per-layer GaLore: the Trainer stepped inside an accumulation window; "
                               "step only through GaLoreTrainer's training loop")
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each full gradient is freed by its update."""

    def state_dict(self) -> dict[str, Any]:
        if self.layerwise is not None:
            return self.layerwise.state_dict()
        return {"optimizer": self.galore.state_dict(), "layerwise": self._window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layerwise is not None:
            self.layerwise.load_state_dict(state)
            return
        self.galore.load_state_dict(state["optimizer"])
        self._window = state.get("layerwise")


class Replicated(nn.Module):
    """Several ranks, per-layer mode: the whole model on every rank and no DDP wrapper (the
    optimizer averages the low-rank gradients itself). Rank 0's weights are broadcast once,
    as DDP does at construction."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class GaLoreTrainer(Trainer):
    """transformers.Trainer whose optimizer is a galore_ds optimizer (see the module docstring)."""

    def __init__(self, *args: Any, galore: GaLoreArguments | None = None, **kwargs: Any) -> None:
        self.galore = galore or GaLoreArguments()
        self._galore_optimizer: GaLoreOptimizer | None = None
        self._per_layer: PerLayerStep | None = None   # self.optimizer may be Accelerate's wrapper of it
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            if self.galore.layerwise:
                raise ValueError("GaLoreArguments.layerwise: DeepSpeed owns the gradients, so per-layer updates "
                                 "cannot run inside its backward; set layerwise=False (ZeRO partitions states)")
            from galore_ds.integrations.deepspeed import register

            register()
            # DeepSpeed would clip the full gradients before the optimizer clips what it consumes
            # (module docstring): its gradient_clipping, filled from max_grad_norm when "auto",
            # goes to 0 so the step is the one launch/train.py and the plain loop take.
            self.accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = 0.0

    @property
    def _replicated(self) -> bool:
        """Several ranks with neither FSDP nor DeepSpeed: galore_ds averages low-rank gradients."""
        return self.args.world_size > 1 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    @property
    def _max_grad_norm(self) -> float | None:
        """TrainingArguments.max_grad_norm as the optimizers take it (None: no clipping)."""
        clip = self.args.max_grad_norm
        return clip if clip and clip > 0 else None

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        a, g = self.args, self.galore
        apollo = g.optimizer in ("apollo", "apollo_mini")   # its scale means sqrt(scale) x the update
        groups = param_groups(self.model if model is None else model, rank=APOLLO_MINI_RANK if g.optimizer == "apollo_mini" else g.rank,
                              update_proj_gap=g.update_proj_gap, proj_type=g.proj_type,
                              target_modules=g.target_modules, weight_decay=a.weight_decay,
                              **({} if apollo else {"scale": g.scale}), **g.options)
        hyper: dict[str, Any] = {"lr": a.learning_rate, "weight_decay": a.weight_decay, **NAME_SETTINGS.get(g.optimizer, {})}
        if g.optimizer != "adafactor":
            hyper.update(betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon)
        else:
            # learning_rate and the Trainer's scheduler set the step size, as transformers' own
            # optim="adafactor" does (Adafactor's relative step would refuse the explicit lr)
            hyper.update(relative_step=False, scale_parameter=False)
        if not g.layerwise:
            hyper.update(max_grad_norm=self._max_grad_norm, clip_timing=g.clip_timing)
        if g.layerwise and self._replicated:
            hyper["reduce_group"] = dist.group.WORLD  # gradients are per-rank contributions
        self._galore_optimizer = OPTIMIZERS[g.optimizer](groups, **hyper)
        if g.layerwise:
            self._per_layer = PerLayerStep(self._galore_optimizer)
        self.optimizer = self._per_layer or self._galore_optimizer
        return self.optimizer

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        # Several plain ranks: not Accelerate's DDP (full gradients) but low-rank averaging.
        if not (training and self._replicated) or self.accelerator.unwrap_model(model) is not model:
            return super()._wrap_model(model, training, dataloader)
        if isinstance(model, Replicated | nn.parallel.DistributedDataParallel):
            return model
        # autocast and the rest of what Accelerate adds to a model, without its DDP wrapper
        model = self.accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
        if self.galore.layerwise:
            return Replicated(model)
        # TrainingArguments' ddp_* options (find_unused_parameters, bucket_cap_mb,
        # broadcast_buffers, static_graph), as the Trainer hands them to Accelerate and
        # Accelerate to DDP; the communication hook is galore_ds's, so Accelerate's is refused.
        handler = self.accelerator.ddp_handler
        if handler is not None and handler.comm_hook != DDPCommunicationHookType.NO:
            raise ValueError(f"DistributedDataParallelKwargs(comm_hook={handler.comm_hook.value!r}): GaLoreTrainer's "
                             "DDP sends low-rank gradients through galore_ds.lowrank_comm_hook; leave comm_hook unset")
        ddp = nn.parallel.DistributedDataParallel(model, **(handler.to_kwargs() if handler is not None else {}))
        ddp.register_comm_hook(LowRankHookState(self._galore_optimizer), lowrank_comm_hook)
        return ddp

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._per_layer is not None and self._per_layer.layerwise is None:
            # built here, after Accelerate/FSDP have put the final parameters in place: the
            # per-parameter hooks must sit on the tensors backward will produce
            self._per_layer.attach(LayerwiseOptimizer(self._galore_optimizer,
                                                     accumulation_steps=self.args.gradient_accumulation_steps,
                                                     max_grad_norm=self._max_grad_norm,
                                                     clip_timing=self.galore.clip_timing))
        lw = self._per_layer.layerwise if self._per_layer is not None else None
        # The Trainer says which micro-batch ends a window (sync_gradients, set before this call):
        # every gradient_accumulation_steps-th, and an epoch's last, which may close a partial
        # window (transformers scales that window's loss to its own mean: the per-layer sum
        # then equals what p.grad holds in the step-time Trainer).
        ends = self.accelerator.sync_gradients
        if lw is not None and not ends and lw.micro_step + 1 >= lw.accumulation_steps:
            raise RuntimeError(f"per-layer GaLore: the Trainer's accumulation window is longer than the "
                               f"{lw.accumulation_steps} micro-batches the optimizer was built for; "
                               "gradient_accumulation_steps changed after the optimizer was built")
        loss = super().training_step(model, inputs, num_items_in_batch)
        if lw is not None:
            lw.step(end_window=ends)
        return loss

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """The optimizer clips (module docstring); per-layer mode reports the norm it used."""
        if self._per_layer is not None and self._per_layer.layerwise is not None:
            return torch.tensor(self._per_layer.layerwise.grad_norm or 0.0)
        return None


__all__ = ["GaLoreArguments", "GaLoreTrainer", "PerLayerStep", "Replicated"]
