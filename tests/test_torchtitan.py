"""torchtitan's optimizer contract, as its trainer uses it (torchtitan itself is not installed:
its calls are made here as it makes them): build_optimizers' signature and config fields,
Stateful state_dict keyed by parameter name through DCP, resume through dcp.save/dcp.load, and
DCP's zero-gradient state-creation step leaving no projector computed from zeros."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from galore_ds.integrations.torchtitan import GaLoreOptimizersContainer, build_galore_optimizers

VOCAB, DIM = 64, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Module()
        for name in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, name, nn.Linear(DIM, DIM, bias=False))
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(DIM, 48, bias=False)
        self.feed_forward.w3 = nn.Linear(DIM, 48, bias=False)
        self.feed_forward.w2 = nn.Linear(48, DIM, bias=False)
        self.attention_norm = nn.RMSNorm(DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention
        x = self.attention_norm(h)
        h = h + a.wo(torch.tanh(a.wq(x)) * a.wk(x) + a.wv(x))
        f = self.feed_forward
        return h + f.w2(nn.functional.silu(f.w1(h)) * f.w3(h))


class TitanLike(nn.Module):
    """torchtitan's LLaMA module names: tok_embeddings, layers.N.attention.wq, feed_forward.w1, norm, output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(2)})
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h)
        return self.output(self.norm(h))


CONFIG = SimpleNamespace(name="AdamW", lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                         implementation="foreach", early_step_in_backward=False)
GALORE = dict(rank=8, update_proj_gap=3)


def build(model: nn.Module) -> GaLoreOptimizersContainer:
    return build_galore_optimizers([model], CONFIG, None, None, galore=GALORE)


def train(model: nn.Module, opt: GaLoreOptimizersContainer, steps: range) -> None:
    for s in steps:
        x = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(s))
        logits = model(x[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    wq = [k for k in sd if k.startswith("state.layers.0.attention.wq.weight")]
    assert {k.rsplit(".", 1)[1] for k in wq} >= {"proj", "step", "exp_avg", "exp_avg_sq"}, wq
    assert float(sd["state.layers.0.attention.wq.weight.step"]) == 0
    assert not sd["state.layers.0.attention.wq.weight.proj"].any()  # a placeholder, not an SVD of zeros
    assert probed.optimizers[0].galore_stats["refreshes"] == 0
    train(plain_model, plain, range(5))
    train(probed_model, probed, range(5))
    a, b = weights(plain_model), weights(probed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dcp_save_and_load_resume_bit_identically(tmp_path):
    full_model = TitanLike()
    full = build(full_model)
    train(full_model, full, range(7))

    model = TitanLike()
    opt = build(model)
    train(model, opt, range(4))  # a refresh at 0 and 3, the next at 6: after the resume
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=str(tmp_path / "step-4"))

    resumed_model = TitanLike()
    resumed = build(resumed_model)
    state = {"model": resumed_model.state_dict(), "optimizer": resumed.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "step-4"))
    resumed_model.load_state_dict(state["model"])
    resumed.load_state_dict(state["optimizer"])
    train(resumed_model, resumed, range(4, 7))
    a, b = weights(full_model), weights(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchtitan_options_it_cannot_honour_are_refused():
    with pytest.raises(ValueError, match="early_step_in_backward"):
        build_galore_optimizers([TitanLike()], SimpleNamespace(**{**vars(CONFIG), "early_step_in_backward": True}))
    with pytest.raises(ValueError, match="optimizer.name"):
        build_galore_optimizers([TitanLike()], SimpleNamespace(**{**vars(CONFIG), "name": "Muon"}))
