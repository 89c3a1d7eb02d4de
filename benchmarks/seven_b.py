"""LLaMA 7B pre-training steps on one machine: the shipped 7b recipe through launch/train.py.

    python benchmarks/seven_b.py                 # CPU, the full 7B (tens of minutes, ~20 GiB)
    python benchmarks/seven_b.py --dry-run       # the same phases on tiny shapes (seconds)
    python benchmarks/seven_b.py --device cuda   # a GPU capped at 24 GiB, plus 1B throughput
    python benchmarks/seven_b.py --optimizer apollo_mini   # APOLLO-Mini instead of 8-bit GaLore

configs/7b.json runs unchanged except for what one machine without network needs: a local
corpus (data.source, the byte-level BPE tokenizer), batch 1 (global_batch = micro_batch = 1),
3 steps, one eval batch, and a cold randomized first refresh (galore.refresh=randomized:
seeded subspace iteration instead of 224 exact SVDs, ~90 minutes of LAPACK on 2 cores).
The per-layer engine, 8-bit GaLore at rank 1024, bf16 weights and delayed clipping are the
recipe's own.

Phases, each a child process (so its peak is its own): `train` (3 steps, the first refreshes
all 224 matrices, a checkpoint at the end) and `resume` (loads that checkpoint, one more step).
With --device cuda (and --dry-run) more: 1B steps of 8-bit Adam (galore.enabled=false, the
paper's baseline), of per-layer 8-bit GaLore and of per-layer --optimizer (APOLLO-Mini: rank-1
states, no SVD), for tokens/s side by side.

Peak memory: CPU, the child's peak RSS (wait4's ru_maxrss); CUDA, max_memory_allocated under
set_per_process_memory_fraction(24 GiB). Next to it, `python -m galore_ds.tools.estimate`'s
columns for the same shapes. Writes benchmarks/results/seven_b[_cuda|_dry].json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from galore_ds.tools.estimate import Shape, estimate, shape_from_config  # noqa: E402

GIB = 2**30
# glibc raises its mmap threshold after the first large free, so later large tensors come from
# the heap and their freed pages stay resident (fragmentation): a fixed threshold keeps every
# large allocation in its own mapping, returned to the system when freed. CPU only.
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
TINY = {"model.hidden_size": 128, "model.intermediate_size": 344, "model.num_hidden_layers": 2,
        "model.num_attention_heads": 4, "model.vocab_size": 512, "galore.rank": 16}

# The child: optionally cap the GPU at 24 GiB, then run launch/train.py as its own __main__.
CHILD = """
import runpy, sys, torch
cap = float(sys.argv.pop(1))
if cap and torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def overrides(args, run_dir: Path, steps: int, resume: bool) -> dict:
    corpus = args.corpus or (str(WIKITEXT) if WIKITEXT.is_file() else "python-stdlib")
    over = {
        "data.source": corpus, "data.eval_source": None, "data.tokenizer": "bpe",
        "data.max_chars": 4_000_000, "data.cache_dir": str(run_dir / "cache"),
        "training.steps": steps, "training.global_batch": 1, "training.micro_batch": 1,
        "training.warmup_steps": 1, "training.eval_batches": 1, "training.eval_every": 0,
        "galore.refresh": "randomized", "galore.first_power_iters": args.power_iters,
        "engine.mode": "layerwise", "checkpoint.every": 0, "checkpoint.keep_last": 0,
        "training.optimizer": args.optimizer,
        "checkpoint.resume": "latest" if resume else None, "logging.run_dir": str(run_dir),
        "logging.log_every": 1, "logging.progress_bar": False,
    }
    if args.dry_run:
        over.update(TINY)
    return over


