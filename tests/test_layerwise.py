"""Per-layer mode (galore_ds.LayerwiseOptimizer): exact accumulation, clipping, scheduler, resume."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from galore_ds import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, param_groups
from galore_ds.core import projector as pj
from galore_ds import LayerwiseOptimizer
from tiny_models import batch, tiny_llama

VOCAB = 96
MICRO = 2   # micro-batch size B
SEQ = 16


def make(opt_cls=GaLoreAdamW, seed=0, rank=8, gap=2, stagger=True, **kw):
    model = tiny_llama(seed=seed)
    opt = opt_cls(param_groups(model, rank=rank, update_proj_gap=gap, stagger=stagger), **kw)
    return model, opt


def big_batch(step, k):
    return batch(step, VOCAB, bsz=MICRO * k, seq=SEQ)


def loss_of(model, x):
    return model(input_ids=x, labels=x).loss


def reference_steps(model, opt, steps, k, clip=None, scale_fn=None):
    """The ordinary optimizer on one batch of k*B per step."""
    norms = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, big_batch(s, k)).backward()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if scale_fn is not None:
            c = scale_fn(s)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(c)
        opt.step()
    return norms


def layerwise_steps(model, lw, steps, k, check_freed=True):
    done = 0
    for s in range(steps):
        x = big_batch(s, k)
        for i in range(k):
            (loss_of(model, x[i * MICRO:(i + 1) * MICRO]) / k).backward()
            done += lw.step()
        if check_freed:
            assert all(p.grad is None for p in model.parameters()), "gradients not freed"
    return done


def max_abs_diff(a, b):
    return max(float((pa - pb).detach().abs().max()) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("opt_cls,kw", [
    (GaLoreAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (GaLoreAdamW8bit, dict(lr=1e-2, min_8bit_size=256)),
    (GaLoreAdafactor, dict(lr=1e-2, relative_step=False, scale_parameter=False)),
])
def test_k1_matches_ordinary_optimizer(opt_cls, kw):
    """k=1, no clipping: each parameter updated inside its hook, grads freed, same weights."""
    ref, ref_opt = make(opt_cls, **kw)
    model, opt = make(opt_cls, **kw)
    lw = LayerwiseOptimizer(opt)
    assert not lw.deferred
    reference_steps(ref, ref_opt, 4, 1)
    assert layerwise_steps(model, lw, 4, 1) == 4
    assert max_abs_diff(ref, model) < 1e-6
    assert opt.galore_stats["refreshes"] == ref_opt.galore_stats["refreshes"] > 0


@pytest.mark.parametrize("stagger", [True, False])
def test_accumulation_k4_equals_one_batch_of_4B(stagger):
    """4 micro-batches of B == one batch of 4B, over several refreshes (gap 2, 8 steps), some of
    them inside accumulation windows with staggered offsets; fp32 within 1e-5."""
    k, steps = 4, 8
    ref, ref_opt = make(lr=1e-2, stagger=stagger)
    model, opt = make(lr=1e-2, stagger=stagger)
    lw = LayerwiseOptimizer(opt, accumulation_steps=k)
    reference_steps(ref, ref_opt, steps, k)
    assert layerwise_steps(model, lw, steps, k) == steps
    assert opt.galore_stats["refreshes"] == ref_opt.galore_stats["refreshes"] >= 4 * 7 * 2
    assert max_abs_diff(ref, model) < 1e-5
    # and the update is not trivially zero
    assert max_abs_diff(ref, tiny_llama(seed=0)) > 1e-3


def test_accumulation_adafactor_exact_and_8bit_close():
    """Adafactor: exact (1e-5). 8-bit: blockwise quantisation turns 1e-7 rounding differences
    into code flips (1e-7 relative noise on the ordinary 8-bit optimizer's own gradients moves
    its weights by 3e-2 here), so 8-bit is held to its own noise floor, not to 1e-5."""
    from tiny_models import max_rel_diff
    for cls, kw, tol in [
        (GaLoreAdafactor, dict(lr=1e-2, relative_step=False, scale_parameter=False), 1e-5),
        (GaLoreAdamW8bit, dict(lr=1e-2, min_8bit_size=256), 3e-2),
    ]:
        ref, ref_opt = make(cls, **kw)
        model, opt = make(cls, **kw)
        lw = LayerwiseOptimizer(opt, accumulation_steps=4)
        reference_steps(ref, ref_opt, 4, 4)
        layerwise_steps(model, lw, 4, 4)
        err = max_abs_diff(ref, model) if tol == 1e-5 else max_rel_diff(ref, model)
        assert err < tol, (cls.__name__, err)


def test_naive_per_microbatch_stepping_is_wrong():
    """The anchors' bug (GaLore #78): stepping on every micro-batch is far from the reference."""
    ref, ref_opt = make(lr=1e-2)
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, accumulation_steps=1)
    reference_steps(ref, ref_opt, 2, 4)
    for s in range(2):
        x = big_batch(s, 4)
        for i in range(4):
            (loss_of(model, x[i * MICRO:(i + 1) * MICRO]) / 4).backward()
            lw.step()
    assert max_abs_diff(ref, model) > 1e-3


