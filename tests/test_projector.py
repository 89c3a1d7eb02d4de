"""Projector behaviour: sides, sign rule, randomized refresh, SVD faults, schedule, moments."""
import copy

import pytest
import torch

import galore_ds
from galore_ds.core import projector as pj
from tiny_models import max_rel_diff, tiny_llama, train_step


def _low_rank_matrix(m=96, n=64, decay=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = decay ** torch.arange(n, dtype=torch.float32)
    return (u * s) @ v.t()


def _subspace_error(a, b):
    """Norm of the part of a's rows outside b's row space (orthonormal rows): ~ the sines
    of the principal angles, computed without fp32 cancellation."""
    return float(torch.linalg.norm(a - (a @ b.t()) @ b))


@pytest.mark.parametrize("shape,proj_type,side", [
    ((96, 64), "std", "right"), ((64, 96), "std", "left"), ((64, 64), "std", "right"),
    ((96, 64), "reverse_std", "left"), ((64, 96), "reverse_std", "right"),
    ((10, 4096), "right", "right"), ((4096, 10), "left", "left"),
])
def test_side_comes_from_the_global_shape(shape, proj_type, side):
    assert pj.choose_side(shape, proj_type) == side


def test_optimizer_uses_ds_shape_not_the_local_shape():
    """A ZeRO-3 parameter is (0,) outside forward; its side must follow ds_shape."""
    w = torch.nn.Parameter(torch.randn(6, 16))
    w.ds_shape = (16, 6)  # global shape says right projection... of a 16 x 6 matrix
    opt = galore_ds.GaLoreAdamW([{"params": [w], "rank": 2}])
    assert opt.layout_of(w).shape == (16, 6)


def test_sign_rule_does_not_depend_on_lapack_signs():
    basis = pj.svd_basis(_low_rank_matrix(), 8)
    flips = torch.tensor([1, -1, 1, -1, -1, 1, 1, -1.0]).unsqueeze(1)
    assert torch.equal(pj.fix_signs(basis, None), pj.fix_signs(basis * flips, None))
    prev = pj.fix_signs(basis, None)
    aligned = pj.fix_signs(basis * flips, prev)
    assert bool(((aligned * prev).sum(dim=1) > 0).all())


def test_aligned_signs_keep_perturbed_runs_together_across_refreshes():
    """A 1e-7 gradient perturbation (an all-reduce instead of a local sum) stays 1e-7-sized
    through three refreshes: the property every sharded path relies on."""
    a = tiny_llama()
    b = copy.deepcopy(a)
    opts = [galore_ds.GaLoreAdamW(galore_ds.param_groups(m, rank=8, update_proj_gap=3), lr=1e-2)
            for m in (a, b)]
    for step in range(10):
        for model, opt, noise in ((a, opts[0], 0.0), (b, opts[1], 1e-7)):
            x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(input_ids=x, labels=x).loss.backward()
            for p in model.parameters():
                p.grad.mul_(1 + noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
            opt.step()
    assert max_rel_diff(a, b) < 1e-5


def test_randomized_refresh_tracks_the_exact_subspace():
    g = _low_rank_matrix()
    exact = pj.svd_basis(g, 8)
    # the first refresh is exact when the whole gradient is here
    first = pj.compute_basis(g, "right", 8, "randomized", None)
    assert _subspace_error(exact, first) < 1e-4
    # warm start from a nearby matrix's basis: one iteration, with and without oversampling
    prev = pj.svd_basis(g + 1e-3 * _low_rank_matrix(seed=1), 8)
    for oversample in (0, 8):
        warm = pj.compute_basis(g, "right", 8, "randomized", prev, iters=1, oversample=oversample,
                                generator=pj.refresh_generator(0, 1, 0))
        assert _subspace_error(exact, warm) < _subspace_error(exact, prev)
        assert _subspace_error(exact, warm) < 1e-3
    left_prev = pj.fix_signs(pj.svd_basis(g.t() + 1e-3 * _low_rank_matrix(seed=1).t(), 8, "left"), None)
    left = pj.compute_basis(g.t(), "left", 8, "randomized", left_prev)
    assert _subspace_error(exact, left) < 1e-3


def test_warm_refresh_keeps_vectors_aligned_with_their_predecessors():
    g = _low_rank_matrix()
    prev = pj.fix_signs(pj.svd_basis(g + 1e-3 * _low_rank_matrix(seed=1), 8), None)
    warm = pj.compute_basis(g, "right", 8, "randomized", prev)
    assert bool(((warm * prev).sum(dim=1) > 0.99).all())


def test_cold_randomized_refresh_is_a_seeded_subspace_iteration_not_an_svd(monkeypatch):
    """The first randomized refresh never calls an SVD (a 7B model's exact SVDs take ~90 min on
    CPU): first_iters iterations from a seeded Gaussian start find the top subspace."""
    g = _low_rank_matrix()
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("svd called")))
    cold = pj.compute_basis(g, "right", 8, "randomized", None, generator=pj.refresh_generator(0, 0, 0))
    again = pj.compute_basis(g, "right", 8, "randomized", None, generator=pj.refresh_generator(0, 0, 0))
    assert torch.equal(cold, again)
    monkeypatch.undo()
    assert _subspace_error(pj.svd_basis(g, 8), cold) < 1e-3
    # signs by the same rule as every refresh: largest-magnitude entry positive
    assert bool((cold.gather(1, cold.abs().argmax(dim=1, keepdim=True)) > 0).all())


