"""Parameter groups: which matrices GaLore projects, with what settings, and when it refreshes.

`param_groups(model)` builds what people expect by default:
- GaLore group: 2-D weights of nn.Linear modules whose qualified name contains one of
  `target_modules` (galore-torch's rule; default "attn" and "mlp" = every attention and MLP
  projection of a Hugging Face LLaMA), at `rank`.
- "decay" group: every other parameter with 2 or more dims, i.e. the token embedding and
  lm_head (kept full-rank, as in the paper).
- "no_decay" group: biases and norm weights (1-D): weight decay 0, as in nanoGPT and the
  Hugging Face Trainer.
Tied weights (lm_head sharing the embedding) appear once. Empty groups are dropped.

torch's rule holds: the optimizer's constructor keywords are the defaults of every group that
does not set a key, so `param_groups` writes only what its caller passed (and `rank`, which
selects the matrices, and the no_decay group's weight decay 0). A group is a GaLore group when
it sets `rank`; the GaLore keys it does not set come from the constructor, else from the
defaults below. `refresh_due` is the one refresh schedule every optimizer and engine uses.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from galore_ds.core import projector as pj
from galore_ds.core.settings import DEFAULTS, GROUP_KEYS, MOMENT_POLICIES, OPTION_KEYS, defaults_of

DEFAULT_TARGET_MODULES = DEFAULTS.target_modules

# Keys that make a GaLore group, with the defaults used when a group sets `rank` but not the
# others and the optimizer was given none (galore-torch needs all four). One source for every
# default: core/settings.py.
GALORE_GROUP_DEFAULTS: dict[str, Any] = defaults_of(GROUP_KEYS)
GALORE_KEYS = ("rank", *GALORE_GROUP_DEFAULTS)
# Optimizer-wide options beyond the paper; any group may override them.
GALORE_OPTION_DEFAULTS: dict[str, Any] = defaults_of(OPTION_KEYS)
# Constructor arguments that hold for the whole optimizer (one global norm, one clip timing, one
# reduction group), never per group: a group that sets one is refused (it would be ignored).
OPTIMIZER_WIDE_KEYS = ("max_grad_norm", "clip_timing", "reduce_group")


def check_galore_group(group: dict, moment_policies: Sequence[str], shapes: Sequence[tuple[int, ...]],
                       defaults: dict[str, Any] | None = None) -> None:
    """Fill the GaLore keys a group does not set from `defaults` (the optimizer's; by default
    GALORE_GROUP_DEFAULTS) and refuse bad values, naming the key. `shapes` are the GLOBAL
    shapes of its parameters."""
    for key, value in (GALORE_GROUP_DEFAULTS if defaults is None else defaults).items():
        group.setdefault(key, value)
    rank, gap = group["rank"], group["update_proj_gap"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"param group rank={rank!r}: must be an integer >= 1")
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise ValueError(f"param group update_proj_gap={gap!r}: must be an integer >= 1")
    pj.choose_side((1, 1), group["proj_type"])  # validates proj_type
    if group["refresh"] not in pj.REFRESH_METHODS:
        raise ValueError(f"refresh={group['refresh']!r}: expected one of {pj.REFRESH_METHODS}")
    if group["signs"] not in pj.SIGN_RULES:
        raise ValueError(f"signs={group['signs']!r}: expected one of {pj.SIGN_RULES}")
    if group["moments"] not in moment_policies:
        raise ValueError(f"moments={group['moments']!r}: this optimizer supports {tuple(moment_policies)}")
    for shape in shapes:
        if len(shape) != 2:
            raise ValueError(f"GaLore group holds a parameter of shape {tuple(shape)}: only 2-D matrices "
                             "can be projected; put it in a group without 'rank'")
        if rank > min(shape):
            raise ValueError(f"rank={rank} exceeds min{tuple(shape)}={min(shape)} for a GaLore matrix: "
                             "lower rank or leave this matrix out of the GaLore group")


def refresh_offset(group: dict, pos: int, n_in_group: int) -> int:
    """Step offset of matrix `pos` of a group within the update_proj_gap window: 0, or with
    stagger pos*gap/n, so no single step refreshes every layer (latency and memory spikes)."""
    return (pos * group["update_proj_gap"]) // max(n_in_group, 1) if group["stagger"] else 0


def refresh_due(state: dict, group: dict) -> bool:
    """A matrix refreshes at its first step and then every update_proj_gap steps from its
    offset. `state` holds "step" and "refresh_offset"."""
    step, offset = state["step"], state["refresh_offset"]
    if step == 0 or "proj" not in state:
        return True
    return step >= offset and (step - offset) % group["update_proj_gap"] == 0


def galore_matrix_names(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> list[str]:
    """Qualified names of the weights GaLore projects."""
    names = []
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in mod_name for t in target_modules):
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def global_shape(p: Any) -> tuple[int, ...]:
    """A parameter's full shape: DTensor.shape is global; DeepSpeed ZeRO-3 keeps ds_shape."""
    return tuple(getattr(p, "ds_shape", p.shape))


def param_groups(
    model: nn.Module,
    rank: int = DEFAULTS.rank,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    proj_type: str | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    weight_decay: float | None = None,
    **galore_options: Any,
) -> list[dict[str, Any]]:
    """Groups for GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor (see module docstring).

    Only the keys passed here are written (None: not written): the optimizer's keywords are
    the defaults of the rest, as torch's rule has it. `rank` is always written: it selects the
    matrices (a matrix smaller than `rank` in either dimension is trained full-rank: there is
    nothing to save by projecting it) and makes the group a GaLore group. `weight_decay` goes
    to the GaLore and "decay" groups; "no_decay" always has 0. `galore_options` (refresh,
    signs, moments, stagger, ...) go into the GaLore group only. Each group carries
    `param_names` (what torchtitan and DCP key by).
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = set(galore_matrix_names(model, target_modules))
    galore, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = global_shape(p)
        if name in targets and len(shape) == 2 and min(shape) >= rank:
            galore.append((name, p))
        elif len(shape) >= 2:
            decay.append((name, p))
        else:
            no_decay.append((name, p))
    if not galore:
        raise ValueError(
            f"target_modules={list(target_modules)} matched no nn.Linear weight of at least "
            f"{rank} x {rank} in {type(model).__name__}: check the names (model.named_modules()) or rank"
        )
    decay_key = {} if weight_decay is None else {"weight_decay": weight_decay}
    galore_keys = {k: v for k, v in dict(update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type).items()
                   if v is not None}

    def group(named, **keys):
        return dict(params=[p for _, p in named], param_names=[n for n, _ in named], **keys)

    groups = [
        group(galore, name="galore", rank=rank, **galore_keys, **decay_key, **galore_options),
        group(decay, name="decay", **decay_key),
        group(no_decay, name="no_decay", weight_decay=0.0),
    ]
    return [g for g in groups if g["params"]]


def count_params(groups: list[dict[str, Any]]) -> dict[str, int]:
    """Parameter count per group name (for logs)."""
    return {g.get("name", str(i)): sum(p.numel() for p in g["params"]) for i, g in enumerate(groups)}


__all__ = ["param_groups", "galore_matrix_names", "count_params", "DEFAULT_TARGET_MODULES",
           "GALORE_GROUP_DEFAULTS", "GALORE_OPTION_DEFAULTS", "GALORE_KEYS", "MOMENT_POLICIES",
           "OPTIMIZER_WIDE_KEYS",
           "check_galore_group", "refresh_due", "refresh_offset", "global_shape"]
