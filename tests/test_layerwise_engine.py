"""The per-layer engine against the single engine (the train loop's reference)."""
from __future__ import annotations

import pytest
import torch

from galore_ds.train.config import DistEnv, from_dict
from galore_ds.train.model import build_model
from galore_ds.train.engines.base import engine_class


def cfg(optimizer="galore_adamw", accumulation=2, clip=0.0):
    return from_dict({
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 16},
        "training": {"optimizer": optimizer, "steps": 6, "lr": 0.01, "warmup_steps": 2,
                     "global_batch": 2 * accumulation, "micro_batch": 2, "grad_clip": clip},
        "galore": {"rank": 8, "update_proj_gap": 2, "stagger": True},
    })


def micro_batches(step, n):
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(n):
        x = torch.randint(0, 64, (2, 16), generator=g)
        out.append({"input_ids": x, "labels": x})
    return out


@pytest.mark.parametrize("accumulation,clip", [(2, 0.0), (1, 0.05)])
def test_layerwise_engine_matches_single(accumulation, clip, tmp_path):
    c = cfg(accumulation=accumulation, clip=clip)
    engines = []
    for mode in ("single", "layerwise"):
        e = engine_class(mode)(c, DistEnv())
        e.setup(build_model(c.model, seed=0, meta=False))
        engines.append(e)
    single, lw = engines
    for step in range(4):
        a = single.train_step(micro_batches(step, accumulation))
        b = lw.train_step(micro_batches(step, accumulation))
        assert b.lr == pytest.approx(a.lr) and b.loss == pytest.approx(a.loss, rel=1e-5)
        if accumulation == 1:
            assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
            assert b.extra["clip_coef"] < 1.0
    assert lw.scheduler.last_epoch == single.scheduler.last_epoch == 4
    for pa, pb in zip(single.model.parameters(), lw.model.parameters()):
        assert float((pa - pb).detach().abs().max()) < 1e-5
    # save / load round trip into a fresh engine, then one more identical step
    lw.save(tmp_path)
    lw2 = engine_class("layerwise")(c, DistEnv())
    lw2.setup(build_model(c.model, seed=1, meta=False))
    lw2.load(tmp_path)
    r1 = lw.train_step(micro_batches(9, accumulation))
    r2 = lw2.train_step(micro_batches(9, accumulation))
    assert r1.loss == r2.loss and r1.grad_norm == r2.grad_norm
    for pa, pb in zip(lw.model.parameters(), lw2.model.parameters()):
        assert torch.equal(pa, pb)


def test_layerwise_engine_rejects_plain_adamw():
    c = cfg(optimizer="adamw")
    e = engine_class("layerwise")(c, DistEnv())
    with pytest.raises(ValueError):
        e.setup(build_model(c.model, seed=0, meta=False))
