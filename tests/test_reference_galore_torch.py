"""signs="lapack" reproduces galore-torch 1.0 (the paper's code) bit for bit, every step."""
import copy

import pytest
import torch

import galore_ds
from tiny_models import max_rel_diff, tiny_llama, train_step

galore_torch = pytest.importorskip("galore_torch")

STEPS, GAP = 10, 3  # refreshes at steps 0, 3, 6, 9: three after the first


def _groups(model, proj_type, wd):
    groups = galore_ds.param_groups(model, rank=8, update_proj_gap=GAP, scale=0.25,
                                    proj_type=proj_type, weight_decay=wd)
    for g in groups:
        g.pop("name")  # galore-torch keeps unknown keys too, but keep its groups minimal
    return groups


def _run_pair(make_ref, make_ours, proj_type, wd, tol):
    ref_model = tiny_llama()
    our_model = copy.deepcopy(ref_model)
    ref = make_ref(_groups(ref_model, proj_type, wd))
    ours = make_ours(_groups(our_model, proj_type, wd))
    for step in range(STEPS):
        train_step(ref_model, ref, step)
        train_step(our_model, ours, step)
        diff = max_rel_diff(ref_model, our_model)
        assert diff <= tol, f"step {step}: relative difference {diff:.2e} > {tol:.0e}"
    assert ours.galore_stats["refreshes"] == 4 * 14  # 14 matrices (2 layers x 7), 4 refreshes


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_adamw_is_bit_identical_to_galore_torch_every_step(proj_type, wd):
    _run_pair(
        lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2, weight_decay=wd, no_deprecation_warning=True),
        lambda g: galore_ds.GaLoreAdamW(g, lr=1e-2, weight_decay=wd, signs="lapack"),
        proj_type, wd, tol=0.0,
    )


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_adafactor_is_bit_identical_to_galore_torch_every_step(proj_type, wd):
    kw = dict(lr=1e-3, relative_step=False, scale_parameter=False, weight_decay=wd)
    _run_pair(
        lambda g: galore_torch.GaLoreAdafactor(g, **kw),
        lambda g: galore_ds.GaLoreAdafactor(g, signs="lapack", **kw),
        proj_type, wd, tol=0.0,
    )


def test_adafactor_relative_step_is_bit_identical_to_galore_torch():
    _run_pair(
        lambda g: galore_torch.GaLoreAdafactor(g, lr=None, beta1=0.9),
        lambda g: galore_ds.GaLoreAdafactor(g, lr=None, beta1=0.9, signs="lapack"),
        "std", 0.0, tol=0.0,
    )


def test_without_the_sign_rule_is_what_differs():
    """Default signs="aligned" is not galore-torch: proves the lapack test compares something."""
    ref_model = tiny_llama()
    our_model = copy.deepcopy(ref_model)
    ref = galore_torch.GaLoreAdamW(_groups(ref_model, "std", 0.0), lr=1e-2, no_deprecation_warning=True)
    ours = galore_ds.GaLoreAdamW(_groups(our_model, "std", 0.0), lr=1e-2)
    for step in range(STEPS):
        train_step(ref_model, ref, step)
        train_step(our_model, ours, step)
    assert max_rel_diff(ref_model, our_model) > 1e-4
