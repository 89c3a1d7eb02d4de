"""Fira and APOLLO (APOLLO-Mini) against their reference packages, fira 1.0.2 and apollo-torch
1.0.3, step for step on a small LLaMA; where the references do what a user would call a bug,
the test shows it and what galore_ds does instead (docs/family.md). Also: the random
projection depends on no process RNG, and a resumed run is the uninterrupted one, bit for bit."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import galore_ds
from galore_ds.core import projector as pj
from galore_ds.core.settings import DEFAULTS, FAMILY
from tiny_models import max_rel_diff, tiny_llama, train_step

fira = pytest.importorskip("fira")
apollo_torch = pytest.importorskip("apollo_torch")

STEPS, GAP = 10, 3  # refreshes at steps 0, 3, 6, 9
# 2 layers x 7 matrices; under std the MLP's down projection is projected on the left, the
# others (square, or taller than wide) on the right: both sides in every run


def groups(model: nn.Module, gap: int = GAP, **galore: object) -> list[dict]:
    """param_groups with the GaLore group's keys written (the references read them there)."""
    keys = {k: galore.pop(k) for k in ("rank", "update_proj_gap", "scale", "proj_type", "weight_decay") if k in galore}
    out = galore_ds.param_groups(model, update_proj_gap=gap, **keys)
    for g in out:
        g.pop("name")
        g.pop("param_names")
        if "rank" in g:
            g.update(galore)
    return out


def run_pair(make_ref, make_ours, tol: float, steps: int = STEPS, **galore: object) -> None:
    ref_model = tiny_llama()
    our_model = copy.deepcopy(ref_model)
    ref, ours = make_ref(groups(ref_model, **galore)), make_ours(groups(our_model, **galore))
    for step in range(steps):
        train_step(ref_model, ref, step)
        train_step(our_model, ours, step)
        diff = max_rel_diff(ref_model, our_model)
        assert diff <= tol, f"step {step}: relative difference {diff:.2e} > {tol:.0e}"


# ---- Fira --------------------------------------------------------------------------------------
def fira_ref(wd: float):
    return lambda g: fira.FiraAdamW(g, lr=1e-2, weight_decay=wd, no_deprecation_warning=True)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fira_is_the_fira_package_bit_for_bit(proj_type, wd):
    """signs="lapack" takes fira's LAPACK signs and its unfused arithmetic; residual="scaled"
    its residual G - alpha P R (scale is fira's alpha), at the alpha of its LLaMA scripts."""
    run_pair(fira_ref(wd), lambda g: galore_ds.FiraAdamW(g, lr=1e-2, weight_decay=wd, signs="lapack", residual="scaled"),
             tol=0.0, rank=8, scale=0.25, alpha=0.25, proj_type=proj_type, weight_decay=wd)


def test_fira_exact_residual_is_the_package_at_its_default_alpha():
    """At alpha = 1 (fira's default) the paper's residual and the package's are one."""
    run_pair(fira_ref(0.0), lambda g: galore_ds.FiraAdamW(g, lr=1e-2, signs="lapack"),
             tol=0.0, rank=8, scale=1.0, alpha=1.0, proj_type="std")


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_fira_default_arithmetic_is_within_1e_5(proj_type):
    """The default (fused, no full-size temporary; aligned signs) within 1e-5 of the package
    while the projector is the first one (aligned and LAPACK signs part at a later refresh)."""
    run_pair(fira_ref(0.1), lambda g: galore_ds.FiraAdamW(g, lr=1e-2, weight_decay=0.1, residual="scaled"),
             tol=1e-5, gap=100, rank=8, scale=0.25, alpha=0.25, proj_type=proj_type, weight_decay=0.1)


# ---- APOLLO and APOLLO-Mini -----------------------------------------------------------------------
APOLLO = dict(rank=8, scale=1.0, scale_type="channel", proj="random")
MINI = dict(rank=1, scale=128.0, scale_type="tensor", proj="random")
LR = 3e-3   # at 1e-2 APOLLO-Mini's sqrt(128)-scaled steps make the tiny model chaotic: ulps grow


