"""The same recipe runs the same algorithm on every engine: the shipped tiny recipe (proj_type
std, clipping at 1.0, two micro-batches per step on one rank) logs the same per-step loss and
grad norm through launch/train.py on the single, per-layer, FSDP (2 ranks), HSDP (2 x 2) and
DeepSpeed ZeRO-2 (2 ranks) engines, and with activation checkpointing on two of them: 9 steps,
refreshes at steps 0, 3 and 6. The same with training.optimizer=apollo_mini (issue 23)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from netutil import free_port, launcher_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOSS_TOL, NORM_TOL = 2e-5, 1e-4
SHORT = ["training.steps=9", "training.warmup_steps=3", "galore.update_proj_gap=3", "training.eval_every=0",
         "checkpoint.every=0", "checkpoint.save_final=false", "logging.progress_bar=false"]
ENGINES = {
    "single": ([sys.executable], ["engine.mode=single"]),
    "layerwise": ([sys.executable], ["engine.mode=layerwise"]),
    "fsdp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
             ["engine.mode=fsdp"]),
    # 4 ranks x 8 sequences would exceed the global batch of 16: 4 per micro-batch, same batch
    "hsdp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"],
             ["engine.mode=fsdp", "engine.fsdp.replicate=2", "training.micro_batch=4"]),
    "deepspeed_zero2": ([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "{port}"],
                        ["engine.mode=deepspeed", 'engine.deepspeed={"zero_optimization":{"stage":2}}']),
    "ddp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            ["engine.mode=ddp"]),
    "ddp_layerwise": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                      ["engine.mode=ddp", "engine.ddp.layerwise=true"]),
}
# Activation checkpointing recomputes layers inside backward, where the per-layer hooks,
# FSDP2's unshard/reshard and DeepSpeed's gradient hooks run: the same losses are expected.
CHECKPOINTED = ("layerwise", "fsdp")   # ZeRO-2 with checkpointing: the shipped 7b recipe's test
for _name in CHECKPOINTED:
    _launcher, _sets = ENGINES[_name]
    ENGINES[f"{_name}_checkpointed"] = (_launcher, [*_sets, "model.activation_checkpointing=true"])
# The family (issue 23): the recipe with training.optimizer=apollo_mini (rank 1, one scale per
# matrix: its norms and the limiter's summed over a matrix's shards) on every engine that
# carries a rule reading the full gradient (the ddp engine refuses it), against its single run.
FAMILY = "_apollo_mini"
for _name in ("single", "layerwise", "fsdp", "hsdp", "deepspeed_zero2"):
    _launcher, _sets = ENGINES[_name]
    # lr 3e-3: at the recipe's 1e-2 its sqrt(128)-scaled steps make the tiny model chaotic,
    # where rounding differences between engines grow past any tolerance
    ENGINES[_name + FAMILY] = (_launcher, [*_sets, "training.optimizer=apollo_mini", "training.lr=0.003"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for name, (launcher, sets) in ENGINES.items():
        run_dir = tmp_path_factory.mktemp(name)
        launcher = [a.replace("{port}", str(free_port())) for a in launcher]
        cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny.json")]
        for s in [*SHORT, *sets, f"logging.run_dir={run_dir}", f"data.cache_dir={cache}"]:
            cmd += ["--set", s]
        env = launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{name}:\n{(r.stdout + r.stderr)[-3000:]}"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[name] = [x for x in rows if "loss" in x]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", [e for e in ENGINES if not e.startswith("single")])
def test_tiny_recipe_logs_the_single_engines_losses(runs, engine):
    ref, got = runs["single" + FAMILY if engine.endswith(FAMILY) else "single"], runs[engine]
    assert [r["step"] for r in got] == list(range(1, 10))
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL * abs(a["loss"]), (engine, a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= NORM_TOL * a["grad_norm"], (engine, a, b)
    # clipping at 1.0 was active in some steps: the engines agree on what is clipped too
    assert any(r["grad_norm"] > 1.0 for r in ref)
