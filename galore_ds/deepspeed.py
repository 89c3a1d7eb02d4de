"""`galore_ds.deepspeed.initialize`: deepspeed.initialize with GaLore parameter groups by name.

    import galore_ds.deepspeed as gds
    engine, optimizer, _, scheduler = gds.initialize(model=model, config="ds_config.json")

Same arguments and return value as deepspeed.initialize. When the config's optimizer type is
GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor, its params carry `rank` and no
model_parameters are given, the parameter groups are built from module names
(galore_ds.param_groups: nn.Linear weights whose name contains one of `target_modules`,
default attn/mlp; embeddings and lm_head full-rank; 1-D params without weight decay),
exactly like the single-process recipe. Plain `deepspeed.initialize` with the same JSON also
works after `import galore_ds` (then the GaLore group is chosen by shape, see
galore_ds.distributed.deepspeed).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from galore_ds.distributed.deepspeed import JSON_NAMES, register
from galore_ds.optim.base import GALORE_OPTION_DEFAULTS
from galore_ds.optim.groups import DEFAULT_TARGET_MODULES, param_groups

_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def _load(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    return dict(config)


def galore_param_groups(model, optimizer_params: dict) -> list[dict]:
    """Name-based groups from a JSON optimizer `params` dict (rank, target_modules, ...)."""
    p = dict(optimizer_params)
    kwargs = {k: p[k] for k in _GROUP_KEYS if k in p}
    kwargs["target_modules"] = tuple(p.get("target_modules", DEFAULT_TARGET_MODULES))
    kwargs["weight_decay"] = p.get("weight_decay", 0.0)
    opts = {k: p[k] for k in GALORE_OPTION_DEFAULTS if k in p}
    return param_groups(model, **kwargs, **opts)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None,
               config_params=None, **kwargs):
    """deepspeed.initialize, with GaLore groups built by module name (see module docstring)."""
    import deepspeed

    register()
    cfg = _load(config if config is not None else config_params)
    opt_cfg = (cfg or {}).get("optimizer") or {}
    params = dict(opt_cfg.get("params") or {})
    if (optimizer is None and model_parameters is None and model is not None
            and opt_cfg.get("type") in JSON_NAMES and "rank" in params):
        model_parameters = galore_param_groups(model, params)
        # the groups carry the GaLore keys; the optimizer keeps lr, betas, ... as defaults
        params.pop("target_modules", None)
        cfg = dict(cfg)
        cfg["optimizer"] = dict(opt_cfg, params=params)
    if cfg is not None:
        kwargs["config"] = cfg
    return deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                model_parameters=model_parameters, **kwargs)


__all__ = ["initialize", "galore_param_groups", "register"]