class RSSSampler(threading.Thread):
    """Samples a child's resident set once a second: where in the run the peak happens."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop.wait(1.0):
            try:
                with open(f"/proc/{self.pid}/status") as fh:
                    rss = next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            self.samples.append((round(time.perf_counter() - t0, 1), round(rss / GIB, 3)))


def run_phase(name: str, config: str, over: dict, cap_bytes: float, log_path: Path, env: dict) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(cap_bytes), str(ROOT / "launch" / "train.py"), "--config", config]
    for key, value in over.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    print(f"[{name}] {' '.join(cmd[4:])}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
        sampler = RSSSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        sampler.stop.set()
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"[{name}] exit {code}; last lines of {log_path}:\n" + "\n".join(tail))
    run_dir = Path(over["logging.run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    out = {"command": "python launch/train.py --config " + config + " " +
                      " ".join(f"--set {k}={json.dumps(v)}" for k, v in over.items()),
           "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
           "steps": [{k: r.get(k) for k in ("step", "loss", "grad_norm", "tokens_per_s", "refreshes",
                                          "refresh_s", "mem_gb", "skipped_steps")} for r in steps],
           "rss_timeline_gib": sampler.samples[:: max(1, len(sampler.samples) // 200)]}
    for row in out["steps"]:  # global batch 1 x seq 256 tokens per step
        row["step_s"] = round(256 / row["tokens_per_s"], 3) if row.get("tokens_per_s") else None
    for key in ("checkpoint_s", "resume_s"):
        found = [r[key] for r in rows if key in r]
        if found:
            out[key] = round(found[-1], 2)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        out["eval_loss"] = evals[-1]["eval_loss"]
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    if ckpts:
        files = {p.name: p.stat().st_size for p in ckpts[-1].iterdir() if p.is_file()}
        out["checkpoint"] = {"dir": ckpts[-1].name, "bytes": sum(files.values()),
                             "gib": round(sum(files.values()) / GIB, 3), "files": files}
    return out


# the product's targets: 8-bit GaLore in <= 20 GiB today, APOLLO-Mini in <= 15 GiB next
TARGET_GIB = {"galore_adamw8bit": 20.0, "apollo_mini": 15.0}
# --optimizer (the recipe's training.optimizer) -> the estimate tool's row
ESTIMATE_ROW = {"galore_adamw8bit": "galore8bit", "apollo_mini": "apollo_mini", "apollo_adamw": "apollo",
                "fira_adamw": "fira"}


def estimate_columns(config: str, over: dict, device: str) -> dict:
    shape, data = shape_from_config(config)
    fields = {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("model.")}
    checkpointing = fields.pop("activation_checkpointing", data["model"].get("activation_checkpointing", False))
    if "galore.rank" in over:
        fields["rank"] = over["galore.rank"]
    shape = Shape(**{**shape.__dict__, **fields, "micro_batch": 1})
    est = estimate(shape, ESTIMATE_ROW[over["training.optimizer"]], layerwise=True, device=device,
                   activation_checkpointing=checkpointing)
    return {**est.gib(), "activation_checkpointing": checkpointing}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes: check the script in seconds")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of the train phase")
    p.add_argument("--power-iters", type=int, default=1, help="galore.first_power_iters of the cold refresh")
    p.add_argument("--corpus", help="a local text file (default: ../shared/data/wikitext-2/valid.txt)")
    p.add_argument("--work", default="runs/seven_b", help="scratch run directory (deleted at the end)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (checkpoints: ~15 GB)")
    p.add_argument("--optimizer", default="galore_adamw8bit", choices=sorted(ESTIMATE_ROW),
                   help="training.optimizer (the recipe's: 8-bit GaLore)")
    p.add_argument("--out")
    args = p.parse_args()
    suffix = "_dry" if args.dry_run else ("_cuda" if args.device == "cuda" else "")
    if args.optimizer != "galore_adamw8bit":
        suffix = f"_{args.optimizer}{suffix}"
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"seven_b{suffix}.json")
    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cap = 24 * GIB if args.device == "cuda" else 0
    config = str(ROOT / "configs" / "7b.json")
    env = CPU_ENV if args.device == "cpu" else {}
    result = {"host": platform.node(), "cpu_count": os.cpu_count(), "device": args.device,
              "dry_run": args.dry_run, "env": env, "phases": {}}
    if args.device == "cuda":
        import torch
        result["gpu"] = torch.cuda.get_device_name(0)
        result["cap_gib"] = 24

    train_over = overrides(args, work / "run", args.steps, resume=False)
    result["estimate_gib"] = estimate_columns(config, train_over, args.device)
    result["phases"]["train"] = run_phase("train", config, train_over, cap, work / "train.log", env)
    resume_over = overrides(args, work / "run", args.steps + 1, resume=True)
    result["phases"]["resume"] = run_phase("resume", config, resume_over, cap, work / "resume.log", env)

    if args.device == "cuda" or args.dry_run:
        # tokens/s on 1B, where 8-bit Adam (galore.enabled=false: the paper's baseline) still fits
        # 24 GiB, against per-layer 8-bit GaLore and per-layer --optimizer; 5 steps each, the first
        # (refresh, warm-up) left out.
        config_1b = str(ROOT / "configs" / "1b.json")
        runs = {"1b_adam8bit": {"training.optimizer": "galore_adamw8bit", "galore.enabled": False,
                                "engine.mode": "single"},
                "1b_galore8bit_layerwise": {"training.optimizer": "galore_adamw8bit"}}
        if args.optimizer != "galore_adamw8bit":
            runs[f"1b_{args.optimizer}_layerwise"] = {"training.optimizer": args.optimizer}
        for name, extra in runs.items():
            over = {**overrides(args, work / name, 5, resume=False), "galore.refresh": "svd",
                    "checkpoint.save_final": False, "training.eval_batches": 0, **extra}
            over.pop("galore.first_power_iters")
            result["phases"][name] = run_phase(name, config_1b, over, cap, work / f"{name}.log", env)
        rate = {n: sum(s["tokens_per_s"] for s in result["phases"][n]["steps"][1:]) / 4 for n in runs}
        result["throughput_1b"] = {**{k: round(v, 1) for k, v in rate.items()},
                                   **{f"{n[3:]}_over_adam8bit": round(rate[n] / rate["1b_adam8bit"], 3)
                                      for n in runs if n != "1b_adam8bit"}}

    train = result["phases"]["train"]
    peak = train["steps"][-1]["mem_gb"] if args.device == "cuda" else train["peak_rss_gib"]
    result["summary"] = {
        "peak_gib": peak, "target_gib": TARGET_GIB.get(args.optimizer, 20.0),
        "estimate_total_gib": result["estimate_gib"]["total"],
        "estimate_over_measured": round(result["estimate_gib"]["total"] / peak, 3),
        "refresh_s": train["steps"][0].get("refresh_s"),
        "step_s": [s.get("step_s") for s in train["steps"]],
        "checkpoint_gib": train.get("checkpoint", {}).get("gib"),
        "checkpoint_s": train.get("checkpoint_s"), "resume_s": result["phases"]["resume"].get("resume_s"),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out_path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
