"""benchmarks/comm.py's byte model is what the engine sends: launch/train.py with engine.mode=ddp
on 2 ranks logs `comm_bytes` (payloads handed to torch.distributed, counted at the call); the
model's payloads for the same shapes must match, step by step, refresh steps included, up to
the scalar collectives the model leaves out (loss mean, norms: a few bytes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipes import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from comm import ParamShape, predicted_bytes  # noqa: E402

SCALARS = 64  # bytes of scalar collectives per step (loss mean, grad norm, flags) the model omits


def shapes(recipe: dict) -> list[ParamShape]:
    from galore_ds.core.groups import galore_matrix_names
    from galore_ds.train.config import from_dict
    from galore_ds.train.model import build_model

    cfg = from_dict(recipe)
    model = build_model(cfg.model, seed=0, meta=True)
    targets = set(galore_matrix_names(model, tuple(cfg.galore.target_modules)))
    return [ParamShape(n, tuple(p.shape), n in targets) for n, p in model.named_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("layerwise,wire,targets", [(True, "float32", ["attn", "mlp"]),
                                                    (True, "bfloat16", ["attn", "mlp"]),
                                                    (False, "float32", ["attn", "mlp"]),
                                                    (True, "bfloat16", ["attn", "mlp", "lm_head"])])
def test_comm_bytes_match_the_model(tmp_path, layerwise, wire, targets):
    recipe = tiny_recipe(tmp_path, str(tmp_path / "cache"), training__steps=5, training__grad_clip=0.0, training__eval_batches=0,
                         galore__update_proj_gap=3, galore__target_modules=targets)
    recipe["engine"] = {"mode": "ddp", "ddp": {"layerwise": layerwise, "reduce_dtype": wire}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "train.py"), "--config", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sent = {r["step"]: r["comm_bytes"] for r in rows if "loss" in r}
    model = predicted_bytes(shapes(recipe), rank=8, world=2, method="galore", wire_bytes=2 if wire == "bfloat16" else 4,
                            per_layer=layerwise, update_proj_gap=3)
    step = sum(c.payload for c in model.step)
    refresh = step + sum(c.payload for c in model.refresh)
    for s, measured in sent.items():
        expected = refresh if (s - 1) % 3 == 0 else step  # steps 1 and 4 refresh (gap 3)
        assert 0 <= measured - expected <= SCALARS, (s, measured, expected, model)
