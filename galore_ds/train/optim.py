"""Optimizer from the recipe (shared by engines)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from galore_ds.config import Config


def galore_options(cfg: Config) -> dict[str, Any]:
    g = cfg.galore
    opts = dict(refresh=g.refresh, signs=g.signs, moments=g.moments, stagger=g.stagger, seed=g.seed)
    if g.refresh == "randomized":
        opts.update(oversample=g.oversample, power_iters=g.power_iters, first_power_iters=g.first_power_iters)
    return opts


def build_param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    from galore_ds import param_groups

    g, t = cfg.galore, cfg.training
    if not g.enabled:
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        return [dict(params=decay, name="decay", weight_decay=t.weight_decay),
                dict(params=no_decay, name="no_decay", weight_decay=0.0)]
    return param_groups(model, rank=g.rank, update_proj_gap=g.update_proj_gap, scale=g.scale,
                        proj_type=g.proj_type, target_modules=tuple(g.target_modules),
                        weight_decay=t.weight_decay, **galore_options(cfg))


def build_optimizer(groups: list[dict[str, Any]], cfg: Config,
                    classes: Mapping[str, type] | None = None, **extra: Any) -> torch.optim.Optimizer:
    """`training.optimizer` built from the recipe. `classes` maps galore_adamw /
    galore_adamw8bit / galore_adafactor to the engine's variants (default: the single-process
    optimizers); `extra` keywords go to the GaLore optimizers only."""
    from galore_ds import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

    classes = {"galore_adamw": GaLoreAdamW, "galore_adamw8bit": GaLoreAdamW8bit,
               "galore_adafactor": GaLoreAdafactor, **(classes or {})}
    t = cfg.training
    betas = (t.beta1, t.beta2)
    if t.optimizer == "adamw":
        groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer in ("galore_adamw", "galore_adamw8bit"):
        return classes[t.optimizer](groups, lr=t.lr, betas=betas, eps=t.eps,
                                    weight_decay=t.weight_decay, **extra)
    if t.optimizer == "galore_adafactor":
        # A fixed LR so the warmup/cosine schedule applies (Adafactor's relative step would ignore it).
        return classes[t.optimizer](groups, lr=t.lr, relative_step=False, scale_parameter=False,
                                    weight_decay=t.weight_decay, **extra)
    raise ValueError(f"training.optimizer: {t.optimizer!r}")