def test_k1_exact_clipping_equals_the_optimizers_own_clipping():
    """k=1 with max_grad_norm: the per-layer hooks clip exactly as the optimizer's own step does
    (the norm of what it consumes); oversized gradients hit the threshold."""
    max_norm = 0.05
    ref, ref_opt = make(lr=1e-2, max_grad_norm=max_norm)
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, max_grad_norm=max_norm)
    for s in range(4):
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, big_batch(s, 1)).backward()
        ref_opt.step()
        (loss_of(model, big_batch(s, 1))).backward()
        assert lw.step()
        assert all(p.grad is None for p in model.parameters())
        assert lw.grad_norm == pytest.approx(ref_opt.grad_norm, rel=1e-5)
        assert lw.grad_norm > 10 * max_norm          # oversized
        assert lw.clip_coef * lw.grad_norm == pytest.approx(max_norm, rel=1e-4)
        assert ref_opt.clip_coef == pytest.approx(lw.clip_coef, rel=1e-5)
    assert max_abs_diff(ref, model) < 1e-5


def test_delayed_clipping_uses_the_previous_norm_and_keeps_updates_in_the_hooks():
    """clip_timing='delayed' (k=1): step t's gradient is scaled by the coefficient from step
    t-1's norm (step 0 unscaled), updates still run inside the hooks (gradients freed as
    they come: no deferred low-rank buffers), and the logged norm is this step's, exact."""
    max_norm, steps = 0.05, 5
    ref, ref_opt = make(lr=1e-2)
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, max_grad_norm=max_norm, clip_timing="delayed")
    assert not lw.deferred
    coef, norms, coefs = 1.0, [], []
    for s in range(steps):
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, big_batch(s, 1)).backward()
        for p in ref.parameters():
            p.grad.mul_(coef)
        ref_opt.step()
        norm = ref_opt.grad_norm / coef  # the consumed norm of the unscaled gradient
        norms.append(norm)
        coefs.append(coef)
        coef = min(1.0, max_norm / (norm + 1e-6))
    seen = {"max_live_grads": 0}

    def count(_):
        seen["max_live_grads"] = max(seen["max_live_grads"],
                                     sum(p.grad is not None for p in model.parameters()))
    hooks = [p.register_post_accumulate_grad_hook(count) for p in model.parameters()]
    for s in range(steps):
        loss_of(model, big_batch(s, 1)).backward()
        assert lw.step()
        assert lw.grad_norm == pytest.approx(norms[s], rel=1e-5)
        assert lw.clip_coef == pytest.approx(coefs[s], rel=1e-6)
    for h in hooks:
        h.remove()
    assert coefs[0] == 1.0 and all(c < 0.1 for c in coefs[1:])  # really clipped from step 1
    assert seen["max_live_grads"] <= 2  # freed in the hooks (the counter itself sees one)
    assert max_abs_diff(ref, model) < 1e-5


