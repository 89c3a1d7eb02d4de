"""The integration paths only a GPU machine runs, in one command, checked as the CPU tests check
the others: each trains the tiny LLaMA through the tool and must equal the one-process galore_ds
loop on the same global batches.

    python benchmarks/gpu_integrations.py             # CUDA, 2 GPUs (1 if that is all)
    python benchmarks/gpu_integrations.py --dry-run   # CPU/gloo, 2 ranks: the paths CPU can run

CUDA paths: the Trainer (GaLoreTrainer) under FSDP2 and under DeepSpeed ZeRO-2 and ZeRO-3;
Accelerate's FSDP2 plugin and DeepSpeed plugin (ZeRO-2); plus the Trainer and Accelerate DDP
paths. --dry-run runs the same script on CPU with all of them but the Trainer's FSDP2, which
Accelerate leaves off on CPU (Accelerate's own FSDP2 is called as its prepare() calls it).
Each path also reports the layout its parameters had (DTensor, ZeRO partition), so an engine
silently left off fails. Writes benchmarks/results/gpu_integrations[_dry].json.
Tolerance: 1e-5 on CPU (fp32, as the tests); 1e-4 on CUDA (TF32 off, but cuBLAS and the
reference's CPU kernels round differently).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "dist"
sys.path.insert(0, str(DIST))
sys.path.insert(0, str(ROOT / "tests"))
from hf_worker import reference  # noqa: E402

STEPS, BS, ACCUM = 6, 2, 2


def torchrun(world: int, script: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed's CPU accelerator (gloo)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    world = min(2, torch.cuda.device_count()) if cuda else 2
    tol = 1e-4 if cuda else 1e-5
    base = dict(layerwise=False, accum=ACCUM, bs=BS, steps=STEPS, clip=1.0, cuda=cuda)
    trainer_jobs = {"trainer_ddp_step_time": base, "trainer_ddp_per_layer": {**base, "layerwise": True},
                    "trainer_deepspeed_zero2": {**base, "deepspeed": {"zero_optimization": {"stage": 2}}},
                    "trainer_deepspeed_zero3": {**base, "deepspeed": {"zero_optimization": {"stage": 3}}}}
    accelerate_kinds = ["ddp", "fsdp2", "deepspeed"]
    if cuda:   # on CPU Accelerate leaves the Trainer's FSDP off (it would run plain data parallel)
        trainer_jobs["trainer_fsdp2"] = {**base, "fsdp2": True}
    layouts = {"trainer_fsdp2": "dtensor", "trainer_deepspeed_zero2": "zero", "trainer_deepspeed_zero3": "zero"}
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                     "world": world, "tolerance": tol, "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "jobs.json").write_text(json.dumps(trainer_jobs))
        torchrun(world, DIST / "hf_worker.py", [str(out / "jobs.json"), str(out)])
        torchrun(world, DIST / "accelerate_worker.py", [str(out), *accelerate_kinds, *(["--cuda"] if cuda else [])])
        ref = reference(STEPS, BS * ACCUM * world, 1.0)
        names = list(trainer_jobs) + [f"accelerate_{k}" for k in accelerate_kinds]
        files = [out / f"{n}.pt" for n in trainer_jobs] + [out / f"{k}.pt" for k in accelerate_kinds]
        for name, path in zip(names, files):
            weights = torch.load(path, weights_only=True)
            diff = max(float((weights[k] - ref[k]).norm() / ref[k].norm()) for k in ref)
            info = path.with_suffix(".json")
            layout = json.loads(info.read_text()).get("layout") if info.is_file() else None
            ok = diff < tol and layout == layouts.get(name, layout)   # the engine really ran
            results["paths"][name] = {"rel_diff": diff, "layout": layout, "ok": ok}
            print(f"{name:32s} rel diff {diff:.2e}  layout {layout}  {'ok' if ok else 'FAIL'}", flush=True)
    suffix = "_dry" if args.dry_run else ""
    path = ROOT / "benchmarks" / "results" / f"gpu_integrations{suffix}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in results["paths"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
