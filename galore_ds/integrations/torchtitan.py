"""torchtitan (0.3 and later): the GaLore optimizers by name inside torchtitan's own container.

    from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, galore_param_groups

    config = llama3_debugmodel()                       # any torchtitan Trainer.Config
    config.optimizer = GaLoreOptimizersContainer.Config(
        param_groups=galore_param_groups(lr=8e-4, rank=256, update_proj_gap=200))

torchtitan builds its optimizers from `OptimizersContainer.Config.param_groups`: regex patterns
over parameter names, each with an optimizer name and its keyword arguments; groups that name
the same optimizer become one optimizer instance. `GaLoreOptimizersContainer` is that container
with more names, "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "FiraAdamW" and "ApolloAdamW"
(APOLLO-Mini: "ApolloAdamW" with rank 1, scale_type "tensor", scale 128); the rest (the
schedulers, the implementation keys `fused`/`foreach` and `param_names` it puts in every group,
other optimizers' state) is torchtitan's. Its state_dict stays flat and keyed by parameter name
for DCP, but the GaLore optimizers' part is galore_ds's own (optim/checkpoint/): under
FSDP2 each rank holds its own rows of the low-rank moments, which torchtitan's form would save
from one rank only.
`galore_param_groups` writes the three patterns `galore_ds.param_groups` builds by module name:
the attention and feed-forward weights projected, norms and biases without weight decay, the
rest (embeddings, output) full-rank with it.

Clipping: torchtitan's Trainer clips every step, before the container steps, with its
dist_utils.clip_grad_norm_ over the model's parameters at `training.max_norm` (default 1.0):
the full gradients, by their global norm (DTensor norms completed over the mesh), as
torch.nn.utils.clip_grad_norm_ does in a plain loop, and the GaLore optimizers then consume the
clipped gradients. Set it high (or inf) to leave clipping to the optimizer: `max_grad_norm` and
`clip_timing` given to galore_param_groups reach the optimizer's constructor (they hold for the
whole optimizer, so the container takes them out of the groups; groups of one optimizer that
disagree are refused). Both equal the plain loop with the same clip, on FSDP2 too
(tests/test_torchtitan.py).

torchtitan creates a fresh optimizer's state before a checkpoint save or load with one
zero-gradient, lr-0 step (`init_optim_state`); the GaLore optimizers recognise it and create
placeholders only (no projector computed from zeros, the step count stays 0).

torchtitan 0.2's TrainSpec API (`build_optimizers_fn`): galore_ds.integrations.torchtitan_trainspec.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from torch.optim import Optimizer

try:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.components.optimizer.utils import (
        get_flat_optim_state_dict, init_optim_state, load_flat_optim_state_dict)
except ImportError:
    raise ImportError("galore_ds.integrations.torchtitan needs torchtitan >= 0.3: pip install 'galore_ds[torchtitan]' "
                      "(torchtitan 0.2's TrainSpec API: galore_ds.integrations.torchtitan_trainspec)") from None

from galore_ds.core.groups import GALORE_OPTION_DEFAULTS, OPTIMIZER_WIDE_KEYS
from galore_ds.core.settings import DEFAULTS
from galore_ds.integrations.torchtitan_trainspec import TORCHTITAN_TARGETS
from galore_ds.optim.checkpoint import create_state, load_optim_state_dict, optim_state_dict
from galore_ds.optim.step import GaLoreOptimizer
from galore_ds.optim import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "GaLoreAdamW": GaLoreAdamW, "GaLoreAdamW8bit": GaLoreAdamW8bit, "GaLoreAdafactor": GaLoreAdafactor,
    "FiraAdamW": FiraAdamW, "ApolloAdamW": ApolloAdamW}


class GaLoreOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer that also builds the galore_ds optimizers by name."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., Optimizer]:
        if name in OPTIMIZERS:
            return functools.partial(_build_with_optimizer_wide_keys, name)
        return OptimizersContainer._resolve_optimizer_factory(name)

    # torchtitan's flat state dict holds each rank's state tensors as plain tensors, which DCP
    # saves once, from one rank: right for AdamW's DTensor moments, wrong for GaLore's moments
    # of this rank's rows of R. The GaLore optimizers' state goes through galore_ds's own flat
    # form instead (blocks of R as DTensors, so DCP keeps every rank's and reshards them).
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, opt in enumerate(self.optimizers):
            if isinstance(opt, GaLoreOptimizer):
                create_state(opt)
                out.update(optim_state_dict(opt, prefix=f"galore_ds.{i}."))
            else:
                init_optim_state(opt)
                out.update(get_flat_optim_state_dict(opt))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for i, opt in enumerate(self.optimizers):
            if isinstance(opt, GaLoreOptimizer):
                load_optim_state_dict(opt, state_dict, prefix=f"galore_ds.{i}.")
            else:
                init_optim_state(opt)
                load_flat_optim_state_dict(opt, state_dict)


def _build_with_optimizer_wide_keys(name: str, groups: list[dict[str, Any]], **factory_kwargs: Any) -> Optimizer:
    """OPTIMIZERS[name] on torchtitan's groups. torchtitan passes every ParamGroupConfig's
    optimizer_kwargs as group keys, but max_grad_norm, clip_timing and reduce_group are
    constructor arguments of the whole optimizer (one global norm): taken out of the groups,
    where every group of the optimizer must give the same value, and passed to the constructor."""
    wide: dict[str, Any] = {}
    for key in OPTIMIZER_WIDE_KEYS:
        values = [g[key] for g in groups if key in g]
        if not values:
            continue
        if len(values) != len(groups) or any(v != values[0] for v in values) or key in factory_kwargs:
            raise ValueError(f"{key} is optimizer-wide (a constructor argument): give every {name} group the "
                             f"same {key} (galore_param_groups({key}=...) does), or set it once in "
                             f"optimizer_factory_kwargs_by_name={{{name!r}: {{{key!r}: ...}}}}")
        wide[key] = values[0]
    groups = [{k: v for k, v in g.items() if k not in wide} for g in groups]
    return OPTIMIZERS[name](groups, **wide, **factory_kwargs)


def galore_param_groups(lr: float, rank: int = DEFAULTS.rank, update_proj_gap: int | None = None,
                        scale: float | None = None, proj_type: str | None = None, optimizer: str = "GaLoreAdamW",
                        weight_decay: float = 0.0, target_modules: tuple[str, ...] = TORCHTITAN_TARGETS,
                        **optimizer_kwargs: Any) -> list[ParamGroupConfig]:
    """The ParamGroupConfigs for `GaLoreOptimizersContainer.Config(param_groups=...)`, first match
    wins: norm weights and biases (no weight decay), then weights of `target_modules` (GaLore
    at `rank`), then every other parameter (full-rank, `weight_decay`). `optimizer_kwargs` (betas,
    eps, refresh, ...) go to every group; GaLore options reach only the GaLore group; the
    optimizer-wide ones (max_grad_norm, clip_timing) reach the optimizer's constructor through
    GaLoreOptimizersContainer, which takes them out of the groups."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {sorted(OPTIMIZERS)}")
    common = {"lr": lr, **optimizer_kwargs}
    if optimizer == "GaLoreAdafactor":   # torchtitan gives every group an lr: use it, not Adafactor's own
        common.setdefault("relative_step", False)
    # unset GaLore keys are left to the optimizer, which takes them from core/settings.py
    galore = {"rank": rank, **{k: v for k, v in dict(update_proj_gap=update_proj_gap, scale=scale,
                                                      proj_type=proj_type).items() if v is not None}}
    options = {k: common.pop(k) for k in list(common) if k in GALORE_OPTION_DEFAULTS}
    targets = "|".join(target_modules)
    return [   # norms first: a norm inside attention (Qwen 3's q_norm) is 1-D, never projected
        ParamGroupConfig(pattern=r"(norm\.weight|\.bias)$", optimizer_name=optimizer,
                         optimizer_kwargs={**common, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=rf"(^|\.)({targets})\.(.+\.)?weight$", optimizer_name=optimizer,
                         optimizer_kwargs={**common, **galore, **options, "weight_decay": weight_decay}),
        ParamGroupConfig(pattern=r".*", optimizer_name=optimizer,
                         optimizer_kwargs={**common, "weight_decay": weight_decay}),
    ]


__all__ = ["GaLoreOptimizersContainer", "galore_param_groups", "OPTIMIZERS"]