def test_delayed_clipping_resumes_with_its_pending_coefficient():
    max_norm = 0.05
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, max_grad_norm=max_norm, clip_timing="delayed")
    layerwise_steps(model, lw, 2, 1)
    sd = copy.deepcopy(lw.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = GaLoreAdamW(param_groups(model2, rank=8, update_proj_gap=2, stagger=True), lr=1e-2)
    lw2 = LayerwiseOptimizer(opt2, max_grad_norm=max_norm, clip_timing="delayed")
    lw2.load_state_dict(sd)
    layerwise_steps(model, lw, 2, 1)
    layerwise_steps(model2, lw2, 2, 1)
    assert lw.clip_coef == lw2.clip_coef < 1.0
    assert max_abs_diff(model, model2) == 0.0


def _consumed_norm(model, opt):
    """sqrt(sum ||P(G)||^2 over GaLore matrices + sum ||G||^2 over the rest), from the
    ordinary optimizer's projectors after its step."""
    sq = 0.0
    galore = {p for g in opt.param_groups if "rank" in g for p in g["params"]}
    for p in model.parameters():
        if p.grad is None:
            continue
        if p in galore:
            st = opt.state[p]
            sq += float(pj.project(p.grad, st["proj"], "right" if st["proj_right"] else "left").square().sum())
        else:
            sq += float(p.grad.square().sum())
    return math.sqrt(sq)


def test_clip_lowrank_with_accumulation_scales_to_threshold():
    """k=4, clip on the consumed (low-rank) norm: the norm is the true norm of what the
    optimizer consumes, the clipped gradient has norm == threshold, and the weights equal the
    ordinary optimizer's on the 4B batch with its gradient scaled by the same coefficient."""
    k, steps, max_norm = 4, 4, 0.05
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, accumulation_steps=k, max_grad_norm=max_norm)
    coefs, norms = [], []
    for s in range(steps):
        x = big_batch(s, k)
        for i in range(k):
            (loss_of(model, x[i * MICRO:(i + 1) * MICRO]) / k).backward()
            lw.step()
        assert lw.grad_norm > 10 * max_norm
        assert lw.clip_coef * lw.grad_norm == pytest.approx(max_norm, rel=1e-4)
        coefs.append(lw.clip_coef)
        norms.append(lw.grad_norm)
    ref, ref_opt = make(lr=1e-2)
    for s in range(steps):
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, big_batch(s, k)).backward()
        for p in ref.parameters():
            p.grad.mul_(coefs[s])
        ref_opt.step()
        # the consumed norm, with the projector this step used (refreshes included)
        assert _consumed_norm(ref, ref_opt) / coefs[s] == pytest.approx(norms[s], rel=1e-5)
        assert _consumed_norm(ref, ref_opt) == pytest.approx(max_norm, rel=1e-4)
    ref2 = ref
    assert max_abs_diff(ref2, model) < 1e-5


def test_no_clip_when_under_threshold():
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, max_grad_norm=1e6)
    loss_of(model, big_batch(0, 1)).backward()
    lw.step()
    assert lw.clip_coef == 1.0 and lw.grad_norm > 0


