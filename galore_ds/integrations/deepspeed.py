"""DeepSpeed: the GaLore optimizers as DeepSpeed optimizer types, bound to ZeRO's layout.

    import galore_ds.integrations.deepspeed as gds
    gds.register()                                    # once, before deepspeed.initialize
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=galore_ds.GaLoreAdamW(groups),
                                             config=ds_config)
    # or, with "optimizer": {"type": "GaLoreAdamW", "params": {"rank": 128, ...}} in the JSON:
    engine, opt, _, _ = gds.initialize(model=model, config="ds_config.json")  # groups by module name

What `register()` changes outside galore_ds, and why (the only such place in the package;
explicit and idempotent):
1. torch.optim.GaLoreAdamW / GaLoreAdamW8bit / GaLoreAdafactor / FiraAdamW / ApolloAdamW become
   galore_ds's classes:
   DeepSpeed resolves a JSON "optimizer" type that is not one of its own with
   getattr(torch.optim, NAME)(model_parameters, **params).
2. deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS gains these classes, so ZeRO
   needs no "zero_allow_untested_optimizer".
3. DeepSpeedEngine._configure_optimizer is wrapped. DeepSpeed replaces the optimizer's
   parameters with flat partitions and never tells the optimizer how; after DeepSpeed has
   built its wrapper, the wrapper's layout is read (layouts/zero.py) and handed to the GaLore
   optimizer (`optimizer.zero`), or at ZeRO-0 its data-parallel group (`replica_group`: each
   SVD then runs once, on an owner). While DeepSpeed configures, GaLore optimizers ignore
   steps: FP16_UnfusedOptimizer and BF16_Optimizer take one on zero gradients to create
   states, which would compute projectors from zeros. A GaLore optimizer's param groups
   arriving in another optimizer class (Accelerate's swap to DeepSpeedCPUAdam under
   offload_optimizer) are refused with one line, as are the two DeepSpeed checkpoint formats
   that cannot hold GaLore's state (`refuse_checkpoint_formats`).
A GaLore optimizer that meets flat partitions without this binding refuses with one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from galore_ds.core.groups import DEFAULT_TARGET_MODULES, GALORE_KEYS, GALORE_OPTION_DEFAULTS, param_groups
from galore_ds.optim.step import GaLoreOptimizer, steps_ignored
from galore_ds.layouts.zero import read_zero_layout
from galore_ds.optim import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

# DeepSpeed JSON "optimizer": {"type": NAME}; APOLLO-Mini is ApolloAdamW with "rank": 1,
# "scale_type": "tensor", "scale": 128 in its params (docs/family.md)
JSON_NAMES = {"GaLoreAdamW": GaLoreAdamW, "GaLoreAdamW8bit": GaLoreAdamW8bit,
              "GaLoreAdafactor": GaLoreAdafactor, "FiraAdamW": FiraAdamW, "ApolloAdamW": ApolloAdamW}
_REGISTERED = False


def _require_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError("galore_ds.integrations.deepspeed needs DeepSpeed: "
                          "pip install 'galore_ds[deepspeed]'") from None
    return deepspeed


def register() -> None:
    """Make the GaLore optimizers DeepSpeed optimizer types (see the module docstring)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _require_deepspeed()
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    for name, cls in JSON_NAMES.items():
        setattr(torch.optim, name, cls)
        if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
            zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)
    Engine = ds_engine.DeepSpeedEngine
    configure = Engine._configure_optimizer

    def _configure_optimizer(self, client_optimizer, model_parameters):
        refuse_replaced_optimizer(client_optimizer)
        with steps_ignored():
            out = configure(self, client_optimizer, model_parameters)
        bind(self)
        return out

    Engine._configure_optimizer = _configure_optimizer
    _REGISTERED = True


def refuse_replaced_optimizer(client_optimizer: Any) -> None:
    """A GaLore optimizer's groups arriving in another optimizer class: something between the
    user and DeepSpeed replaced it. Accelerate does so, silently, when the DeepSpeed config
    offloads the optimizer (map_pytorch_optim_to_deepspeed builds DeepSpeedCPUAdam from the
    GaLore optimizer's param groups): GaLore would be gone without a word."""
    groups = getattr(client_optimizer, "param_groups", None)
    if isinstance(client_optimizer, GaLoreOptimizer) or not groups or not any("rank" in g for g in groups):
        return
    raise ValueError(
        f"DeepSpeed was handed a {type(client_optimizer).__name__} built from a GaLore optimizer's param "
        "groups (Accelerate replaces a client optimizer when zero_optimization.offload_optimizer is set): "
        "remove offload_optimizer from the DeepSpeed config; GaLore's optimizer states are already low-rank")


