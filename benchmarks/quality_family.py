"""Quality with no token trained twice: AdamW, GaLore, Fira, APOLLO and APOLLO-Mini on a small
LLaMA, each at its own best learning rate, 3 seeds.

    OMP_NUM_THREADS=1 python benchmarks/quality_family.py                  # the study (~40 min, 2 cores)
    python benchmarks/quality_family.py --methods adamw galore fira &      # or split over two cores:
    python benchmarks/quality_family.py --methods apollo apollo_mini       # finished runs are read back,
    python benchmarks/quality_family.py                                    # so the last call only assembles
    python benchmarks/quality_family.py --steps 10 --seeds 0 --lrs-per-method 1 --quick   # a script check

Data: WikiText-2 test.txt is the training stream (the BPE tokenizer is fit on it) and valid.txt
the held-out eval stream. The run length is one pass: steps = (sequences in test.txt) //
global batch, so every training token is seen at most once (each run's logged `epoch`, the
passes over the stream, is reported and checked <= 1). benchmarks/quality.py, the earlier study,
trained 3.6 passes over valid.txt.

1. Sweep (seed 0): each method over its starting learning rates; while the best is at either
   end of what was tried, one more rate (halved or doubled) until the best is bracketed or
   --max-extend rates were added (the JSON says which).
2. Seeds: each method's best rate with every seed in --seeds.
The control `adamw_galore_lrs` is torch's AdamW with GaLore's step sizes (the projected
matrices at lr * 0.25, the rest at lr): GaLore differs from it only by the projection, where
plain AdamW also differs by taking one lr for everything, and in this small model over half
the parameters are the embedding and lm_head.
Every run is this project's train loop on the same recipe, data order and schedule; only
training.optimizer and the learning rate differ. Each method keeps its paper's other settings:
GaLore and Fira scale 0.25 (galore.scale), rank --rank; APOLLO channel-wise at rank --rank with
its scale 1; APOLLO-Mini tensor-wise at rank 1 with scale 128 (docs/family.md). Writes the JSON and a
plot of eval perplexity against tokens (mean over seeds, band = min..max) next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DATA, plot, recipe, run, summarize  # noqa: E402

from galore_ds.core.settings import APOLLO_MINI  # noqa: E402
from galore_ds.train.config import DistEnv, from_dict, validate  # noqa: E402
from galore_ds.train.data.packing import build_datasets  # noqa: E402
from galore_ds.train.engines.single import SingleEngine  # noqa: E402

TRAIN, EVAL = DATA / "test.txt", DATA / "valid.txt"
OPTIMIZER = {"adamw": "adamw", "galore": "galore_adamw", "fira": "fira_adamw", "apollo": "apollo_adamw",
             "apollo_mini": "apollo_mini", "adamw_galore_lrs": "adamw"}
# each method's own scale (for the labels; APOLLO's are its constructor's, not galore.scale)
SCALE = {"adamw": 0.0, "galore": 0.25, "fira": 0.25, "apollo": 1.0, "apollo_mini": float(APOLLO_MINI["scale"]),
         "adamw_galore_lrs": 0.25}
START_LRS = {"adamw": [0.0025, 0.005, 0.01], "galore": [0.01, 0.02, 0.04], "fira": [0.005, 0.01, 0.02],
             "apollo": [0.005, 0.01, 0.02], "apollo_mini": [0.005, 0.01, 0.02],
             "adamw_galore_lrs": [0.01, 0.02, 0.04]}


class GaLoreLRsAdamWEngine(SingleEngine):
    """The control: torch's AdamW with GaLore's step sizes, the matrices GaLore projects at
    lr * galore.scale and the rest (embeddings, lm_head, norms: over half of this small model)
    at lr. GaLore's runs differ from it only by the projection; plain AdamW has one lr for all."""

    def build_optimizer(self, model, per_layer=None, **layout) -> None:
        from galore_ds import param_groups
        from galore_ds.train.optim import warmup_cosine

        t, g = self.cfg.training, self.cfg.galore
        groups = [dict(params=grp["params"], weight_decay=grp["weight_decay"],
                       lr=t.lr * g.scale if "rank" in grp else t.lr)
                  for grp in param_groups(model, rank=g.rank, target_modules=tuple(g.target_modules),
                                          weight_decay=t.weight_decay)]
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        self.scheduler = warmup_cosine(self.optimizer, self.cfg)
        self.layerwise = None


ENGINES = {"adamw_galore_lrs": GaLoreLRsAdamWEngine}
# C4 validation perplexity at 60M / 130M / 350M / 1B (APOLLO, arXiv 2412.05270, Table 2)
PAPER = {"adamw": [34.06, 25.08, 18.80, 15.56], "galore": [34.88, 25.36, 18.95, 15.64],
         "fira": [31.06, 22.73, 17.03, 14.31], "apollo": [31.55, 22.94, 16.85, 14.20],
         "apollo_mini": [31.93, 23.53, 17.18, 14.17]}


def family_recipe(args, run_dir: Path, method: str, lr: float, scale: float, seed: int) -> dict:
    """benchmarks/quality.py's recipe on the one-pass data, with the method's optimizer."""
    rec = recipe(args, run_dir, "adamw" if OPTIMIZER[method] == "adamw" else "galore", lr, 0.25, seed)
    rec["data"].update(source=str(TRAIN), eval_source=str(EVAL))
    rec["training"]["optimizer"] = OPTIMIZER[method]
    if method in ("galore", "fira", "adamw_galore_lrs"):
        rec["galore"]["scale"] = scale
    return rec


