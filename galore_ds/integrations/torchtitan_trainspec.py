"""torchtitan 0.2 (TrainSpec's build_optimizers_fn): the GaLore optimizers as an optimizers container.
torchtitan 0.3 and later: galore_ds.integrations.torchtitan.

    import functools
    from galore_ds.integrations.torchtitan_trainspec import build_galore_optimizers
    spec = dataclasses.replace(get_train_spec("llama3"),
                               build_optimizers_fn=functools.partial(build_galore_optimizers,
                                                                     galore=dict(rank=256, update_proj_gap=200)))
    register_train_spec(spec)   # then train with that spec's name as usual

`build_galore_optimizers` has torchtitan's `build_optimizers` signature (model_parts,
optimizer_config, parallel_dims, ft_manager); lr, beta1/beta2, eps and weight_decay come from
the job's [optimizer] section, and its name picks the class (AdamW, AdamW8bit, Adafactor:
relative_step=False, so the job's lr and its schedule apply).
GaLore groups are built by module name (default targets: torchtitan's LLaMA `attention` and
`feed_forward`), one optimizer per model part, each reading the FSDP2/HSDP placements of its
parameters. The container is Stateful like torchtitan's: state_dict() is a flat dict keyed by
parameter name (galore_ds's form, optim/checkpoint/: each rank's blocks of the low-rank
moments as DTensors), so DCP saves every rank's and reshards them. A fresh optimizer's state is
created first with a zero-gradient, lr-0 step; the GaLore optimizers recognise it and create
placeholders only (no projector from zeros, step stays 0).
Keys torchtitan may put in groups or kwargs (fused, foreach, param_names) are accepted.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from galore_ds.core.groups import OPTIMIZER_WIDE_KEYS, param_groups
from galore_ds.optim.checkpoint import create_state, load_optim_state_dict, optim_state_dict
from galore_ds.optim.step import GaLoreOptimizer
from galore_ds.optim import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

NAMES = {"AdamW": GaLoreAdamW, "Adam": GaLoreAdamW, "AdamW8bit": GaLoreAdamW8bit, "Adafactor": GaLoreAdafactor,
         "Fira": FiraAdamW, "Apollo": ApolloAdamW}
# torchtitan's module names (LLaMA 3, Qwen 3, ...): layers.N.attention.wq, layers.N.feed_forward.w1;
# the GaLore targets of both torchtitan APIs (the other defaults: core/settings.py)
TORCHTITAN_TARGETS = ("attention", "feed_forward")


class TrainSpecOptimizersContainer(torch.optim.Optimizer, Stateful):
    """One GaLore optimizer per model part behind torchtitan's container interface."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls: type[GaLoreOptimizer],
                 optimizer_kwargs: dict[str, Any], galore: dict[str, Any]) -> None:
        galore = dict(galore)
        targets = tuple(galore.pop("target_modules", TORCHTITAN_TARGETS))
        decay = optimizer_kwargs.get("weight_decay", 0.0)
        kwargs = {k: v for k, v in optimizer_kwargs.items() if k not in ("fused", "foreach", "implementation")}
        # max_grad_norm / clip_timing in `galore` hold for the whole optimizer: its constructor's
        kwargs.update({k: galore.pop(k) for k in OPTIMIZER_WIDE_KEYS if k in galore})
        self.model_parts = model_parts
        self.optimizers = [optimizer_cls(param_groups(part, target_modules=targets, weight_decay=decay, **galore),
                                         **kwargs) for part in model_parts]
        # torchtitan's container calls Optimizer.__init__ too (hooks); its schedulers step the
        # optimizers it iterates over, so the groups here are only a view of theirs
        torch.optim.Optimizer.__init__(self, [p for part in model_parts for p in part.parameters()
                                              if p.requires_grad], dict(kwargs))

    def __iter__(self):
        return iter(self.optimizers)

    def __len__(self) -> int:
        return len(self.optimizers)

    def step(self, *args: Any, **kwargs: Any) -> None:
        for opt in self.optimizers:
            opt.step(*args, **kwargs)

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        for opt in self.optimizers:
            opt.zero_grad(*args, **kwargs)

    # galore_ds's flat form (optim/checkpoint/), not torch's get_optimizer_state_dict: under
    # FSDP2 each rank holds its own rows of the low-rank moments as plain tensors, which DCP
    # would save from one rank only; here they are DTensor blocks, saved from all and resharded.
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, opt in enumerate(self.optimizers):
            create_state(opt)
            out.update(optim_state_dict(opt, prefix=f"part{i}."))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, opt in enumerate(self.optimizers):
            load_optim_state_dict(opt, state_dict, prefix=f"part{i}.")


def build_galore_optimizers(model_parts: list[nn.Module], optimizer_config: Any, parallel_dims: Any = None,
                            ft_manager: Any = None, *, galore: dict[str, Any] | None = None) -> TrainSpecOptimizersContainer:
    """torchtitan's build_optimizers, for GaLore (see the module docstring). `galore`: rank,
    update_proj_gap, scale, proj_type, target_modules, the GaLore options (refresh, ...) and
    the optimizer's own max_grad_norm / clip_timing (torchtitan's trainer also clips the full
    gradients by its training.max_norm before the step)."""
    name = getattr(optimizer_config, "name", "AdamW")
    if name not in NAMES:
        raise ValueError(f"optimizer.name={name!r}: galore_ds provides {sorted(NAMES)}")
    if getattr(optimizer_config, "early_step_in_backward", False):
        raise ValueError("optimizer.early_step_in_backward: use galore_ds.LayerwiseOptimizer for per-layer "
                         "GaLore updates (one optimizer per parameter would refresh each projector alone)")
    if ft_manager is not None and getattr(ft_manager, "enabled", False):
        raise ValueError("torchft: not supported by the GaLore container; disable fault_tolerance")
    kwargs: dict[str, Any] = {"lr": optimizer_config.lr, "weight_decay": getattr(optimizer_config, "weight_decay", 0.0)}
    if NAMES[name] is GaLoreAdafactor:
        # torchtitan always gives an lr (its schedulers scale it): Adafactor's own relative
        # step would ignore it, and refuses an lr beside it. As the 0.3 container does.
        kwargs["relative_step"] = False
    else:
        kwargs.update(betas=(getattr(optimizer_config, "beta1", 0.9), getattr(optimizer_config, "beta2", 0.95)),
                      eps=getattr(optimizer_config, "eps", 1e-8))
    return TrainSpecOptimizersContainer(model_parts, NAMES[name], kwargs, galore or {})


__all__ = ["TrainSpecOptimizersContainer", "build_galore_optimizers"]