def apollo_ref(wd: float, **kw):
    return lambda g: apollo_torch.APOLLOAdamW(g, lr=LR, weight_decay=wd, **kw)


def apollo_ours(wd: float, **kw):
    return lambda g: galore_ds.ApolloAdamW(g, lr=LR, weight_decay=wd, proj_seeds="apollo", **kw)


@pytest.mark.parametrize("signs", ["lapack", "aligned"], ids=["package arithmetic", "fused"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("variant,proj_type", [(APOLLO, "std"), (MINI, "std"), (MINI, "reverse_std")],
                         ids=["apollo-std", "mini-std", "mini-reverse_std"])
def test_apollo_matches_apollo_torch(variant, proj_type, wd, signs):
    """proj_seeds="apollo": apollo-torch's seeds (the 1-based parameter index, advanced at each
    refresh), so the same random matrices; channel-wise APOLLO only under std (see below)."""
    run_pair(apollo_ref(wd), apollo_ours(wd, signs=signs), tol=1e-5, proj_type=proj_type, weight_decay=wd, **variant)


def test_apollo_svd_projection_is_the_package_bit_for_bit():
    run_pair(apollo_ref(0.0), apollo_ours(0.0, signs="lapack"), tol=0.0, proj_type="std", **{**APOLLO, "proj": "svd"})


def test_apollo_without_the_limiter_is_disable_nl():
    run_pair(apollo_ref(0.0, disable_nl=True), apollo_ours(0.0, norm_growth_limit=None), tol=1e-5,
             proj_type="std", **APOLLO)


# ---- where the references do something else ---------------------------------------------------
def linear_step(make, grads, seed: int = 0):
    """A 48 x 32 nn.Linear (m >= n) stepped once per gradient given; returns (layer, optimizer,
    the weight before each step)."""
    torch.manual_seed(seed)
    layer = nn.Linear(32, 48, bias=False)
    opt = make(layer)
    before = []
    for g in grads:
        before.append(layer.weight.detach().clone())
        layer.weight.grad = g.clone()
        opt.step()
    return layer, opt, before


def one_group(layer: nn.Linear, **galore) -> list[dict]:
    return [dict(params=[layer.weight], update_proj_gap=GAP, **galore)]


def test_apollo_torch_channel_scaling_breaks_off_the_std_side():
    """apollo-torch takes the channel norms over dim 1 when G is at least as tall as wide, else
    dim 0: the rank dimension only when the projection is on the smaller side (std). With
    reverse_std it broadcasts one factor per rank index onto G, and fails. galore_ds takes them
    over the rank dimension: one factor per column of a left-projected matrix."""
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    galore = dict(rank=8, scale=1.0, scale_type="channel", proj="random", proj_type="reverse_std")
    with pytest.raises(RuntimeError, match="must match the size"):
        linear_step(lambda m: apollo_torch.APOLLOAdamW(one_group(m, **galore), lr=LR), [g])
    layer, opt, before = linear_step(lambda m: galore_ds.ApolloAdamW(one_group(m, **galore), lr=LR), [g])
    st = opt.state[layer.weight]
    assert not st["proj_right"]                          # reverse_std on a tall matrix: left
    r = st["proj"].t() @ g                               # R = P^T G, (rank, n)
    normed = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
    factor = normed.norm(dim=0) / (r.norm(dim=0) + 1e-8)  # one per column of W
    step_size = LR * (1 - 0.999) ** 0.5 / (1 - 0.9)
    torch.testing.assert_close(layer.weight.detach() - before[0], -step_size * g * factor, rtol=1e-5, atol=1e-8)


def test_fira_package_residual_keeps_part_of_the_projected_gradient():
    """fira's project_back multiplies by alpha, so its residual G - alpha P P^T G keeps
    (1 - alpha) of the projected gradient, updated once more by phi outside Adam. The paper's
    residual (residual="exact", the default) has no part in the subspace: P^T S = 0."""
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(2))
    galore = dict(rank=8, scale=0.25, alpha=0.25, proj_type="left")

    def subspace_step(make) -> torch.Tensor:
        layer, opt, before = linear_step(make, [g])
        st = opt.state[layer.weight]
        p = st["proj"] if "proj" in st else st["projector"].ortho_matrix
        return p.t() @ (layer.weight.detach() - before[0]), p.t() @ g   # P^T dW, R

    def adam_first_step(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = 0.1 * r / ((0.001 * r * r).sqrt() + 1e-6)    # N after one step
        return normed, normed.norm(dim=0) / (r.norm(dim=0) + 1e-8)   # N, phi (one per column)

    step_size = LR * (1 - 0.999) ** 0.5 / (1 - 0.9)
    ref_dw, r = subspace_step(lambda m: fira.FiraAdamW(one_group(m, **galore), lr=LR, no_deprecation_warning=True))
    normed, phi = adam_first_step(r)
    torch.testing.assert_close(ref_dw, -step_size * (0.25 * normed + 0.75 * phi * r), rtol=1e-4, atol=1e-7)
    exact_dw, r = subspace_step(lambda m: galore_ds.FiraAdamW(one_group(m, **galore), lr=LR))
    normed, _ = adam_first_step(r)
    torch.testing.assert_close(exact_dw, -step_size * 0.25 * normed, rtol=1e-4, atol=1e-7)


def test_after_an_all_zero_gradient_the_references_limiter_freezes_the_update():
    """The limiter divides a matrix's scaled term by its growth over the previous step's norm
    (+ 1e-8). After a step whose gradient was all zero, that norm is 0: the packages then scale
    the next term down to ~1e-8 and let it regrow by 1.01x a step (thousands of steps to
    recover). galore_ds reads a zero previous norm as none (docs/family.md)."""
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    galore = dict(rank=8, scale=1.0, scale_type="channel", proj="random", proj_type="std")
    moved = {}
    for name, make in (("apollo-torch", lambda m: apollo_torch.APOLLOAdamW(one_group(m, **galore), lr=LR)),
                       ("galore_ds", lambda m: galore_ds.ApolloAdamW(one_group(m, **galore), lr=LR))):
        layer, _, before = linear_step(make, [torch.zeros_like(g), g])
        moved[name] = float((layer.weight.detach() - before[1]).norm())
    assert moved["apollo-torch"] < 1e-9 < 1e-4 < moved["galore_ds"]


# ---- the random projection ----------------------------------------------------------------------
def projectors(opt) -> list[torch.Tensor]:
    return [opt.state[p]["proj"].clone() for g in opt.param_groups if "rank" in g for p in g["params"]]


def test_random_projection_depends_on_no_process_rng():
    """Two runs whose process RNG differs (seeded apart, and drawn from between steps) draw the
    same matrices, the step draws nothing from the process RNG, and each matrix is the one of
    (seed, parameter index, refresh index)."""
    runs = []
    for rng_seed in (0, 1234):
        model = tiny_llama()
        opt = galore_ds.ApolloAdamW(groups(model, **APOLLO), lr=LR)
        torch.manual_seed(rng_seed)
        drawn = []
        for step in range(GAP + 1):                     # two refreshes
            torch.rand(rng_seed % 7 + 1)
            x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            state = torch.get_rng_state()
            opt.step()
            assert torch.equal(torch.get_rng_state(), state)
            drawn.append(projectors(opt))
        runs.append(drawn)
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    opt_groups = [g for g in opt.param_groups if "rank" in g]
    p = opt_groups[0]["params"][0]
    index, side = opt.param_index(p), "right" if opt.state[p]["proj_right"] else "left"
    seed = pj.projection_seed("hashed", 0, index, 1)
    dim = p.shape[1] if side == "right" else p.shape[0]
    want = pj.basis_to_proj(pj.gaussian_basis(dim, APOLLO["rank"], side, seed, "cpu"), side)
    assert torch.equal(opt.state[p]["proj"], want)
    first, last = runs[0][0], runs[0][-1]
    assert not torch.equal(first[0], last[0])                              # a new matrix at the refresh
    assert not torch.equal(first[0].flatten()[:64], first[1].flatten()[:64])   # another per parameter


def test_apollo_seeds_are_the_packages_sequence():
    """apollo-torch seeds parameter i (1-based over the groups) with i, then advances the seed
    at each refresh (its next_seed)."""
    from apollo_torch.random_projector import next_seed

    assert pj.projection_seed("apollo", 0, 4, 0) == 5
    assert pj.projection_seed("apollo", 0, 4, 2) == next_seed(next_seed(5))


def save_and_resume(make, model: nn.Module, opt, drop_proj: bool = False):
    """A new model and optimizer that continue from `opt` through state_dict / torch.save."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    if drop_proj:   # a random projector is regenerated from (seeds, index, step): it need not be saved
        for st in sd["state"].values():
            st.pop("proj", None)
    resumed_model = copy.deepcopy(model)
    resumed = make(groups(resumed_model, **FAMILY_CASES_GALORE[make]))
    resumed.load_state_dict(sd)
    return resumed_model, resumed


FIRA = lambda g: galore_ds.FiraAdamW(g, lr=1e-2, weight_decay=0.1)       # noqa: E731
APOLLO_OPT = lambda g: galore_ds.ApolloAdamW(g, lr=LR, weight_decay=0.1)  # noqa: E731
MINI_OPT = lambda g: galore_ds.ApolloAdamW(g, lr=LR)                     # noqa: E731
FAMILY_CASES_GALORE = {FIRA: dict(rank=8, weight_decay=0.1), APOLLO_OPT: dict(APOLLO, weight_decay=0.1),
                       MINI_OPT: dict(MINI)}


@pytest.mark.parametrize("make,drop_proj", [(FIRA, False), (APOLLO_OPT, False), (MINI_OPT, False), (APOLLO_OPT, True)],
                         ids=["fira", "apollo", "apollo-mini", "apollo, projector not saved"])
def test_resume_is_bit_identical(make, drop_proj):
    """state_dict -> a new optimizer -> load_state_dict, between two refreshes, continues as the
    uninterrupted run, bit for bit (the limiter's norm and the seeds included)."""
    whole_model = tiny_llama()
    part_model = copy.deepcopy(whole_model)
    whole = make(groups(whole_model, **FAMILY_CASES_GALORE[make]))
    part = make(groups(part_model, **FAMILY_CASES_GALORE[make]))
    for step in range(STEPS):
        train_step(whole_model, whole, step)
    for step in range(4):
        train_step(part_model, part, step)
    part_model, part = save_and_resume(make, part_model, part, drop_proj)
    for step in range(4, STEPS):
        train_step(part_model, part, step)
    assert all(torch.equal(a, b) for a, b in zip(whole_model.parameters(), part_model.parameters()))
    for p, q in zip(whole_model.parameters(), part_model.parameters()):
        for key, value in whole.state[p].items():
            other = part.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


# ---- refusals and settings ----------------------------------------------------------------------
FAMILY_MAKERS = {"fira": lambda g, **kw: galore_ds.FiraAdamW(g, lr=1e-2, weight_decay=0.1, **kw),
                 "apollo": lambda g, **kw: galore_ds.ApolloAdamW(g, lr=LR, **kw)}
FAMILY_GROUPS = {"fira": dict(rank=8), "apollo": APOLLO}


@pytest.mark.parametrize("k,clip,timing", [(2, 0.05, "exact"), (1, 0.05, "delayed"), (1, None, "exact")])
@pytest.mark.parametrize("rule", ["fira", "apollo"])
def test_per_layer_wrapper_equals_the_plain_step(rule, k, clip, timing):
    """LayerwiseOptimizer on these rules (they read the full gradient: autograd sums it over an
    accumulation window) equals the plain optimizer on the window's whole batch, over
    refreshes, with exact clipping (updates at the window's end), delayed clipping and none
    (updates inside the hooks, full gradients freed), within 1e-5; the clip norm is the full
    gradient's, what these rules consume."""
    make, galore = FAMILY_MAKERS[rule], FAMILY_GROUPS[rule]
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    ref = make(groups(ref_model, **galore), max_grad_norm=clip, clip_timing=timing)
    lw = galore_ds.LayerwiseOptimizer(make(groups(model, **galore), max_grad_norm=clip, clip_timing=timing),
                                      accumulation_steps=k)
    for step in range(STEPS):
        x = torch.randint(0, 96, (2 * k, 8), generator=torch.Generator().manual_seed(step))
        ref.zero_grad(set_to_none=True)
        ref_model(input_ids=x, labels=x).loss.backward()
        ref.step()
        for i in range(k):
            (model(input_ids=x[2 * i:2 * i + 2], labels=x[2 * i:2 * i + 2]).loss / k).backward()
            lw.step()
        assert all(p.grad is None for p in model.parameters()), "a full gradient outlived its window"
        diff = max_rel_diff(ref_model, model)
        assert diff <= 1e-5, f"step {step}: {diff:.2e}"
        assert lw.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)
    if clip is not None:
        assert ref.clip_coef < 1.0   # clipping was active


def test_clip_norm_is_the_full_gradients_for_rules_that_read_it():
    """What the optimizer consumes: for Fira and APOLLO the full gradient, so grad_norm equals
    torch's clip_grad_norm_ over the same gradients (GaLore's is the norm of R)."""
    model = tiny_llama()
    opt = galore_ds.ApolloAdamW(groups(model, **APOLLO), lr=LR, max_grad_norm=1e9)
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    opt.step()
    assert opt.grad_norm == pytest.approx(expected, rel=1e-5)


def test_lowrank_comm_hook_is_refused_naming_plain_ddp():
    opt = galore_ds.ApolloAdamW(groups(tiny_llama(), **APOLLO), lr=LR)
    with pytest.raises(ValueError, match=re.escape("use plain DDP")):
        galore_ds.LowRankHookState(opt)


@pytest.mark.parametrize("make,key,value,message", [
    (galore_ds.ApolloAdamW, "scale_type", "row", "scale_type='row': expected one of ('channel', 'tensor')"),
    (galore_ds.FiraAdamW, "proj", "random", "proj='random': this optimizer projects with ('svd',)"),
    (galore_ds.FiraAdamW, "residual", "half", "residual='half': expected one of ('exact', 'scaled')"),
    (galore_ds.ApolloAdamW, "norm_growth_limit", 0.5, "norm_growth_limit=0.5: must be a number >= 1"),
    (galore_ds.ApolloAdamW, "moments", "reproject", "moments='reproject': this optimizer supports ('keep', 'reset')"),
])
def test_bad_family_options_are_refused_naming_the_key(make, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(groups(tiny_llama(), rank=8, **{key: value}), lr=1e-2)


def test_defaults_come_from_the_settings_object():
    model = tiny_llama()
    apollo = [g for g in galore_ds.ApolloAdamW(groups(model, rank=8), lr=LR).param_groups if "rank" in g][0]
    fira_group = [g for g in galore_ds.FiraAdamW(groups(model, rank=8), lr=LR).param_groups if "rank" in g][0]
    assert (apollo["scale"], apollo["scale_type"], apollo["proj"], apollo["proj_seeds"], apollo["norm_growth_limit"]) == \
        (FAMILY.apollo_scale, FAMILY.scale_type, FAMILY.proj, FAMILY.proj_seeds, FAMILY.norm_growth_limit)
    assert (fira_group["residual"], fira_group["norm_growth_limit"], fira_group["scale"]) == \
        (FAMILY.residual, FAMILY.norm_growth_limit, DEFAULTS.scale)
