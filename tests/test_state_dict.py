"""Optimizer state is plain tensors and numbers, and a resumed run is bit-identical."""
import copy
import io
import pickle

import pytest
import torch

import galore_ds
from tiny_models import tiny_llama, train_step

OPTIMIZERS = {
    "adamw": lambda g, **kw: galore_ds.GaLoreAdamW(g, lr=1e-2, weight_decay=0.01, **kw),
    "adamw8bit": lambda g, **kw: galore_ds.GaLoreAdamW8bit(g, lr=1e-2, min_8bit_size=0, **kw),
    "adafactor": lambda g, **kw: galore_ds.GaLoreAdafactor(g, lr=1e-2, relative_step=False,
                                                           scale_parameter=False, **kw),
}


def _make(name, model, **kw):
    groups = galore_ds.param_groups(model, rank=8, update_proj_gap=3)
    return OPTIMIZERS[name](groups, **kw)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_loads_with_weights_only(name):
    model = tiny_llama()
    opt = _make(name, model)
    for step in range(4):
        train_step(model, opt, step)
    loaded = _roundtrip(opt.state_dict())  # raises UnpicklingError on any non-plain object
    galore_state = [s for s in loaded["state"].values() if "proj" in s]
    assert galore_state and all(torch.is_tensor(s["proj"]) for s in galore_state)
    if name == "adamw8bit":
        assert any(s["state1"].dtype == torch.uint8 for s in galore_state)


@pytest.mark.parametrize("refresh", ["svd", "randomized"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bit_identical_across_a_later_refresh(name, refresh):
    """8 steps straight == 4 steps, save, fresh model+optimizer, load, 4 steps (refresh at 6)."""
    straight = tiny_llama()
    opt = _make(name, straight, refresh=refresh, stagger=True)
    for step in range(8):
        train_step(straight, opt, step)

    first = tiny_llama()
    opt1 = _make(name, first, refresh=refresh, stagger=True)
    for step in range(4):
        train_step(first, opt1, step)
    saved = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})

    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = _make(name, resumed, refresh=refresh, stagger=True)
    opt2.load_state_dict(saved["opt"])
    for step in range(4, 8):
        train_step(resumed, opt2, step)
    assert opt2.galore_stats["refreshes"] > 0
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after resume"


def test_bf16_weights_keep_fp32_moments_and_bf16_projectors_through_load():
    # Projectors of bf16 weights are stored in bf16 (every projection casts them to the
    # weight's dtype anyway); moments stay fp32, and a load changes neither dtype.
    model = tiny_llama().to(torch.bfloat16)
    opt = _make("adamw", model)
    train_step(model, opt, 0)
    fresh = _make("adamw", model)
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    state = next(s for s in fresh.state.values() if "proj" in s)
    assert state["proj"].dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32
    for a, b in zip(opt.state.values(), fresh.state.values()):
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(a[k], b[k]), k


def test_state_has_no_python_objects_beyond_numbers_and_strings():
    model = tiny_llama()
    opt = _make("adamw", model)
    train_step(model, opt, 0)
    allowed = (int, float, bool, str, type(None), torch.Tensor)
    for s in opt.state_dict()["state"].values():
        for key, value in s.items():
            assert isinstance(value, allowed), (key, type(value))
    pickle.dumps(opt.state_dict())


def test_adamw_batches_are_bounded_and_give_the_same_step(monkeypatch):
    """Foreach batching by size changes memory, never the arithmetic."""
    from galore_ds.core import adamw

    runs = []
    real = adamw.AdamWRule._adam
    for limit in (1 << 24, 1):  # one batch per group vs one item per batch
        monkeypatch.setattr(adamw, "MAX_NUMEL", limit)
        sizes = []
        monkeypatch.setattr(adamw.AdamWRule, "_adam",
                            lambda self, items: (sizes.append(len(items)), real(self, items))[1])
        model = tiny_llama()
        opt = _make("adamw", model)
        for step in range(4):
            train_step(model, opt, step)
        runs.append((model, sizes))
    assert max(runs[0][1]) > 1 and max(runs[1][1]) == 1
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(a, b)


