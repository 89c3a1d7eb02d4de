"""Soak: thousands of tiny GaLore steps with frequent subspace refreshes, periodic checkpoint
saves/loads and injected NaN steps; resident memory must stay flat after warm-up.

    python benchmarks/soak.py                      # 3000 steps (the benchmark)
    python benchmarks/soak.py --steps 600          # a short run

Samples the process RSS (/proc/self/statm) after every step. Pass criterion: the peak RSS
after warm-up (first --warmup fraction of steps) is within --tolerance (5%) of the RSS at the
end of warm-up. Writes benchmarks/results/soak.json. A benchmark, not a CI test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from galore_ds.train.config import DistEnv, from_dict, validate  # noqa: E402
from galore_ds.train.data import StepLoader, build_datasets  # noqa: E402
from galore_ds.train.model import build_model  # noqa: E402
from galore_ds.train import checkpoint  # noqa: E402
from galore_ds.train.engines.single import SingleEngine  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--gap", type=int, default=10, help="galore.update_proj_gap (refresh every N steps)")
    ap.add_argument("--refresh", default="svd", choices=["svd", "randomized"])
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--nan-every", type=int, default=97, help="inject a NaN gradient every N steps (0 = never)")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="galore_soak_"))
    cfg = validate(from_dict({
        "name": "soak",
        "model": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "vocab_size": 512, "max_position_embeddings": 64},
        "data": {"source": "python-stdlib", "max_chars": 300_000, "seq_len": 64,
                 "cache_dir": str(ROOT / ".cache" / "galore_ds")},
        "training": {"steps": args.steps, "lr": 0.01, "warmup_steps": 10, "global_batch": 8, "micro_batch": 4,
                     "grad_clip": 1.0},
        "galore": {"rank": 16, "update_proj_gap": args.gap, "refresh": args.refresh},
        "checkpoint": {"dir": str(work / "ckpt"), "keep_last": 2},
        "logging": {"run_dir": str(work / "run"), "progress_bar": False},
    }), DistEnv())
    _, ds, _ = build_datasets(cfg.data, cfg.model.vocab_size)
    loader = StepLoader(ds, cfg.training.global_batch, cfg.training.micro_batch, 0, 1)
    engine = SingleEngine(cfg, DistEnv())
    engine.setup(build_model(cfg.model, seed=0))
    poison_param = dict(engine.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]

    warm = max(1, int(args.steps * args.warmup))
    rss, losses, saves, loads = [], [], 0, 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        hook = None
        if args.nan_every and step % args.nan_every == 0:
            hook = poison_param.register_hook(lambda g: torch.full_like(g, math.nan))
        out = engine.train_step(loader.next_step())
        if hook is not None:
            hook.remove()
        else:
            losses.append(out.loss)
        if args.save_every and step % args.save_every == 0:
            path = checkpoint.save(cfg.checkpoint_dir, step, engine,
                                   {"step": step, "data": loader.state_dict(), "config": json.dumps(cfg.to_dict())},
                                   cfg.checkpoint.keep_last)
            checkpoint.load(path, engine)  # round trip: load must not leak either
            saves, loads = saves + 1, loads + 1
        rss.append(rss_mb())
        if step % max(1, args.steps // 20) == 0:
            print(f"step {step}: loss {out.loss:.3f}, rss {rss[-1]:.1f} MB, {engine.galore_stats()}", flush=True)
    wall = time.perf_counter() - t0

    base = rss[warm - 1]
    after = rss[warm:]
    peak_after = max(after) if after else base
    growth = (peak_after - base) / base
    stats = engine.galore_stats()
    result = {
        "benchmark": "soak",
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "steps": args.steps, "warmup_steps": warm, "update_proj_gap": args.gap, "refresh": args.refresh,
        "saves_and_loads": saves, "nan_injected": (args.steps // args.nan_every) if args.nan_every else 0,
        "galore_stats": stats,
        "rss_mb_end_of_warmup": round(base, 2), "rss_mb_peak_after_warmup": round(peak_after, 2),
        "rss_mb_final": round(rss[-1], 2), "rss_mb_min_after_warmup": round(min(after), 2) if after else None,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 2),
        "growth_after_warmup": round(growth, 5), "tolerance": args.tolerance,
        "flat": growth <= args.tolerance,
        "first_loss": round(losses[0], 4), "last_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "wall_s": round(wall, 1), "ms_per_step": round(1000 * wall / args.steps, 2),
        "rss_mb_every_10pct": [round(rss[min(len(rss) - 1, i * args.steps // 10)], 2) for i in range(11)],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }
    ok = (result["flat"] and stats["skipped_steps"] == result["nan_injected"]
          and stats["refreshes"] > 0 and math.isfinite(result["last_loss"]))
    result["pass"] = bool(ok)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps", "rss_mb_end_of_warmup", "rss_mb_peak_after_warmup",
                                             "growth_after_warmup", "flat", "pass", "wall_s")}))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
