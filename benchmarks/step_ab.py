"""A/B of the optimizer step: this checkout against an earlier commit, alternated in one run.

A refactor of the step (issue 22: the step's phases shared with the per-layer wrapper, the
rules' declarations, the settings object) must not make it slower. Each measurement is a fresh
process that imports one version of galore_ds (the commit's tree, exported with git archive, or
this checkout) and times the steady GaLore step (no refresh) at the paper's LLaMA shapes; the
two versions alternate A B B A ... so drift of the machine (thermal, other load) falls on both.

    python benchmarks/step_ab.py [--base 28f759f] [--this HEAD] [--rounds 4] [--models 60m 350m]

Writes results/step_ab.json: per case the median over rounds of each version's median step
time, and the ratio this/base (< 1: faster now).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# GaLoreAdamW at lr 1e-3 (no clipping, and clipping that scales every step), GaLoreAdamW8bit
CASES = {"adamw": ("GaLoreAdamW", {}), "adamw_clip": ("GaLoreAdamW", {"max_grad_norm": 1e-6}),
         "adamw8bit": ("GaLoreAdamW8bit", {})}


def child(root: str, model: str, case: str, reps: int, layers: int) -> None:
    """Time `reps` steady steps with the galore_ds found under `root`; print the median (ms)."""
    sys.path.insert(0, root)
    sys.path.insert(1, str(Path(__file__).parent))
    import torch

    import galore_ds
    from optimizer_step import MODELS, layer_shapes

    assert Path(galore_ds.__file__).resolve().is_relative_to(Path(root).resolve()), galore_ds.__file__
    torch.manual_seed(0)
    cfg = MODELS[model]
    shapes = layer_shapes(cfg["hidden"], cfg["inter"]) * layers
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    cls, kwargs = CASES[case]
    # the first step's refresh is not timed: the randomized one keeps it short (exact SVDs of
    # every matrix take longer than the timed steps)
    opt = getattr(galore_ds, cls)([{"params": params, "rank": cfg["rank"], "update_proj_gap": 10**9,
                                    "scale": 0.25, "refresh": "randomized"}], lr=1e-3, **kwargs)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()   # projectors and state
    opt.step()   # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1e3 * statistics.median(times)}))


def export(rev: str, into: Path) -> Path:
    """The commit's tree (tracked files only) under `into`."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(root: Path, model: str, case: str, reps: int, layers: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", str(root), "--model", model, "--case", case,
                          "--reps", str(reps), "--layers", str(layers)],
                         check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="28f759f", help="the commit to compare against (default: before issue 22)")
    ap.add_argument("--this", default=None, help="a commit to measure instead of this checkout's working tree")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--models", nargs="+", default=["60m", "350m"])
    ap.add_argument("--layers-60m", type=int, default=8)
    ap.add_argument("--layers-350m", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/step_ab.json")
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--case")
    ap.add_argument("--layers", type=int)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.model, args.case, args.reps, args.layers)
        return
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.this or "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = args.this is None and bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                                       "galore_ds"], check=True, capture_output=True,
                                                      text=True).stdout.strip())
    result = {"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}",
              "command": "python " + " ".join(sys.argv), "base": args.base,
              "this": head + (" + uncommitted changes" if dirty else ""), "rounds": args.rounds,
              "reps_per_round": args.reps, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = export(args.base, Path(tmp) / "base")
        this = ROOT if args.this is None else export(args.this, Path(tmp) / "this")
        for model in args.models:
            layers = args.layers_60m if model == "60m" else args.layers_350m
            for case in args.cases:
                samples = {"base": [], "this": []}
                for r in range(args.rounds):
                    order = [("base", base), ("this", this)]
                    for side, root in (order if r % 2 == 0 else order[::-1]):
                        samples[side].append(measure(root, model, case, args.reps, layers))
                row = {"model": model, "case": case, "matrices": 7 * layers,
                       "median_ms": {k: statistics.median(v) for k, v in samples.items()},
                       "per_round_ms": samples}
                row["this_over_base"] = row["median_ms"]["this"] / row["median_ms"]["base"]
                result["cases"].append(row)
                print(json.dumps({k: row[k] for k in ("model", "case", "median_ms", "this_over_base")}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