def one_pass_steps(args) -> tuple[int, int]:
    """(sequences in the training stream, steps of one pass at the global batch)."""
    rec = family_recipe(args, Path(args.run_root) / "count", "adamw", 1e-3, 0.0, 0)
    rec["training"].update(steps=1, eval_every=1)   # any valid length: only the data is built
    cfg = validate(from_dict(rec), DistEnv())
    _, train, _ = build_datasets(cfg.data, cfg.model.vocab_size)
    return len(train), len(train) // args.batch


def ppl(r: dict) -> float:
    return r["eval_ppl"] if math.isfinite(r["eval_ppl"]) else math.inf


def sweep(args, method: str, seed: int) -> tuple[list[dict], bool]:
    """Seed-`seed` runs over the starting rates, extended until the best is bracketed."""
    runs = {lr: run(args, method, lr, SCALE[method], seed, family_recipe, ENGINES)
            for lr in START_LRS[method][: args.lrs_per_method]}
    for _ in range(args.max_extend + 1):
        best = min(runs, key=lambda lr: ppl(runs[lr]))
        if len(runs) > 1 and min(runs) < best < max(runs):
            return list(runs.values()), True
        if len(runs) - args.lrs_per_method >= args.max_extend or args.quick:
            break
        new = best / 2 if best == min(runs) else best * 2
        runs[new] = run(args, method, new, SCALE[method], seed, family_recipe, ENGINES)
    return list(runs.values()), False


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(OPTIMIZER), choices=list(OPTIMIZER))
    p.add_argument("--steps", type=int, default=0, help="0: one pass over the training stream")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32, help="GaLore, Fira, APOLLO (APOLLO-Mini: 1)")
    p.add_argument("--gap", type=int, default=100)
    p.add_argument("--lrs-per-method", type=int, default=3, help="starting rates per method (START_LRS)")
    p.add_argument("--max-extend", type=int, default=3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--evals", type=int, default=6)
    p.add_argument("--eval-batches", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="no bracketing: check the script, measure nothing")
    p.add_argument("--run-root", default="runs/quality_family")
    p.add_argument("--out", default="benchmarks/results/quality_family.json")
    return p


def main() -> None:
    args = parser().parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    started = time.perf_counter()
    sequences, pass_steps = one_pass_steps(args)
    if args.steps > pass_steps:
        raise SystemExit(f"--steps {args.steps} would train {args.steps / pass_steps:.2f} passes over "
                         f"{TRAIN.name} (one pass is {pass_steps} steps at batch {args.batch})")
    args.steps = args.steps or pass_steps

    swept, bracketed, lines = {}, {}, {}
    for method in args.methods:
        swept[method], bracketed[method] = sweep(args, method, seeds[0])
        best = min(swept[method], key=ppl)
        lines[method] = [best] + [run(args, method, best["lr"], best["scale"], s, family_recipe, ENGINES)
                                  for s in seeds[1:]]
    passes = max(r["passes"] for rs in [*swept.values(), *lines.values()] for r in rs)
    assert passes <= 1.0, f"a run trained {passes} passes over {TRAIN.name}"
    if set(args.methods) != set(OPTIMIZER):
        print(f"ran {args.methods}; the JSON is written when every method has run (call without --methods)")
        return

    summary = {m: summarize(rs) for m, rs in lines.items()}
    vs = lambda a, b: round(100 * (summary[a]["mean"] / summary[b]["mean"] - 1), 2)  # noqa: E731
    doc = {
        "setup": {**vars(args), "tokens_per_run": args.steps * args.batch * args.seq,
                  "train_sequences": sequences, "passes_over_train_data": passes,
                  "data": f"WikiText-2 {TRAIN.name} (train, one pass) / {EVAL.name} (eval)",
                  "params_note": "LLaMA, untied embeddings; GaLore/Fira/APOLLO on attention and MLP matrices",
                  "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
                  "wall_s_this_call": round(time.perf_counter() - started, 1)},
        "summary": summary,
        "ppl_vs_adamw_pct": {m: vs(m, "adamw") for m in OPTIMIZER if m != "adamw"},
        "ppl_vs_galore_pct": {m: vs(m, "galore") for m in OPTIMIZER if m not in ("adamw", "galore")},
        "lr_bracketed": bracketed,
        "paper_c4_ppl_60m_130m_350m_1b": PAPER,
        "sweep": {m: [{k: v for k, v in r.items() if k != "curve"} for r in rs] for m, rs in swept.items()},
        "runs": lines,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    name_of = lambda name, s, n: f"{name} (lr {s['lr']:g}; {n} seeds)"  # noqa: E731
    plot(lines, out.with_suffix(".png"), eval_name=f"WikiText-2 {EVAL.name}", name_of=name_of)
    for m, s in summary.items():
        print(f"{m:12s} lr {s['lr']:<7g} eval ppl {s['mean']:.2f} +- {s['stdev']:.2f} "
              f"(bracketed: {bracketed[m]})")
    print(f"passes over {TRAIN.name}: {passes}; wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
