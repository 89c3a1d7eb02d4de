"""torchtitan: the container of today's torchtitan (0.3, installed by the Makefile without its
data and logging dependencies) built from its own Config and ParamGroupConfig, trained against
the plain galore_ds loop, checkpointed through its own flat, name-keyed state dict with DCP, and
its zero-gradient state-creation step; then torchtitan 0.2's TrainSpec API
(torchtitan_trainspec), whose calls are made here as that version makes them."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import galore_ds
from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, galore_param_groups
from galore_ds.integrations.torchtitan_trainspec import TrainSpecOptimizersContainer, build_galore_optimizers
from tiny_models import TitanLike, titan_batch, titan_loss

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import fsdp_checkpoint_worker  # noqa: E402
import torchtitan_clip_worker  # noqa: E402

CONFIG = SimpleNamespace(name="AdamW", lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                         implementation="foreach", early_step_in_backward=False)
GALORE = dict(rank=8, update_proj_gap=3)


def build(model: nn.Module) -> TrainSpecOptimizersContainer:
    return build_galore_optimizers([model], CONFIG, None, None, galore=GALORE)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        titan_loss(model, titan_batch(s)).backward()
        opt.step()
        opt.zero_grad()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_resume_and_finish(make, path) -> tuple[dict, dict, list[str]]:
    """7 steps straight, and 4 steps, a DCP save, a fresh model and optimizer loaded as
    torchtitan loads (the optimizer's state_dict first: its state-creation step), then steps
    4-6: (weights of each, the saved optimizer keys). Refreshes at 0, 3 and, after the resume, 6."""
    full_model = TitanLike()
    full = make(full_model)
    train(full_model, full, range(7))

    model = TitanLike()
    opt = make(model)
    train(model, opt, range(4))
    saved = opt.state_dict()
    dcp.save({"model": model.state_dict(), "optimizer": saved}, checkpoint_id=str(path))

    resumed_model = TitanLike()
    resumed = make(resumed_model)
    state = {"model": resumed_model.state_dict(), "optimizer": resumed.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["optimizer"])
    train(resumed_model, resumed, range(4, 7))
    return weights(full_model), weights(resumed_model), list(saved)


# ---- torchtitan >= 0.3: its OptimizersContainer, Config and ParamGroupConfig ----------------
NAMES = ("GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit")


def titan(model: nn.Module, optimizer: str = "GaLoreAdamW") -> GaLoreOptimizersContainer:
    return fsdp_checkpoint_worker.optimizer(model, "torchtitan", optimizer)


plain = fsdp_checkpoint_worker.plain_optimizer


@pytest.mark.parametrize("optimizer", NAMES)
def test_torchtitan_container_equals_the_plain_loop(optimizer):
    ref_model, model = TitanLike(), TitanLike()
    ref, container = plain(ref_model, optimizer), titan(model, optimizer)
    assert len(container) == 1 and isinstance(container.optimizers[0], getattr(galore_ds, optimizer))
    galore_groups = [g for g in container.optimizers[0].param_groups if "rank" in g]
    assert len(galore_groups) == 1 and sorted(galore_groups[0]["param_names"]) == sorted(
        n for n, p in model.named_parameters() if (".attention.w" in n or ".feed_forward.w" in n))
    train(ref_model, ref, range(7))       # refreshes at steps 0, 3 and 6
    train(model, container, range(7))
    a, b = weights(ref_model), weights(model)
    worst = max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("optimizer", NAMES)
def test_torchtitan_checkpoint_through_its_flat_state_dict_and_dcp_resumes_bit_identically(tmp_path, optimizer):
    full, resumed, saved_keys = save_resume_and_finish(lambda m: titan(m, optimizer), tmp_path / "step-4")
    assert "galore_ds.0.layers.0.attention.wq.weight.proj" in saved_keys   # keyed by name: DCP reshards it
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_torchtitan_state_creation_step_computes_no_projector_and_changes_nothing():
    from torchtitan.components.optimizer.utils import init_optim_state

    plain_model, probed_model = TitanLike(), TitanLike()
    untouched, probed = titan(plain_model), titan(probed_model)
    before = weights(probed_model)
    init_optim_state(probed.optimizers[0])   # torchtitan's: zero gradients, lr 0, one step
    sd = probed.state_dict()
    assert all(torch.equal(before[k], v) for k, v in weights(probed_model).items())
    assert float(sd["galore_ds.0.layers.0.attention.wq.weight.step"]) == 0
    assert not sd["galore_ds.0.layers.0.attention.wq.weight.proj"].any()
    train(plain_model, untouched, range(5))
    train(probed_model, probed, range(5))
    a, b = weights(plain_model), weights(probed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchtitan_names_it_does_not_know_still_reach_its_own_optimizers():
    config = GaLoreOptimizersContainer.Config(param_groups=galore_param_groups(lr=1e-2, rank=8)[:2] + [
        type(galore_param_groups(lr=1e-2)[0])(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})])
    model = TitanLike()
    container = config.build(model_parts=[model])
    assert sorted(type(o).__name__ for o in container) == ["AdamW", "GaLoreAdamW"]
    train(model, container, range(2))
    sd = container.state_dict()   # each optimizer's state in its own form, side by side
    assert any(k.startswith("state.") for k in sd) and any(k.startswith("galore_ds.") for k in sd)
    container.load_state_dict(sd)
    with pytest.raises(ValueError, match="optimizer='Muon'"):
        galore_param_groups(lr=1e-2, optimizer="Muon")


@pytest.mark.slow
def test_torchtitan_container_on_fsdp2_ranks_equals_the_plain_loop_and_resumes(tmp_path):
    """2 ranks: fully_shard then Config.build, as torchtitan's Trainer orders them; its state dict
    through a multi-rank DCP save and load (tests/dist/fsdp_checkpoint_worker.py). torchtitan's
    own flat form saved each rank's rows of the low-rank moments from one rank: 10% off."""
    result = fsdp_checkpoint_worker.run(tmp_path, "torchtitan")
    assert result["dtensor_params"], result
    assert result["rel_diff_vs_plain"] <= 1e-5, result
    assert result["resume_bit_identical"], result


# ---- clipping: the optimizer's max_grad_norm through the container, and torchtitan's own ---------
@pytest.mark.parametrize("timing", ["exact", "delayed"])
def test_torchtitan_max_grad_norm_and_clip_timing_reach_the_optimizer(timing):
    """Finding 2: galore_param_groups(..., max_grad_norm=0.01) built an optimizer with
    max_grad_norm=None (the run equalled the unclipped loop, 7.4e-2 from the clipped one)."""
    ref_model, model, free_model = TitanLike(), TitanLike(), TitanLike()
    container = torchtitan_clip_worker.container(model, max_grad_norm=0.01, clip_timing=timing)
    opt = container.optimizers[0]
    assert (opt.max_grad_norm, opt.clip_timing) == (0.01, timing)
    assert not any(k in g for g in opt.param_groups for k in ("max_grad_norm", "clip_timing"))
    ref = torchtitan_clip_worker.reference(ref_model, max_grad_norm=0.01, clip_timing=timing)
    unclipped = torchtitan_clip_worker.reference(free_model)
    for m, o in ((ref_model, ref), (model, container), (free_model, unclipped)):
        torchtitan_clip_worker.train(m, o, range(7), 0, 1)
    assert torchtitan_clip_worker.rel(model, ref_model) <= 1e-5
    assert torchtitan_clip_worker.rel(free_model, ref_model) > 1e-3   # the clip did something


def test_torchtitan_trainers_clip_grad_norm_equals_torchs_clip_in_the_plain_loop():
    """torchtitan's Trainer clips every step with training.max_norm through its
    dist_utils.clip_grad_norm_ on the model's parameters, before the container steps: the
    full gradients are clipped, as torch.nn.utils.clip_grad_norm_ does in the plain loop."""
    from torchtitan.distributed import utils as dist_utils

    ref_model, model = TitanLike(), TitanLike()
    container, ref = torchtitan_clip_worker.container(model), torchtitan_clip_worker.reference(ref_model)
    torchtitan_clip_worker.train(model, container, range(7), 0, 1,
                                 clip=lambda ps: dist_utils.clip_grad_norm_(ps, 0.05, foreach=True))
    torchtitan_clip_worker.train(ref_model, ref, range(7), 0, 1,
                                 clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05))
    assert torchtitan_clip_worker.rel(model, ref_model) <= 1e-5


