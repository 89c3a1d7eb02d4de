"""GaLore settings. Constructor keywords are the defaults of groups that do not set a key (torch's
rule), so `param_groups` writes only what its caller passed (issue 21, finding 12); optimizer-wide
arguments are refused as group keys. One settings object (core/settings.py) holds every default,
and every entry point resolves to it (issue 22)."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import galore_ds
from galore_ds.core.settings import DEFAULTS, FIELDS, GaLoreSettings
from tiny_models import tiny_llama, train_step

CONSTRUCTOR = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=50, scale=1.0, proj_type="right")


def by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def test_constructor_keywords_are_the_defaults_of_param_groups_groups():
    """The issue's snippet: every group kept weight decay 0.0, gap 200, scale 0.25, std."""
    m = tiny_llama()
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(m, rank=3), **CONSTRUCTOR)
    groups = by_name(opt)
    g = groups["galore"]
    assert (g["rank"], g["weight_decay"], g["update_proj_gap"], g["scale"], g["proj_type"]) == \
        (3, 0.1, 50, 1.0, "right")
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0   # param_groups' point: norms and biases never decay


def test_constructor_defaults_train_like_the_same_keys_written_in_the_groups():
    defaults_model, written_model = tiny_llama(), tiny_llama()
    by_default = galore_ds.GaLoreAdamW(galore_ds.param_groups(defaults_model, rank=3), **CONSTRUCTOR)
    written = galore_ds.GaLoreAdamW(
        galore_ds.param_groups(written_model, rank=3, weight_decay=0.1, update_proj_gap=50, scale=1.0,
                               proj_type="right"), lr=1e-2)
    for s in range(3):
        train_step(defaults_model, by_default, s)
        train_step(written_model, written, s)
    assert all(torch.equal(a, b) for a, b in zip(defaults_model.parameters(), written_model.parameters()))


def test_what_param_groups_is_given_wins_over_the_constructor():
    m = tiny_llama()
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(m, rank=3, update_proj_gap=7, weight_decay=0.05),
                                **CONSTRUCTOR)
    g = by_name(opt)
    assert g["galore"]["update_proj_gap"] == 7 and g["galore"]["weight_decay"] == 0.05 and g["galore"]["scale"] == 1.0
    assert g["decay"]["weight_decay"] == 0.05


def test_param_groups_writes_only_what_it_was_given():
    groups = {g["name"]: g for g in galore_ds.param_groups(tiny_llama(), rank=3)}
    assert set(groups["galore"]) == {"params", "param_names", "name", "rank"}
    assert set(groups["decay"]) == {"params", "param_names", "name"}
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_add_param_group_takes_the_constructors_galore_values():
    """The issue's second snippet: add_param_group({"rank": 3}) got gap 200, scale 0.25, std."""
    m = tiny_llama()
    late = m.model.layers[1].mlp.down_proj.weight
    groups = galore_ds.param_groups(m, rank=3)
    for g in groups:
        g["params"] = [p for p in g["params"] if p is not late]
        g.pop("param_names")
    opt = galore_ds.GaLoreAdamW(groups, **CONSTRUCTOR)
    opt.add_param_group({"params": [late], "rank": 3})
    g = opt.param_groups[-1]
    assert (g["weight_decay"], g["update_proj_gap"], g["scale"], g["proj_type"]) == (0.1, 50, 1.0, "right")


def test_without_constructor_values_the_paper_defaults_apply():
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(tiny_llama(), rank=3))
    g = by_name(opt)["galore"]
    assert (g["update_proj_gap"], g["scale"], g["proj_type"], g["weight_decay"]) == (200, 0.25, "std", 0.0)


def test_optimizer_wide_keys_in_a_group_are_refused_naming_the_constructor():
    """max_grad_norm / clip_timing / reduce_group hold for the whole optimizer (one global norm):
    as a group key they were ignored without a word (finding 2's class, outside torchtitan)."""
    groups = galore_ds.param_groups(tiny_llama(), rank=3)
    groups[0]["max_grad_norm"] = 0.01
    line = ("param group sets max_grad_norm=0.01: max_grad_norm is optimizer-wide, not a group key; "
            "pass it to the constructor: GaLoreAdamW(params, max_grad_norm=...)")
    with pytest.raises(ValueError, match=f"^{re.escape(line)}$"):
        galore_ds.GaLoreAdamW(groups, lr=1e-2)


# ---- issue 22: one settings object; every entry point resolves every default to it -----------
RESOLVED = tuple(k for k in FIELDS if k != "target_modules")   # what a built GaLore group holds


