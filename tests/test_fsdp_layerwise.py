"""Per-layer GaLore on FSDP2 (engine.fsdp.layerwise): the recipe key, what is refused, and an
end-to-end torchrun run of launch/train.py on 2 ranks. Exactness against single-process runs
is in tests/dist/fsdp_cases.py (the layerwise_* and engine_layerwise_vs_single cases, run by
tests/test_fsdp.py)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from galore_ds.train.config import ConfigError, DistEnv, from_dict, validate
from netutil import launcher_env
from recipes import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_key_defaults_off_accepts_hsdp_refuses_adamw(tmp_path):
    base = tiny_recipe(tmp_path, str(tmp_path / "cache"), engine__mode="fsdp")
    assert validate(from_dict(base), DistEnv()).engine.fsdp.layerwise is False
    on = tiny_recipe(tmp_path, str(tmp_path / "cache"), engine__mode="fsdp",
                     engine__fsdp={"layerwise": True})
    assert validate(from_dict(on), DistEnv()).engine.fsdp.layerwise is True
    hsdp = tiny_recipe(tmp_path, str(tmp_path / "cache"), engine__mode="fsdp",
                       engine__fsdp={"layerwise": True, "replicate": 2})
    assert validate(from_dict(hsdp), DistEnv(world_size=2)).engine.fsdp.replicate == 2  # 2-D mesh
    adamw = tiny_recipe(tmp_path, str(tmp_path / "cache"), engine__mode="fsdp",
                        engine__fsdp={"layerwise": True}, training__optimizer="adamw",
                        galore__enabled=False)
    with pytest.raises(ConfigError, match="per-layer"):
        validate(from_dict(adamw), DistEnv())


def test_fsdp_engine_builds_the_public_adafactor_with_the_recipes_settings():
    """training.optimizer=galore_adafactor on any engine is galore_ds.GaLoreAdafactor with the
    recipe's fixed lr (it reads FSDP2's placements itself: tests/dist/fsdp_cases.py)."""
    import galore_ds
    from galore_ds.train.optim import build_optimizer

    cfg = from_dict({"training": {"optimizer": "galore_adafactor", "lr": 0.003, "grad_clip": 0.5}})
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = build_optimizer([dict(params=[w], rank=2)], cfg)
    assert type(opt) is galore_ds.GaLoreAdafactor and opt.max_grad_norm == 0.5
    group = opt.param_groups[0]
    assert group["lr"] == 0.003 and not group["relative_step"] and not group["scale_parameter"]


@pytest.mark.slow
def test_torchrun_trains_with_per_layer_updates(tmp_path):
    """2 ranks, engine.mode=fsdp engine.fsdp.layerwise=true, 2 micro-batches per rank per step
    and clipping: finite, falling loss; the scheduler counted every optimizer step."""
    recipe = tiny_recipe(tmp_path, str(tmp_path / "cache"), name="fsdp-layerwise",
                         training__steps=12, training__warmup_steps=2, training__micro_batch=2,
                         training__eval_batches=0, training__eval_every=0, galore__update_proj_gap=4)
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps(recipe))
    env = launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "launch" / "train.py"), "--config", str(cfg),
           "--set", "engine.mode=fsdp", "--set", "engine.fsdp.layerwise=true"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "loss" in x]
    losses = [x["loss"] for x in rows]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    norms = [x["grad_norm"] for x in rows]
    assert all(math.isfinite(n) and n > 0 for n in norms), norms
    assert all("clip_coef" in x and "nonfinite_params_skipped" in x for x in rows), rows[0]  # per-layer path ran
    # between refreshes the only GaLore collectives are the norm all-reduce (4 bytes) and each
    # micro-batch's agreed gradient-check verdict (4 bytes x 2: LayerwiseOptimizer._agree); the
    # count also holds the engine's logged-loss mean over ranks (2 float64: Engine.mean_over_ranks)
    comm = [x["galore_comm_bytes"] for x in rows]
    assert comm[2] - comm[1] == 4 + 4 * 2 + 16, comm
