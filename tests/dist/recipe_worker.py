"""Recipes through the train loop, many in one process group: run, evaluate and checkpoint
mid-run, resume from the mid-run checkpoint, and report the per-step losses of both.

    torchrun --nproc_per_node W tests/dist/recipe_worker.py --jobs jobs.json --out results.json
    deepspeed --num_gpus W tests/dist/recipe_worker.py --jobs jobs.json --out results.json

A job is {"name", "recipe": {...}, "phase": "run" | "resume", "resume": <step dir>}. Every
rank runs every job in order through launch/train.py's own path (config.load_config with
the launcher's environment, make_engine, trainer.train), so a process group is started once
per world size instead of once per recipe; a recipe the config refuses reports its one
line. Rank 0 writes the results.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shutdown import exit_worker  # noqa: E402


def losses(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"train": {r["step"]: [r["loss"], r["grad_norm"], r["lr"]] for r in rows if "loss" in r},
            "eval": {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}}


def run_job(job: dict, dist_env) -> dict:
    from galore_ds.train.config import ConfigError, load_config
    from galore_ds.train.engines.base import EngineUnavailable, make_engine
    from galore_ds.train.trainer import train

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job["recipe"], f)
    sets = [f"checkpoint.resume={job['resume']}"] if job.get("resume") else []
    try:
        cfg = load_config(f.name, sets, dist_env)
        engine = make_engine(cfg, dist_env)
        summary = train(cfg, dist_env, engine)
    except (ConfigError, EngineUnavailable) as e:
        return {"refused": str(e)}
    finally:
        os.unlink(f.name)
    return {"summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, bool))},
            "metrics": losses(Path(cfg.logging.run_dir)) if dist_env.rank == 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)
    args = ap.parse_args()
    import torch
    import torch.distributed as dist

    from galore_ds.train.config import dist_env

    torch.set_num_threads(1)
    env = dist_env()
    results = {}
    for job in json.loads(Path(args.jobs).read_text()):
        try:
            results[job["name"]] = {"ok": True, **run_job(job, env)}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[job["name"]] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                    "trace": traceback.format_exc()[-3000:]}
            if env.world_size > 1:
                break  # a rank that failed mid-collective cannot keep the others in step
        if env.world_size > 1 and dist.is_initialized():
            dist.barrier()
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    exit_worker()


if __name__ == "__main__":
    main()