def test_scheduler_steps_once_per_optimizer_step():
    model, opt = make(lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    lw = LayerwiseOptimizer(opt, accumulation_steps=4, lr_scheduler=sched)
    assert layerwise_steps(model, lw, 3, 4) == 3
    assert sched.last_epoch == 3 and lw.global_step == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert all(st["step"] == 3 for st in opt.state.values())


def _run_micro(model, lw, s, i, k):
    x = big_batch(s, k)
    (loss_of(model, x[i * MICRO:(i + 1) * MICRO]) / k).backward()
    lw.step()


@pytest.mark.parametrize("opt_cls,kw", [
    (GaLoreAdamW, dict(lr=1e-2)),
    (GaLoreAdamW8bit, dict(lr=1e-2, min_8bit_size=256)),
])
def test_resume_mid_window_is_bit_identical(opt_cls, kw):
    """Checkpoint after 1 step + 2 of 4 micro-batches (partial low-rank accumulators and
    partial full gradients of matrices refreshing in this window); resume == uninterrupted."""
    k = 4
    model, opt = make(opt_cls, gap=2, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    lw = LayerwiseOptimizer(opt, accumulation_steps=k, max_grad_norm=1.0, lr_scheduler=sched)
    for i in range(k):
        _run_micro(model, lw, 0, i, k)
    for i in range(2):
        _run_micro(model, lw, 1, i, k)
    assert lw._acc and any(p.grad is not None for p in model.parameters())
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "lw": lw.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2, opt2 = make(opt_cls, gap=2, seed=1, **kw)
    model2.load_state_dict(ckpt["model"])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.9 ** s)
    lw2 = LayerwiseOptimizer(opt2, accumulation_steps=k, max_grad_norm=1.0, lr_scheduler=sched2)
    lw2.load_state_dict(ckpt["lw"])
    for m, l in ((model, lw), (model2, lw2)):
        for i in range(2, k):
            _run_micro(m, l, 1, i, k)
        for s in (2, 3):
            for i in range(k):
                _run_micro(m, l, s, i, k)
    assert lw2.global_step == lw.global_step == 4
    assert lw2.grad_norm == lw.grad_norm
    for pa, pb in zip(model.parameters(), model2.parameters()):
        assert torch.equal(pa, pb)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bf16_weights_8bit_runs_and_frees_grads():
    model, _ = make()
    model = model.to(torch.bfloat16)
    opt = GaLoreAdamW8bit(param_groups(model, rank=8, update_proj_gap=2, stagger=True), lr=1e-2,
                          min_8bit_size=256)
    lw = LayerwiseOptimizer(opt, accumulation_steps=2, max_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    layerwise_steps(model, lw, 3, 2)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert math.isfinite(lw.grad_norm)


def test_bad_arguments():
    model, opt = make()
    with pytest.raises(ValueError):
        LayerwiseOptimizer(opt, accumulation_steps=0)
    with pytest.raises(ValueError):
        LayerwiseOptimizer(opt, max_grad_norm=0.0)
    with pytest.raises(ValueError):
        LayerwiseOptimizer(opt, clip_timing="later")
    with pytest.raises(TypeError):
        LayerwiseOptimizer(torch.optim.SGD(model.parameters(), lr=1.0))


def test_activation_checkpointing_and_tied_embeddings():
    """Hooks fire correctly under activation checkpointing (recomputed forward) and for a
    tied embedding/lm_head (one hook, the summed gradient): same weights as the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                          tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg)
        return m, GaLoreAdamW(param_groups(m, rank=8, update_proj_gap=2, stagger=True), lr=1e-2)

    ref, ref_opt = build()
    model, opt = build()
    model.gradient_checkpointing_enable()
    model.train()
    lw = LayerwiseOptimizer(opt, accumulation_steps=2)
    reference_steps(ref, ref_opt, 3, 2)
    layerwise_steps(model, lw, 3, 2)
    assert max_abs_diff(ref, model) < 1e-5


def _poison(model, name):
    p = dict(model.named_parameters())[name]
    return p, p.register_hook(lambda g: g.clone().index_fill_(0, torch.tensor([0]), math.nan))


@pytest.mark.parametrize("gap_step", [False, True], ids=["steady", "refresh-step"])
def test_nan_in_immediate_mode_drops_only_that_update(gap_step):
    """No clipping, one micro-batch: updates run inside the hooks, so a NaN gradient cannot
    drop the whole step; it drops that parameter's update (and refresh), never writes NaN
    into a weight, and every other parameter steps as usual."""
    model, opt = make(gap=2)
    lw = LayerwiseOptimizer(opt)
    assert not lw.deferred
    steps = 2 if gap_step else 1  # step 2 refreshes (gap 2): its new projector is put back
    layerwise_steps(model, lw, steps, 1)
    name = "model.layers.0.mlp.up_proj.weight"
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    target, h = _poison(model, name)
    state_before = copy.deepcopy(opt.state[target])
    loss_of(model, big_batch(steps, 1)).backward()
    assert lw.step()
    h.remove()
    after = dict(model.named_parameters())
    assert torch.equal(after[name], before[name])
    st = opt.state[target]
    assert st.keys() == state_before.keys() and all(
        torch.equal(st[k], state_before[k]) if torch.is_tensor(st[k]) else st[k] == state_before[k] for k in st)
    changed = [n for n in before if n != name and not torch.equal(after[n], before[n])]
    assert len(changed) == len(before) - 1
    assert lw.nonfinite_params_skipped == 1 and lw.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ issue 21: loops the wrapper meets
def _split_off(groups, late):
    """param_groups without the parameters in `late` (they join later through add_param_group)."""
    ids = {id(p) for p in late}
    out = []
    for g in groups:
        keep = [i for i, p in enumerate(g["params"]) if id(p) not in ids]
        out.append({**g, "params": [g["params"][i] for i in keep],
                    "param_names": [g["param_names"][i] for i in keep]})
    return out


def _late_groups(model, groups):
    """A full-rank group (lm_head) and a GaLore group (one MLP matrix) with the GaLore keys of
    param_groups' own GaLore group, so both optimizers read the same settings."""
    galore = next(g for g in groups if "rank" in g)
    keys = {k: v for k, v in galore.items() if k not in ("params", "param_names", "name")}
    name = "model.layers.1.mlp.down_proj.weight"
    return [{"params": [model.lm_head.weight], "param_names": ["lm_head.weight"]},
            {"params": [model.get_parameter(name)], "param_names": [name], **keys}]


def test_a_group_added_after_construction_is_updated_like_the_plain_optimizer():
    """issue 21 #8/9: opt.add_param_group(...) after LayerwiseOptimizer was built (progressive
    unfreezing). The wrapper hooks the new parameters at its next step(); the weights equal the
    ordinary optimizer given the same groups at the same step (k=2, exact clipping, gap 2: the
    new GaLore matrix refreshes), and the new parameters' gradients are freed like the others.
    Gradients a late parameter gathered before (nobody freed them) join its first step, as in
    the plain loop that calls zero_grad after step."""
    k, before, after = 2, 2, 4

    def build(**kw):
        model = tiny_llama(seed=0)
        groups = param_groups(model, rank=8, update_proj_gap=2, stagger=True)
        late = _late_groups(model, groups)
        opt = GaLoreAdamW(_split_off(groups, [p for g in late for p in g["params"]]), lr=1e-2, **kw)
        return model, opt, late

    ref, ref_opt, ref_late = build(max_grad_norm=0.05)
    model, opt, late = build()
    start = [p.detach().clone() for g in late for p in g["params"]]
    lw = LayerwiseOptimizer(opt, accumulation_steps=k, max_grad_norm=0.05)
    for s in range(before + after):
        if s == before:
            for g_ref, g in zip(ref_late, late):
                ref_opt.add_param_group(g_ref)
                opt.add_param_group(g)
        loss_of(ref, big_batch(s, k)).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)  # (after the step: a late parameter's earlier gradients count, as in lw)
        x = big_batch(s, k)
        for i in range(k):
            (loss_of(model, x[i * MICRO:(i + 1) * MICRO]) / k).backward()
            lw.step()
        if s >= before:
            assert all(p.grad is None for p in model.parameters()), "gradients not freed"
    moved = [float((p - q).abs().max()) for p, q in zip((p for g in late for p in g["params"]), start)]
    assert min(moved) > 1e-3, moved
    assert max_abs_diff(ref, model) < 1e-5


@pytest.mark.parametrize("clip_timing", ["exact", "delayed"])
def test_a_partial_last_window_closed_with_end_window_equals_the_plain_loop(clip_timing):
    """issue 21 #10, the plain loop: an epoch of 5 micro-batches with accumulation_steps=2 steps
    on windows of 2, 2 and 1 (`(i + 1) % k == 0 or i == last`, each loss divided by k, as
    Accelerate's accumulate() does at the end of a dataloader). lw.step(end_window=True) closes
    the partial window; 2 epochs with clipping (exact, or delayed: the previous step's
    coefficient) and gap 2, so refreshes land in partial windows: equal to the ordinary
    optimizer within 1e-5. Without end_window the partial window runs into the next epoch."""
    k, n, epochs, clip = 2, 5, 2, 0.05
    ref, ref_opt = make(lr=1e-2, max_grad_norm=clip, clip_timing=clip_timing)
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, accumulation_steps=k, max_grad_norm=clip, clip_timing=clip_timing)
    steps = 0
    for _ in range(epochs):
        for i in range(n):
            x = batch(i, VOCAB, bsz=MICRO, seq=SEQ)
            last = (i + 1) % k == 0 or i == n - 1
            (loss_of(ref, x) / k).backward()
            if last:
                ref_opt.step()
                ref_opt.zero_grad(set_to_none=True)
            (loss_of(model, x) / lw.loss_divisor).backward()
            steps += lw.step(end_window=i == n - 1)
            assert lw.micro_step == (0 if last else 1)
            if last:
                assert lw.grad_norm == pytest.approx(ref_opt.grad_norm, rel=1e-5)
                assert lw.clip_coef == pytest.approx(ref_opt.clip_coef, rel=1e-5)
    assert steps == lw.global_step == epochs * 3
    assert opt.galore_stats["refreshes"] == ref_opt.galore_stats["refreshes"] > 0
    assert lw.clip_coef < 1.0
    assert max_abs_diff(ref, model) < 1e-5