def test_randomized_refresh_is_seeded_by_step_and_parameter():
    g = torch.randn(64, 48)
    same = [pj.compute_basis(g, "right", 4, "randomized", None, generator=pj.refresh_generator(0, 5, 2))
            for _ in range(2)]
    assert torch.equal(same[0], same[1])


@pytest.mark.parametrize("warm", [False, True])
def test_program_driven_by_a_sharded_gram_operator_gives_the_same_basis(warm):
    """A row-sharded caller answers the program's requests with sum_i G_i^T G_i X; the answer
    is the unsharded one, cold and warm."""
    g = _low_rank_matrix()
    shards = torch.split(g, [40, 0, 56])  # uneven, one empty
    prev = pj.fix_signs(pj.svd_basis(g + 1e-2 * _low_rank_matrix(seed=1), 8), None) if warm else None
    full = pj.compute_basis(g, "right", 8, "randomized", prev, generator=pj.refresh_generator(0, 3, 1))
    program = pj.randomized_program(g.shape[1], 8, prev, oversample=0, iters=1, first_iters=4,
                                    generator=pj.refresh_generator(0, 3, 1), device=g.device)
    sharded = pj.finish_basis(pj.run_program(program, lambda x: sum(s.t() @ (s @ x) for s in shards)),
                              prev, "aligned")
    assert torch.allclose(full, sharded, atol=1e-5)


def _one_matrix_opt(**kw):
    w = torch.nn.Parameter(torch.randn(32, 24, generator=torch.Generator().manual_seed(0)))
    opt = galore_ds.GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, **kw}], lr=1e-2)
    return w, opt


def _step(w, opt, grad):
    w.grad = grad.clone()
    opt.step()


def test_svd_that_fails_in_fp32_is_retried_in_fp64(monkeypatch):
    w, opt = _one_matrix_opt()
    real_svd = torch.linalg.svd

    def fp32_fails(a, *args, **kwargs):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: SVD did not converge")
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fp32_fails)
    _step(w, opt, torch.randn(32, 24))
    state = opt.state[w]
    assert torch.isfinite(state["proj"]).all() and opt.galore_stats["svd_failures"] == 0
    eye = state["proj"] @ state["proj"].t()
    assert torch.allclose(eye, torch.eye(4), atol=1e-5)


def test_svd_failure_keeps_the_previous_projector_and_training_goes_on(monkeypatch):
    w, opt = _one_matrix_opt()
    _step(w, opt, torch.randn(32, 24))
    _step(w, opt, torch.randn(32, 24))
    before = opt.state[w]["proj"].clone()

    def always_fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: SVD did not converge")

    monkeypatch.setattr(torch.linalg, "svd", always_fails)
    _step(w, opt, torch.randn(32, 24))  # step 2: refresh due, fails
    assert torch.equal(opt.state[w]["proj"], before)
    assert opt.galore_stats["svd_failures"] == 1
    assert torch.isfinite(w).all()