def test_torchtitan_optimizer_wide_keys_that_differ_between_groups_are_refused():
    from torchtitan.components.optimizer import ParamGroupConfig

    groups = galore_param_groups(lr=1e-2, rank=8)
    groups[1] = ParamGroupConfig(pattern=groups[1].pattern, optimizer_name="GaLoreAdamW",
                                 optimizer_kwargs={**groups[1].optimizer_kwargs, "max_grad_norm": 0.5})
    with pytest.raises(ValueError, match="max_grad_norm.*optimizer-wide.*every GaLoreAdamW group"):
        GaLoreOptimizersContainer.Config(param_groups=groups).build(model_parts=[TitanLike()])


@pytest.mark.slow
def test_torchtitan_clipping_on_fsdp2_ranks_equals_the_one_process_loop(tmp_path):
    """2 FSDP2 ranks (tests/dist/torchtitan_clip_worker.py): the optimizer's clip, exact and
    delayed, through galore_param_groups, and torchtitan's clip_grad_norm_ before the step."""
    report = torchtitan_clip_worker.run(tmp_path)
    for case, r in report.items():
        assert r["ok"], f"{case}: {r.get('error')}\n{r.get('trace')}"
        assert r["dtensor_params"] and r["rel_diff_vs_one_process"] <= 1e-5, (case, r)