def _accelerate_run(per_layer: bool):
    """Accelerate's gradient accumulation on a 5-batch dataloader, 2 per window: the last
    window holds 1 batch (sync_gradients at the end of the dataloader), each loss divided by 2
    by accelerator.backward. The ordinary optimizer goes through accelerator.prepare; the
    per-layer one closes each window where Accelerate syncs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = make(lr=1e-2, max_grad_norm=0.05) if not per_layer else make(lr=1e-2)
    loader = torch.utils.data.DataLoader([batch(i, VOCAB, bsz=1, seq=SEQ)[0] for i in range(5 * MICRO)],
                                         batch_size=MICRO)
    if per_layer:
        model, loader = accelerator.prepare(model, loader)
        lw = LayerwiseOptimizer(opt, accumulation_steps=2, max_grad_norm=0.05)
    else:
        model, opt, loader = accelerator.prepare(model, opt, loader)
    steps = 0
    for _ in range(2):
        for x in loader:
            with accelerator.accumulate(model):
                accelerator.backward(loss_of(model, x))
                if per_layer:
                    steps += lw.step(end_window=accelerator.sync_gradients)
                else:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
    if per_layer:
        assert steps == lw.global_step == 6
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return accelerator.unwrap_model(model)


def test_accelerate_gradient_accumulation_partial_window_equals_the_prepared_optimizer():
    """Accelerate's accumulate() steps at the end of the dataloader on a partial window; the
    per-layer wrapper told so through step(end_window=accelerator.sync_gradients) gives the
    weights of the ordinary optimizer Accelerate prepared (exact clipping, 2 epochs)."""
    ref = _accelerate_run(per_layer=False)
    model = _accelerate_run(per_layer=True)
    assert max_abs_diff(ref, model) < 1e-5


def test_clip_grad_norm_between_backward_and_step_is_refused():
    """torch.nn.utils.clip_grad_norm_ after backward in per-layer mode: the GaLore matrices'
    gradients are already projected and freed, so it would clip the rest by a partial norm
    after the hooks counted them; refused with one line naming max_grad_norm. (Where every
    update already ran inside the hooks, no gradient is left for it to change: it returns 0.)"""
    model, opt = make(lr=1e-2)
    lw = LayerwiseOptimizer(opt, max_grad_norm=1.0)  # exact clipping: updates wait for step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_of(model, big_batch(0, 1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    with pytest.raises(RuntimeError, match="max_grad_norm") as err:
        lw.step()
    assert "\n" not in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