class Named(nn.Module):
    """128 x 128 weights (the default rank fits) under both naming conventions: Hugging Face's
    (attn, mlp: the library's default targets) and torchtitan's (attention, feed_forward)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name in ("attn", "mlp", "attention", "feed_forward", "embed"):
            setattr(self, name, nn.Linear(128, 128, bias=False))
        self.norm = nn.RMSNorm(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("embed", "attn", "mlp", "attention", "feed_forward"):
            x = torch.tanh(getattr(self, name)(x))
        return self.norm(x)


def galore_groups(opt: torch.optim.Optimizer, model: nn.Module) -> list[tuple[dict, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [({k: g[k] for k in RESOLVED}, {names[id(p)] for p in g["params"]}) for g in opt.param_groups if "rank" in g]


def library(model: nn.Module, **opts) -> torch.optim.Optimizer:
    return galore_ds.GaLoreAdamW(galore_ds.param_groups(model, **opts))


def flat_list(model: nn.Module, **opts) -> torch.optim.Optimizer:   # DeepSpeed's JSON hands model.parameters()
    return galore_ds.GaLoreAdamW(model.parameters(), rank=DEFAULTS.rank, **opts)


def recipe(model: nn.Module, **opts) -> torch.optim.Optimizer:
    from galore_ds.train.config import Config
    from galore_ds.train.optim import build_optimizer, build_param_groups

    cfg = Config()
    for key, value in opts.items():
        setattr(cfg.galore, key, value)
    return build_optimizer(build_param_groups(model, cfg), cfg)


def hf_trainer(model: nn.Module, tmp_path, **opts) -> torch.optim.Optimizer:
    from transformers import TrainingArguments

    from galore_ds.integrations.hf import GaLoreArguments, GaLoreTrainer

    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    return GaLoreTrainer(model=model, args=args, galore=GaLoreArguments(options=opts)).create_optimizer()


def torchtitan_03(model: nn.Module, **opts) -> torch.optim.Optimizer:
    from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, galore_param_groups

    return GaLoreOptimizersContainer.Config(param_groups=galore_param_groups(lr=1e-3, **opts)).build(
        model_parts=[model]).optimizers[0]


def torchtitan_02(model: nn.Module, **opts) -> torch.optim.Optimizer:
    from types import SimpleNamespace

    from galore_ds.integrations.torchtitan_trainspec import build_galore_optimizers

    return build_galore_optimizers([model], SimpleNamespace(name="AdamW", lr=1e-3), galore=opts).optimizers[0]


@pytest.mark.parametrize("given", [{}, {"refresh": "randomized"}], ids=["nothing", "refresh=randomized"])
def test_every_entry_point_resolves_every_default_to_the_settings_object(tmp_path, given):
    """Each entry point, given nothing but what it requires (or only refresh="randomized", where
    the recipe's oversample 8 met the library's 0), builds an optimizer whose one GaLore group
    holds GaLoreSettings' defaults and projects the default targets."""
    expected = {**{k: getattr(DEFAULTS, k) for k in RESOLVED}, **given}
    hf_names, titan_names = {"attn.weight", "mlp.weight"}, {"attention.weight", "feed_forward.weight"}
    builders = {
        "param_groups": (library, hf_names),
        "flat parameter list": (flat_list, {"attn.weight", "mlp.weight", "attention.weight", "feed_forward.weight",
                                            "embed.weight"}),   # selected by shape: every 128 x 128
        "recipe (train/config.py)": (recipe, hf_names),
        "GaLoreArguments": (lambda m, **o: hf_trainer(m, tmp_path, **o), hf_names),
        "torchtitan 0.3": (torchtitan_03, titan_names),   # torchtitan's module names, by design
        "torchtitan 0.2": (torchtitan_02, titan_names),
    }
    for entry, (build, names) in builders.items():
        model = Named()
        assert galore_groups(build(model, **given), model) == [(expected, names)], entry


def test_the_schemas_declare_the_settings_defaults():
    """The recipe's galore section and GaLoreArguments, field by field (target_modules included)."""
    from galore_ds.integrations.hf import GaLoreArguments
    from galore_ds.train.config import GaloreConfig

    recipe_section, hf_args = GaloreConfig(), GaLoreArguments()
    for key in FIELDS:
        want = getattr(DEFAULTS, key)
        got = getattr(recipe_section, key)
        assert (tuple(got) if key == "target_modules" else got) == want, key
    for key in ("rank", "update_proj_gap", "scale", "proj_type", "target_modules"):
        assert getattr(hf_args, key) == getattr(DEFAULTS, key), key
    assert GaLoreSettings() == DEFAULTS