def test_bf16_projector_storage_changes_no_weight(monkeypatch):
    """Storing bf16 weights' projectors in bf16 saves memory and nothing else: 7 steps with 3
    refreshes (gap 3) give bit-identical weights to the run with fp32-stored projectors."""
    from galore_ds.core import projector as pj

    def run():
        model = tiny_llama().to(torch.bfloat16)
        opt = _make("adamw", model)
        for step in range(7):
            train_step(model, opt, step)
        return [p.detach().clone() for p in model.parameters()], opt

    bf16_weights, opt = run()
    assert {s["proj"].dtype for s in opt.state.values() if "proj" in s} == {torch.bfloat16}
    monkeypatch.setattr(pj, "storage_dtype", lambda dtype: torch.float32)
    fp32_weights, opt = run()
    assert {s["proj"].dtype for s in opt.state.values() if "proj" in s} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(bf16_weights, fp32_weights))


@pytest.mark.parametrize("refresh", ["svd", "randomized"])
@pytest.mark.parametrize("proj_type", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dcp_resume_is_bit_identical_although_dcp_loads_row_major_tensors(tmp_path, proj_type, refresh, dtype):
    """torch.distributed.checkpoint (FSDP, torchtitan) loads into freshly allocated row-major
    tensors; a projector's layout changes a matmul's rounding, so the optimizer keeps one
    layout whatever it is handed. 8 steps straight == 4, DCP save, fresh model, DCP load, 4
    (refreshes at 0, 3 and 6; moments re-projected at each)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def make(model):
        groups = galore_ds.param_groups(model, rank=8, update_proj_gap=3, proj_type=proj_type)
        return galore_ds.GaLoreAdamW(groups, lr=1e-2, refresh=refresh, moments="reproject")

    straight = tiny_llama().to(dtype)
    opt = make(straight)
    for step in range(8):
        train_step(straight, opt, step)

    first = tiny_llama().to(dtype)
    opt1 = make(first)
    for step in range(4):
        train_step(first, opt1, step)
    dcp.save({"model": first.state_dict(), "optim": get_optimizer_state_dict(first, opt1)},
             checkpoint_id=str(tmp_path / "ckpt"))

    resumed = tiny_llama(seed=123).to(dtype)
    opt2 = make(resumed)
    state = {"model": resumed.state_dict(), "optim": get_optimizer_state_dict(resumed, opt2)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    resumed.load_state_dict(state["model"])
    set_optimizer_state_dict(resumed, opt2, state["optim"])
    for step in range(4, 8):
        train_step(resumed, opt2, step)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after a DCP resume"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_world_size_free_checkpoint_gives_back_each_moment_in_its_own_dtype(tmp_path, name):
    """The FSDP engine's checkpoint (layouts/checkpoint.py: DCP, any world size) on bf16
    weights: the rule keeps a norm's AdamW moments in bf16 and a GaLore matrix's in fp32; a
    moment loaded back in another dtype rounds differently, so the resumed run drifts (it
    did: fp32 placeholders made the FSDP bf16 resume differ at its second step)."""
    import torch.distributed.checkpoint as dcp

    from galore_ds.layouts.checkpoint import dcp_load, dcp_state_dict

    def make(model):
        return _make(name, model, refresh="randomized")

    straight = tiny_llama().to(torch.bfloat16)
    opt = make(straight)
    for step in range(8):
        train_step(straight, opt, step)

    first = tiny_llama().to(torch.bfloat16)
    opt1 = make(first)
    for step in range(4):
        train_step(first, opt1, step)
    dcp.save(dcp_state_dict(first, opt1), checkpoint_id=str(tmp_path / "ckpt"))

    resumed = tiny_llama(seed=123).to(torch.bfloat16)
    opt2 = make(resumed)
    dcp_load(resumed, opt2, str(tmp_path / "ckpt"))
    saved = {n: opt1.state[p] for n, p in first.named_parameters()}
    for n, p in resumed.named_parameters():
        for key, value in saved[n].items():
            if torch.is_tensor(value):
                assert opt2.state[p][key].dtype == value.dtype, f"{n}.{key}"
    for step in range(4, 8):
        train_step(resumed, opt2, step)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{n} differs after the resume"
