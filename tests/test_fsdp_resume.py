"""launch/train.py with engine.mode=fsdp: a run checkpointed on 2 ranks resumes on 3
(torchrun), and its steps after the resume stay close to the uninterrupted 2-rank run:
within 8-bit noise for galore_adamw8bit, within fp32 rounding for galore_adafactor (whose
row statistics reshard and whose column statistics are replicated). The finer checks (moments within one code step of the saved ones, bit-identical
same-world-size resume, the zeroed-moments counter-check) are the dcp8bit_* and engine8bit_*
cases of tests/dist/fsdp_cases.py, run by tests/test_fsdp.py."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netutil import launcher_env
from recipes import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
# relative differences (losses, weights) after the resume vs the uninterrupted 2-rank run.
# 8-bit (noise of other blocks), measured: losses 4.1e-5, weights 3.5e-3; with the moments
# zeroed at load (a one-off check): 1.1e-2 and 0.19. Adafactor: fp32 rounding only.
TOLERANCES = {"galore_adamw8bit": (1e-3, 1e-2), "galore_adafactor": (1e-5, 1e-5)}


def _torchrun(recipe: dict, path: Path, nproc: int) -> None:
    path.write_text(json.dumps(recipe))
    env = launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "launch" / "train.py"), "--config", str(path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _model(step_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(step_dir / "dcp", out)
    return torch.load(out, weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(TOLERANCES))
def test_run_saved_on_2_ranks_resumes_on_3(tmp_path, optimizer):
    # global batch 12 = 2 ranks x 3 micro-batches of 2 = 3 ranks x 2; embed/lm_head moments
    # (400 x 32 rows split 200|134) are 8-bit on both sizes, so their blocks are re-formed
    loss_tol, weight_tol = TOLERANCES[optimizer]
    common = dict(training__optimizer=optimizer, training__steps=8, training__global_batch=12,
                  training__micro_batch=2, training__eval_batches=0, galore__update_proj_gap=3,
                  engine__mode="fsdp")
    cache = str(tmp_path / "cache")
    a = tiny_recipe(tmp_path / "a", cache, name="fsdp8bit-2", checkpoint__every=4, **common)
    _torchrun(a, tmp_path / "a.json", 2)
    saved = tmp_path / "a" / "ckpt" / "step-0000004"
    assert sorted(p.name for p in saved.iterdir() if p.name.endswith(".pt")) == \
        ["rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "trainer.pt"]  # no per-rank optimizer file
    b = tiny_recipe(tmp_path / "b", cache, name="fsdp8bit-3", checkpoint__resume=str(saved), **common)
    _torchrun(b, tmp_path / "b.json", 3)
    la, lb = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert sorted(lb) == [5, 6, 7, 8], sorted(lb)  # resumed at step 4
    assert all(math.isfinite(lb[s]) and abs(lb[s] - la[s]) <= loss_tol * abs(la[s]) for s in lb), (la, lb)
    wa = _model(tmp_path / "a" / "ckpt" / "step-0000008", tmp_path / "a.pt")
    wb = _model(tmp_path / "b" / "ckpt" / "step-0000008", tmp_path / "b.pt")
    assert set(wa) == set(wb)
    worst = max(float((wb[k] - wa[k]).norm() / wa[k].norm().clamp_min(1e-30)) for k in wa)
    print(f"{optimizer}: losses {max(abs(lb[s] - la[s]) / abs(la[s]) for s in lb):.2e}, weights {worst:.2e}")
    assert worst <= weight_tol, worst