_PIECES = ("galore_ds.optim.checkpoint.save_pieces/load_pieces (which launch/train.py's deepspeed "
           "engine writes with every checkpoint) resume on another world size or stage")


class CheckpointFormatError(ValueError):
    """A DeepSpeed checkpoint format that cannot hold a GaLore optimizer's state: one line,
    '<problem>; <fix>' (launch/train.py reports it as a recipe error on engine.deepspeed)."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}")


def refuse_checkpoint_formats(engine, wrapper: Any) -> None:
    """DeepSpeed checkpoint formats that would drop a GaLore optimizer's state, refused at
    deepspeed.initialize rather than found at load time. elastic_checkpoint at ZeRO-1/2 saves,
    per param group, only the wrapper's flat partition's element-wise state and the groups'
    "step"; GaLore keys its state by matrix piece (layouts/zero.py), so nothing was written and
    load_checkpoint failed on a bare AssertionError (at ZeRO-3 DeepSpeed 0.19.8 raises at the
    first save for any optimizer: refused here at once). The universal format is built from the
    same element-wise states. BF16_Optimizer (ZeRO-1 with fp32 gradient accumulation) has no
    elastic format: its checkpoints are the optimizer's own state_dict, so it is not refused."""
    if getattr(wrapper, "elastic_checkpoint", False):
        raise CheckpointFormatError(
            "zero_optimization.elastic_checkpoint=true cannot hold a GaLore optimizer's state (DeepSpeed's "
            "elastic format re-slices the element-wise states of each flat partition, and GaLore's low-rank "
            "moments and projectors are per matrix: none would be saved)",
            "set it to false: engine.save_checkpoint/load_checkpoint then resume bit-identically on the same "
            f"world size (DeepSpeed 0.19.8 refuses another one either way), and {_PIECES}")
    if engine.load_universal_checkpoint():
        raise CheckpointFormatError(
            "checkpoint.load_universal=true cannot restore a GaLore optimizer's state (DeepSpeed's universal "
            "checkpoint holds element-wise optimizer states per parameter, not GaLore's projectors and "
            "low-rank moments)", f"remove it: {_PIECES}")


def bind(engine) -> None:
    """Tell the engine's GaLore optimizer how DeepSpeed laid out its parameters."""
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, GaLoreOptimizer):
        return
    stage = int(engine.zero_optimization_stage())
    wrapper = engine.optimizer if engine.optimizer is not opt else None
    refuse_checkpoint_formats(engine, wrapper)
    opt.zero = read_zero_layout(wrapper, stage)
    if opt.zero is None:  # real parameters with the all-reduced gradient (ZeRO-0)
        import torch.distributed as dist

        group = getattr(engine, "seq_data_parallel_group", None)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            opt.replica_group = group
            opt.forget_layouts()


def _load(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, (str, Path)):
        return json.loads(Path(config).read_text())
    return dict(config)


def galore_param_groups(model, optimizer_params: dict) -> list[dict]:
    """Name-based groups from a JSON optimizer `params` dict (rank, target_modules, ...)."""
    p = dict(optimizer_params)
    kwargs = {k: p[k] for k in GALORE_KEYS if k in p}
    kwargs["target_modules"] = tuple(p.get("target_modules", DEFAULT_TARGET_MODULES))
    kwargs["weight_decay"] = p.get("weight_decay", 0.0)
    opts = {k: p[k] for k in GALORE_OPTION_DEFAULTS if k in p}
    return param_groups(model, **kwargs, **opts)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None,
               config_params=None, **kwargs):
    """deepspeed.initialize after `register()`; when the config's optimizer is a GaLore type
    whose params carry `rank` and no model_parameters are given, the parameter groups are
    built by module name (galore_ds.param_groups: `target_modules`, default attn/mlp;
    embeddings and lm_head full-rank; vectors without weight decay), exactly as the
    single-process recipe builds them."""
    deepspeed = _require_deepspeed()
    register()
    cfg = _load(config if config is not None else config_params)
    opt_cfg = (cfg or {}).get("optimizer") or {}
    params = dict(opt_cfg.get("params") or {})
    if (optimizer is None and model_parameters is None and model is not None
            and opt_cfg.get("type") in JSON_NAMES and "rank" in params):
        model_parameters = galore_param_groups(model, params)
        # the groups carry the GaLore keys; the optimizer keeps lr, betas, ... as defaults
        for key in ("target_modules", *GALORE_KEYS):
            params.pop(key, None)
        cfg = dict(cfg)
        cfg["optimizer"] = dict(opt_cfg, params=params)
    if cfg is not None:
        kwargs["config"] = cfg
    return deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                model_parameters=model_parameters, **kwargs)


__all__ = ["register", "bind", "initialize", "galore_param_groups", "CheckpointFormatError", "JSON_NAMES"]
