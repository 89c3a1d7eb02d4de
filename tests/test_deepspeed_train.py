"""launch/train.py with engine.mode=deepspeed: the deepspeed launcher trains a tiny LLaMA on
ZeRO-3 and checkpoints; mpirun resumes that checkpoint and reproduces the same losses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytest.importorskip("deepspeed")


def _env():
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _common(run_dir: Path) -> list[str]:
    return ["--config", "configs/tiny.json", "--set", "engine.mode=deepspeed",
            "--set", 'engine.deepspeed={"zero_optimization":{"stage":3}}',
            "--set", "model.num_hidden_layers=2", "--set", "training.steps=4",
            "--set", "training.warmup_steps=1", "--set", "training.eval_every=0",
            "--set", "training.eval_batches=1", "--set", "data.max_chars=300000",
            "--set", "galore.update_proj_gap=2", "--set", "checkpoint.every=2",
            "--set", "checkpoint.keep_last=0", "--set", "logging.progress_bar=false",
            "--set", f"logging.run_dir={run_dir}"]


def _run(cmd, timeout=400, env=None):
    p = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _losses(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["grad_norm"])
    return out


@pytest.mark.skipif(not (BIN / "mpirun").exists(), reason="no mpirun next to the interpreter")
def test_train_entry_deepspeed_then_mpirun_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
          "launch/train.py", *_common(a)])
    full = _losses(a)
    assert sorted(full) == [1, 2, 3, 4]
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-0000004")
    (b / "metrics.jsonl").write_text("")
    _run([str(BIN / "mpirun"), "-n", "2", sys.executable, "launch/train.py", *_common(b),
          "--resume", str(b / "checkpoints" / "step-0000002")],
         env={"MASTER_PORT": str(free_port())})
    resumed = _losses(b)
    for step in (3, 4):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
