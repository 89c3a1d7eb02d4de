"""Fira, APOLLO and APOLLO-Mini by name from every entry point (issue 23): the recipe's
training.optimizer, GaLoreArguments.optimizer, torchtitan's containers and DeepSpeed's JSON
types. Each builds the rule with its own settings: APOLLO-Mini is rank 1, one scale per
matrix, scale 128, and APOLLO's `scale` (the update times sqrt(scale)) is never GaLore's
galore.scale."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import galore_ds
from galore_ds.train.config import Config, ConfigError, DistEnv, validate
from tiny_models import TitanLike, tiny_llama

# name in each entry point -> (class, what its GaLore groups hold)
EXPECTED = {
    "fira": (galore_ds.FiraAdamW, dict(rank=8)),
    "apollo": (galore_ds.ApolloAdamW, dict(rank=8, scale=1.0, scale_type="channel")),
    "apollo_mini": (galore_ds.ApolloAdamW, dict(rank=1, scale=128, scale_type="tensor")),
}


def galore_group(opt: torch.optim.Optimizer) -> dict:
    (group,) = [g for g in opt.param_groups if "rank" in g]
    return group


def check(opt: torch.optim.Optimizer, name: str) -> None:
    cls, want = EXPECTED[name]
    assert type(opt) is cls, (name, type(opt))
    group = galore_group(opt)
    assert {k: group[k] for k in want} == want, name


@pytest.mark.parametrize("name,recipe_name", [("fira", "fira_adamw"), ("apollo", "apollo_adamw"),
                                              ("apollo_mini", "apollo_mini")])
def test_the_recipe_names_them(name, recipe_name):
    from galore_ds.train.optim import build_optimizer, build_param_groups

    cfg = Config()
    cfg.training.optimizer = recipe_name
    cfg.galore.rank = 8
    model = tiny_llama()
    check(build_optimizer(build_param_groups(model, cfg), cfg), name)


def test_the_ddp_engine_refuses_them_naming_the_engines_that_carry_them():
    cfg = Config()
    cfg.training.optimizer = "apollo_mini"
    cfg.engine.mode = "ddp"
    with pytest.raises(ConfigError, match="engine.mode.*reads each matrix's full gradient.*deepspeed"):
        validate(cfg, DistEnv(world_size=2))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_trainer_names_them(name, tmp_path):
    from transformers import TrainingArguments

    from galore_ds.integrations.hf import GaLoreArguments, GaLoreTrainer

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = GaLoreTrainer(model=tiny_llama(), args=args, galore=GaLoreArguments(rank=8, optimizer=name))
    check(trainer.create_optimizer(), name)


TITAN = {"fira": ("FiraAdamW", {}), "apollo": ("ApolloAdamW", {}),
         "apollo_mini": ("ApolloAdamW", dict(rank=1, scale_type="tensor", scale=128))}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_torchtitans_containers_name_them(name):
    from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, galore_param_groups
    from galore_ds.integrations.torchtitan_trainspec import NAMES

    titan_name, settings = TITAN[name]
    model = TitanLike()
    groups = galore_param_groups(lr=1e-3, optimizer=titan_name, **{"rank": 8, **settings})
    opt = GaLoreOptimizersContainer.Config(param_groups=groups).build(model_parts=[model]).optimizers[0]
    check(opt, name)
    assert NAMES["Fira"] is galore_ds.FiraAdamW and NAMES["Apollo"] is galore_ds.ApolloAdamW   # torchtitan 0.2


def test_deepspeed_json_types_name_them():
    pytest.importorskip("deepspeed")
    import galore_ds.integrations.deepspeed as gds

    gds.register()
    assert torch.optim.FiraAdamW is galore_ds.FiraAdamW and torch.optim.ApolloAdamW is galore_ds.ApolloAdamW
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    assert galore_ds.ApolloAdamW in ZERO_SUPPORTED_OPTIMIZERS and galore_ds.FiraAdamW in ZERO_SUPPORTED_OPTIMIZERS
    # what DeepSpeed does with {"type": "ApolloAdamW", "params": {...}}: getattr(torch.optim, type)(params, **params)
    opt = torch.optim.ApolloAdamW(galore_ds.param_groups(tiny_llama(), rank=1), lr=1e-3, scale_type="tensor", scale=128)
    check(opt, "apollo_mini")


def test_torchtitan_02s_job_config_names_fira():
    from galore_ds.integrations.torchtitan_trainspec import build_galore_optimizers

    model = TitanLike()
    opt = build_galore_optimizers([model], SimpleNamespace(name="Fira", lr=1e-3), galore={"rank": 8}).optimizers[0]
    check(opt, "fira")
