"""The recipe's optimizer, LR schedule and clipping, built the same way by every engine."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from galore_ds.core.settings import APOLLO_MINI, APOLLO_MINI_RANK
from galore_ds.train.config import Config


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
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = [(n, p) for n, p in named if p.ndim >= 2]
        no_decay = [(n, p) for n, p in named if p.ndim < 2]
        return [dict(params=[p for _, p in part], param_names=[n for n, _ in part], name=name, weight_decay=wd)
                for part, name, wd in ((decay, "decay", t.weight_decay), (no_decay, "no_decay", 0.0)) if part]
    # APOLLO's scale means another thing (the update times sqrt(scale)): its constructor's
    # default, or APOLLO-Mini's 128, not galore.scale; APOLLO-Mini is rank 1
    scale = {} if t.optimizer in ("apollo_adamw", "apollo_mini") else dict(scale=g.scale)
    rank = APOLLO_MINI_RANK if t.optimizer == "apollo_mini" else g.rank
    return param_groups(model, rank=rank, update_proj_gap=g.update_proj_gap,
                        proj_type=g.proj_type, target_modules=tuple(g.target_modules),
                        weight_decay=t.weight_decay, **scale, **galore_options(cfg))


def is_galore(cfg: Config) -> bool:
    return cfg.training.optimizer != "adamw"


def build_optimizer(groups: list[dict[str, Any]], cfg: Config, **layout: Any) -> torch.optim.Optimizer:
    """`training.optimizer` from the recipe. The GaLore optimizers clip by the global norm of
    what they consume (training.grad_clip) and skip NaN/Inf steps themselves; `layout`
    keywords (reduce_group) go to them only. The AdamW baseline is torch's: engines clip it
    with `clip_full_gradients`."""
    from galore_ds import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

    t = cfg.training
    betas = (t.beta1, t.beta2)
    clip = t.grad_clip if t.grad_clip > 0 else None
    layout = {"clip_timing": t.clip_timing, **layout}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "galore_adamw":
        return GaLoreAdamW(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay,
                           max_grad_norm=clip, **layout)
    if t.optimizer == "galore_adamw8bit":
        return GaLoreAdamW8bit(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay,
                               max_grad_norm=clip, **layout)
    if t.optimizer == "fira_adamw":
        return FiraAdamW(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay,
                         max_grad_norm=clip, **layout)
    if t.optimizer in ("apollo_adamw", "apollo_mini"):
        mini = APOLLO_MINI if t.optimizer == "apollo_mini" else {}
        return ApolloAdamW(groups, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay,
                           max_grad_norm=clip, **mini, **layout)
    if t.optimizer == "galore_adafactor":
        # A fixed LR so the warmup/cosine schedule applies (Adafactor's relative step would ignore it).
        return GaLoreAdafactor(groups, lr=t.lr, relative_step=False, scale_parameter=False,
                               weight_decay=t.weight_decay, max_grad_norm=clip, **layout)
    raise ValueError(f"training.optimizer: {t.optimizer!r}")


def clip_full_gradients(params: list[torch.Tensor], cfg: Config) -> float:
    """torch's clip_grad_norm_ for the AdamW baseline (an inf max only measures); returns the
    pre-clip global norm (exact on DTensor gradients too)."""
    clip = cfg.training.grad_clip
    return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf))


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: Config):
    from galore_ds.train.scheduler import warmup_cosine as schedule

    t = cfg.training
    return schedule(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)


# What a resume takes from the recipe it is given (docs/resume.md): the schedule and the
# optimizer's hyperparameters. What cannot change is refused before loading (train/faults.py).
RESUMABLE = ("training.lr", "training.warmup_steps", "training.steps", "training.min_lr_ratio",
             "training.beta1", "training.beta2", "training.eps", "training.weight_decay", "training.grad_clip",
             "training.clip_timing", "galore.update_proj_gap", "galore.scale")


def apply_recipe(optimizer: torch.optim.Optimizer, scheduler, cfg: Config) -> None:
    """After a checkpoint is loaded (torch's load_state_dict restores the SAVED lr, betas, decay
    and GaLore keys, and LambdaLR its saved base_lrs): put the recipe's values back, and the
    lr of the resumed step from the recipe's schedule at the saved step count."""
    t, g = cfg.training, cfg.galore
    for group in optimizer.param_groups:
        group["initial_lr"] = t.lr
        if "betas" in group:
            group["betas"] = (t.beta1, t.beta2)
        if "eps" in group and not isinstance(group["eps"], (tuple, list)):  # Adafactor's eps is a pair
            group["eps"] = t.eps
        group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else t.weight_decay
        if "rank" in group:
            group["update_proj_gap"] = g.update_proj_gap
            group["scale"] = g.scale
    if hasattr(optimizer, "max_grad_norm"):
        optimizer.max_grad_norm = t.grad_clip if t.grad_clip > 0 else None
        optimizer.clip_timing = t.clip_timing
    if scheduler is not None:
        scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
