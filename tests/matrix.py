"""The recipe matrix: every factor the config accepts, as recipes for launch/train.py's loop.

Shared by tests/test_recipe_matrix.py (pairwise, in CI) and benchmarks/recipe_matrix.py (the
full product). A case is a dict of factor values; `recipe(case, ...)` turns it into a JSON
recipe; `refusal(case)` asks the real config validation whether it is accepted (and where
and why not); `plan` groups the run/resume jobs into as few launches as possible (one process
group per launcher and world size runs many recipes: tests/dist/recipe_worker.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from netutil import launcher_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "recipe_worker.py"
BIN = Path(sys.executable).parent

ENGINES = ["single", "layerwise", "fsdp", "fsdp_layerwise", "hsdp", "deepspeed0", "deepspeed1", "deepspeed2",
           "deepspeed3", "ddp", "ddp_layerwise"]
FACTORS: dict[str, list[Any]] = dict(
    engine=ENGINES,
    optimizer=["galore_adamw", "galore_adamw8bit", "galore_adafactor", "adamw"],
    dtype=["float32", "bfloat16"],
    refresh=["svd", "randomized"],
    moments=["keep", "reproject", "reset"],
    stagger=[False, True],
    accumulation=[1, 2],
    clip=["off", "exact", "delayed"],
    world=[1, 2, 3],
    resume_on=["same", "other"],
)
GLOBAL_BATCH, STEPS, EVERY = 12, 4, 2   # 12 sequences split by 1, 2, 3 ranks x 1, 2 micro-batches
OTHER_WORLD = {1: 2, 2: 3, 3: 2}
SAME_TOL = 0.0        # the same world size: bit-identical
OTHER_TOL = {"float32": 1e-4, "bfloat16": 2e-2}
EIGHT_BIT_OTHER_TOL = 1e-2


def launcher(engine: str) -> str:
    return "deepspeed" if engine.startswith("deepspeed") else ("python" if engine in ("single", "layerwise")
                                                              else "torchrun")


def recipe(case: dict, root: Path, cache: Path, world: int | None = None) -> dict:
    """The recipe a case means (`world`: the launch it is for, when resumed elsewhere)."""
    world = world or case["world"]
    e = case["engine"]
    mode = "deepspeed" if e.startswith("deepspeed") else e.split("_")[0] if e != "hsdp" else "fsdp"
    engine: dict[str, Any] = {"mode": mode}
    if e == "ddp_layerwise":
        engine["ddp"] = {"layerwise": True}
    if e == "fsdp_layerwise":
        engine["fsdp"] = {"layerwise": True}
    if e == "hsdp":
        engine["fsdp"] = {"replicate": 2}
    if e.startswith("deepspeed"):
        engine["deepspeed"] = {"zero_optimization": {"stage": int(e[-1])}}
    accum = case["accumulation"]
    micro = max(1, GLOBAL_BATCH // (world * accum))
    galore = case["optimizer"] != "adamw"
    return {
        "name": "matrix",
        "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "vocab_size": 320, "max_position_embeddings": 32, "dtype": case["dtype"]},
        "data": {"source": "python-stdlib", "max_chars": 40_000, "seq_len": 32, "cache_dir": str(cache)},
        "training": {"optimizer": case["optimizer"], "steps": STEPS, "lr": 0.01, "warmup_steps": 1,
                     "global_batch": GLOBAL_BATCH, "micro_batch": micro,
                     "grad_clip": 0.0 if case["clip"] == "off" else 1.0,
                     "clip_timing": "delayed" if case["clip"] == "delayed" else "exact",
                     "eval_every": EVERY, "eval_batches": 2},
        "galore": {"enabled": galore, "rank": 8, "update_proj_gap": 2, "refresh": case["refresh"],
                   "moments": case["moments"], "stagger": case["stagger"]},
        "engine": engine,
        "checkpoint": {"dir": str(root / "ckpt"), "every": EVERY, "keep_last": 0},
        "logging": {"run_dir": str(root / "run"), "progress_bar": False},
    }


def refusal(case: dict) -> tuple[int, str] | None:
    """None when the config accepts the case (its run, and its resume on the other world size
    when resume_on=other); else (the world size where it is refused, the one line)."""
    from galore_ds.train.config import ConfigError, DistEnv, from_dict, validate

    worlds = [case["world"]] + ([OTHER_WORLD[case["world"]]] if case["resume_on"] == "other" else [])
    for world in worlds:
        rec = recipe(case, Path("/nonexistent"), Path("/nonexistent"), world)
        try:
            validate(from_dict(rec), DistEnv(rank=0, world_size=world))
        except ConfigError as e:
            return world, str(e)
    return None


_VERDICTS: dict[tuple, bool] = {}


def valid(case: dict) -> bool:
    key = tuple(case[k] for k in FACTORS)
    if key not in _VERDICTS:
        _VERDICTS[key] = refusal(case) is None
    return _VERDICTS[key]


def case_name(case: dict) -> str:
    return "-".join(str(case[k]) for k in FACTORS).replace("_", "")


def plan(cases: list[dict], root: Path, cache: Path) -> list[tuple[str, int, list[dict]]]:
    """Launches: (launcher, world, jobs). Phase 1 launches run every case and resume it on the
    same world size; phase 2 launches resume the other-world cases (after phase 1 ran)."""
    phase1: dict[tuple[str, int], list[dict]] = {}
    phase2: dict[tuple[str, int], list[dict]] = {}
    for case in cases:
        name, w = case_name(case), case["world"]
        run_root = root / name
        first = {"name": f"{name}/run", "recipe": recipe(case, run_root / "a", cache)}
        ckpt = run_root / "a" / "ckpt" / f"step-{EVERY:07d}"
        key = (launcher(case["engine"]), w)
        phase1.setdefault(key, []).append(first)
        if case["resume_on"] == "same":
            resume = recipe(case, run_root / "b", cache)
            phase1[key].append({"name": f"{name}/resume", "recipe": resume, "resume": str(ckpt)})
        else:
            w2 = OTHER_WORLD[w]
            resume = recipe(case, run_root / "b", cache, w2)
            phase2.setdefault((launcher(case["engine"]), w2), []).append(
                {"name": f"{name}/resume", "recipe": resume, "resume": str(ckpt)})
    return [(k[0], k[1], v) for k, v in phase1.items()] + [(k[0], k[1], v) for k, v in phase2.items()]


def launch(kind: str, world: int, jobs: list[dict], out_dir: Path, port: int, timeout: int = 1800) -> dict:
    """Run `jobs` in one process group; returns {job name: result}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = out_dir / f"jobs-{kind}-{world}.json"
    out = out_dir / f"results-{kind}-{world}.json"
    jobs_file.write_text(json.dumps(jobs))
    if kind == "python":
        cmd = [sys.executable, str(WORKER)]
    elif kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(WORKER)]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(port), str(WORKER)]
    env = launcher_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    r = subprocess.run([*cmd, "--jobs", str(jobs_file), "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if not out.exists():
        raise AssertionError(f"{kind} x{world} wrote no results (rc={r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return json.loads(out.read_text())


def compare(case: dict, run: dict, resume: dict) -> tuple[bool, float, str]:
    """Whether the resumed steps match the uninterrupted run's: (ok, worst relative loss
    difference, what was compared)."""
    if "refused" in run:
        return False, float("nan"), f"the run was refused: {run['refused']}"
    if "refused" in resume:
        return False, float("nan"), f"the resume was refused: {resume['refused']}"
    a, b = run["metrics"]["train"], resume["metrics"]["train"]
    steps = [s for s in b if int(s) > EVERY]
    if sorted(int(s) for s in steps) != list(range(EVERY + 1, STEPS + 1)):
        return False, float("nan"), f"resumed steps {sorted(b)}"
    worst = max(abs(a[s][0] - b[s][0]) / abs(a[s][0]) for s in steps)
    if case["resume_on"] == "same":
        tol = SAME_TOL
    else:
        tol = EIGHT_BIT_OTHER_TOL if case["optimizer"] == "galore_adamw8bit" else OTHER_TOL[case["dtype"]]
    evaluated = bool(run["metrics"]["eval"]) and str(EVERY) in run["metrics"]["eval"]
    return worst <= tol and evaluated, worst, f"loss steps {steps}: worst {worst:.3e} (tol {tol}), eval at {EVERY}: {evaluated}"