# ---- torchtitan 0.2: TrainSpec.build_optimizers_fn -------------------------------------------

def test_galore_groups_are_torchtitans_attention_and_feed_forward():
    opt = build(TitanLike())
    names = {g["name"]: g["param_names"] for g in opt.optimizers[0].param_groups}
    assert len(names["galore"]) == 14 and all(".attention.w" in n or ".feed_forward.w" in n for n in names["galore"])
    assert "tok_embeddings.weight" in names["decay"] and "output.weight" in names["decay"]
    g = opt.optimizers[0].param_groups[0]
    assert g["lr"] == 1e-2 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8


def test_dcp_state_creation_step_computes_no_projector_and_changes_nothing():
    """get_optimizer_state_dict on a fresh optimizer runs a zero-gradient, lr-0 step: the run
    that took it must equal, bit for bit, the run that did not."""
    plain_model, probed_model = TitanLike(), TitanLike()
    plain, probed = build(plain_model), build(probed_model)
    sd = probed.state_dict()
    wq = [k for k in sd if k.startswith("part0.layers.0.attention.wq.weight")]
    assert {k.rsplit(".", 1)[1] for k in wq} >= {"proj", "step", "exp_avg", "exp_avg_sq"}, wq
    assert float(sd["part0.layers.0.attention.wq.weight.step"]) == 0
    assert not sd["part0.layers.0.attention.wq.weight.proj"].any()  # a placeholder, not an SVD of zeros
    assert probed.optimizers[0].galore_stats["refreshes"] == 0
    train(plain_model, plain, range(5))
    train(probed_model, probed, range(5))
    a, b = weights(plain_model), weights(probed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dcp_save_and_load_resume_bit_identically(tmp_path):
    full, resumed, _ = save_resume_and_finish(build, tmp_path / "step-4")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_torchtitan_options_it_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="early_step_in_backward"):
        build_galore_optimizers([TitanLike()], SimpleNamespace(**{**vars(CONFIG), "early_step_in_backward": True}))
    with pytest.raises(ValueError, match="optimizer.name"):
        build_galore_optimizers([TitanLike()], SimpleNamespace(**{**vars(CONFIG), "name": "Muon"}))


def test_torchtitan_02_adafactor_takes_the_jobs_lr():
    """Finding 14: [optimizer] name = "Adafactor" always raised "lr is set and relative_step=True":
    torchtitan's job always gives an lr (its schedulers scale it), so relative_step is off,
    as in the 0.3 container."""
    adafactor = SimpleNamespace(**{**vars(CONFIG), "name": "Adafactor"})
    model, ref_model = TitanLike(), TitanLike()
    container = build_galore_optimizers([model], adafactor, None, None, galore=GALORE)
    ref = galore_ds.GaLoreAdafactor(galore_ds.param_groups(ref_model, target_modules=("attention", "feed_forward"),
                                                           **GALORE), lr=1e-2, relative_step=False, weight_decay=0.1)
    assert isinstance(container.optimizers[0], galore_ds.GaLoreAdafactor)
    train(model, container, range(4))
    train(ref_model, ref, range(4))
    a, b = weights(model), weights(ref_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchtitan_02_max_grad_norm_in_galore_reaches_the_optimizer():
    """The 0.2 factory's `galore` dict is the one place its user can write the optimizer's own
    clip: it reaches the constructor (a group key would be refused)."""
    model, ref_model = TitanLike(), TitanLike()
    container = build_galore_optimizers([model], CONFIG, None, None,
                                        galore={**GALORE, "max_grad_norm": 0.01, "clip_timing": "delayed"})
    assert (container.optimizers[0].max_grad_norm, container.optimizers[0].clip_timing) == (0.01, "delayed")
    ref = galore_ds.GaLoreAdamW(galore_ds.param_groups(ref_model, target_modules=("attention", "feed_forward"),
                                                       **GALORE), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1, max_grad_norm=0.01, clip_timing="delayed")
    train(model, container, range(4))
    train(ref_model, ref, range(4))
    a, b = weights(model), weights(ref_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