def test_nonfinite_gradient_never_reaches_the_projector():
    w, opt = _one_matrix_opt()
    _step(w, opt, torch.randn(32, 24))
    _step(w, opt, torch.randn(32, 24))
    before = opt.state[w]["proj"].clone()
    bad = torch.randn(32, 24)
    bad[3, 4] = float("nan")
    _step(w, opt, bad)
    assert torch.equal(opt.state[w]["proj"], before)
    assert opt.galore_stats["nonfinite_refresh_skipped"] == 1


def test_refresh_every_update_proj_gap_steps_from_step_zero():
    w, opt = _one_matrix_opt()
    seen = []
    for step in range(7):
        _step(w, opt, torch.randn(32, 24))
        seen.append(opt.galore_stats["refreshes"])
    assert seen == [1, 1, 2, 2, 3, 3, 4]  # refreshes at steps 0, 2, 4, 6


def test_staggered_refresh_spreads_matrices_across_the_window():
    params = [torch.nn.Parameter(torch.randn(16, 12)) for _ in range(4)]
    opt = galore_ds.GaLoreAdamW([{"params": params, "rank": 2, "update_proj_gap": 4}],
                                lr=1e-3, stagger=True)
    per_step = []
    for step in range(9):
        for p in params:
            p.grad = torch.randn_like(p)
        before = opt.galore_stats["refreshes"]
        opt.step()
        per_step.append(opt.galore_stats["refreshes"] - before)
    # step 0: every matrix needs a first projector; then one matrix per step
    assert per_step == [4, 1, 1, 1, 1, 1, 1, 1, 1]


def test_reprojected_moments_describe_the_same_full_space_moment():
    w, opt = _one_matrix_opt(moments="reproject")
    torch.manual_seed(0)
    low = torch.randn(32, 3) @ torch.randn(3, 24)  # rank 3 < 4: the subspace is stable
    _step(w, opt, low)
    _step(w, opt, low)
    st = opt.state[w]
    full_before = st["exp_avg"] @ st["proj"]
    _step(w, opt, -low * 1.0000001)  # refresh: LAPACK may choose other vectors in the subspace
    # undo this step's moment update to compare the carried moment alone
    beta1 = 0.9
    carried = (st["exp_avg"] - (1 - beta1) * (-low * 1.0000001) @ st["proj"].t()) / beta1
    assert torch.allclose(carried @ st["proj"], full_before, atol=1e-5)


def test_reset_moments_on_refresh():
    w, opt = _one_matrix_opt(moments="reset")
    _step(w, opt, torch.randn(32, 24))
    _step(w, opt, torch.randn(32, 24))
    g = torch.randn(32, 24)
    _step(w, opt, g)  # refresh at step 2 zeroes the moments, then this step's gradient enters
    st = opt.state[w]
    assert torch.allclose(st["exp_avg"], 0.1 * (g @ st["proj"].t()), atol=1e-6)


@pytest.mark.parametrize("group,message", [
    ({"rank": 0}, "rank=0"),
    ({"rank": 40}, "rank=40 exceeds"),
    ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap=0"),
    ({"rank": 4, "proj_type": "diagonal"}, "proj_type='diagonal'"),
    ({"rank": 4, "refresh": "qr"}, "refresh='qr'"),
    ({"rank": 4, "signs": "random"}, "signs='random'"),
])
def test_bad_group_settings_are_refused_with_the_key_named(group, message):
    w = torch.nn.Parameter(torch.randn(32, 24))
    with pytest.raises(ValueError, match=message):
        galore_ds.GaLoreAdamW([{"params": [w], **group}])


def test_reproject_is_refused_where_unsupported():
    w = torch.nn.Parameter(torch.randn(32, 24))
    with pytest.raises(ValueError, match="moments='reproject'"):
        galore_ds.GaLoreAdamW8bit([{"params": [w], "rank": 4}], moments="reproject")


def test_non_matrix_in_a_galore_group_is_refused():
    with pytest.raises(ValueError, match="only 2-D"):
        galore_ds.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(8))], "rank": 2}])


@pytest.mark.parametrize("make", [galore_ds.GaLoreAdamW, galore_ds.GaLoreAdamW8bit])
@pytest.mark.parametrize("kw,message", [({"lr": -1.0}, "lr=-1.0"), ({"betas": (0.9, 1.0)}, "betas"),
                                        ({"eps": -1e-8}, "eps=")])
def test_bad_adam_hyperparameters_are_refused(make, kw, message):
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.randn(4, 4))], **kw)
