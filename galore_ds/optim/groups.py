"""Parameter groups for GaLore training of a transformer (what people expect by default).

- GaLore group: 2-D weights of nn.Linear modules whose qualified name contains one of
  `target_modules` (galore-torch's rule; default "attn" and "mlp" = every attention and MLP
  projection of a Hugging Face LLaMA). Weight decay `weight_decay`.
- "decay" group: every other parameter with 2 or more dims, i.e. the token embedding and
  lm_head (kept full-rank, as in the paper). Weight decay `weight_decay`.
- "no_decay" group: biases and norm weights (1-D): weight decay 0, as in nanoGPT and the
  Hugging Face Trainer.
Tied weights (lm_head sharing the embedding) appear once. Empty groups are dropped.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

DEFAULT_TARGET_MODULES = ("attn", "mlp")


def galore_matrix_names(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> list[str]:
    """Qualified names of the weights GaLore projects."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in mod_name for t in target_modules):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    weight_decay: float = 0.0,
    **galore_options: Any,
) -> list[dict[str, Any]]:
    """Groups for GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor (see module docstring).

    `galore_options` (refresh, signs, moments, stagger, ...) go into the GaLore group only.
    A matrix smaller than `rank` in either dimension is trained full-rank (there is nothing
    to save by projecting it).
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = set(galore_matrix_names(model, target_modules))
    galore, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if name in targets and len(shape) == 2 and min(shape) >= rank:
            galore.append(p)
        elif len(shape) >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    if not galore:
        raise ValueError(
            f"target_modules={list(target_modules)} matched no nn.Linear weight of at least "
            f"{rank} x {rank} in {type(model).__name__}: check the names (model.named_modules()) or rank"
        )
    groups = [
        dict(params=galore, name="galore", rank=rank, update_proj_gap=update_proj_gap,
             scale=scale, proj_type=proj_type, weight_decay=weight_decay, **galore_options),
        dict(params=decay, name="decay", weight_decay=weight_decay),
        dict(params=no_decay, name="no_decay", weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


def count_params(groups: list[dict[str, Any]]) -> dict[str, int]:
    """Parameter count per group name (for logs)."""
    return {g.get("name", str(i)): sum(p.numel() for p in g["params"]) for i, g in enumerate(groups)}


__all__ = ["param_groups", "galore_matrix_names", "count_params", "DEFAULT_TARGET_MODULES"]
