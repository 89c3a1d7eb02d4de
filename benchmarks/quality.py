"""Quality at equal tokens: a small LLaMA on WikiText-2, AdamW vs GaLore (exact and randomized refresh)
vs galore-torch 1.0,
each at its own best learning rate, several seeds.

    OMP_NUM_THREADS=1 python benchmarks/quality.py            # the study (~1-2 h on one core)
    python benchmarks/quality.py --steps 20 --seeds 1 --quick  # a check of the script (a minute)

1. Sweep (seed 0): AdamW over --adamw-lrs; GaLore (exact SVD) over --galore-lrs x --scales.
2. Seeds: the best setting of each (lowest final eval perplexity) again with every seed in
   --seeds; at GaLore's best setting and the same seeds, GaLore with the cold randomized
   refresh (seeded subspace iteration instead of exact SVD) and galore-torch 1.0.
Every run is this project's train loop with the same recipe, data order and schedule; only the
optimizer (and its lr / scale) differs. The training data repeats: the default 500 steps x 2048
tokens are 3.6 passes over valid.txt (~280K tokens at vocab 4096); benchmarks/quality_family.py
trains on each token once. Eval perplexity is taken --evals times during the run on
the same held-out stream (WikiText-2 test.txt). Writes the JSON and a plot of eval perplexity
against tokens (mean over seeds, band = min..max) next to it."""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from galore_ds.train.config import DistEnv, from_dict, validate
from galore_ds.train.engines.single import SingleEngine
from galore_ds.train.optim import build_param_groups, clip_full_gradients
from galore_ds.train.scheduler import warmup_cosine
from galore_ds.train.trainer import train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


class GaloreTorchEngine(SingleEngine):
    """The single engine with galore-torch 1.0's GaLoreAdamW (same param groups, same schedule)."""

    def setup(self, model):
        from galore_torch import GaLoreAdamW as RefAdamW

        self._model = model.to(self.device)
        self._model.train()
        t, g = self.cfg.training, self.cfg.galore
        groups = []
        for grp in build_param_groups(self._model, self.cfg):
            keep = {"params": grp["params"], "weight_decay": grp["weight_decay"]}
            if grp.get("name") == "galore":
                keep.update(rank=g.rank, update_proj_gap=g.update_proj_gap, scale=g.scale, proj_type=g.proj_type)
            groups.append(keep)
        self.optimizer = RefAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                                  no_deprecation_warning=True)
        self.scheduler = warmup_cosine(self.optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)

    def optimizer_step(self) -> float:
        """galore-torch's step does not clip: full-gradient clipping first, as its users do."""
        norm = clip_full_gradients([p for p in self._model.parameters() if p.grad is not None], self.cfg)
        self.optimizer.step()
        self.scheduler.step()
        return norm


def recipe(args, run_dir: Path, method: str, lr: float, scale: float, seed: int) -> dict:
    """The recipe every run shares; `method` only switches the optimizer."""
    return {
        "name": run_dir.name,
        "model": {"hidden_size": args.hidden, "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
                  "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 32,
                  "vocab_size": args.vocab, "max_position_embeddings": args.seq},
        "data": {"source": str(DATA / "valid.txt"), "eval_source": str(DATA / "test.txt"), "tokenizer": "bpe",
                 "seq_len": args.seq, "cache_dir": str(Path(args.run_root) / "cache")},
        "training": {"optimizer": "adamw" if method == "adamw" else "galore_adamw", "steps": args.steps,
                     "lr": lr, "warmup_steps": args.steps // 10, "global_batch": args.batch,
                     "micro_batch": args.batch, "grad_clip": 1.0, "seed": seed,
                     "eval_every": max(1, args.steps // args.evals), "eval_batches": args.eval_batches},
        "galore": {"enabled": method != "adamw", "rank": args.rank, "update_proj_gap": args.gap, "scale": scale,
                   "refresh": "randomized" if method == "galore_randomized" else "svd"},
        "checkpoint": {"save_final": False, "dir": str(run_dir / "ckpt")},
        "logging": {"run_dir": str(run_dir), "progress_bar": False, "log_every": 10},
    }


# method -> the engine class it runs on, where the recipe's own engine is not the one
ENGINES = {"galore_torch": GaloreTorchEngine}


def run(args, method: str, lr: float, scale: float, seed: int, make_recipe=recipe, engines=ENGINES) -> dict:
    """One training run (make_recipe builds its recipe, `engines` overrides its engine by
    method), or the finished one read back."""
    run_dir = Path(args.run_root) / f"{method}_lr{lr:g}_s{scale:g}_seed{seed}"
    rec = make_recipe(args, run_dir, method, lr, scale, seed)
    metrics = run_dir / "metrics.jsonl"
    done = run_dir / "recipe.json"
    # a finished run of the same recipe is read back (a study extended later reruns nothing)
    if not (done.is_file() and json.loads(done.read_text()) == rec and metrics.is_file()):
        cfg = validate(from_dict(rec), DistEnv())
        engine = engines[method](cfg, DistEnv()) if method in engines else None
        metrics.unlink(missing_ok=True)
        if train(cfg, DistEnv(), engine)["interrupted"]:  # Ctrl-C / SIGTERM: stop the study too
            raise SystemExit(f"{run_dir.name}: interrupted")
        done.write_text(json.dumps(rec))
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    tokens_per_step = args.batch * args.seq
    curve = [[r["step"] * tokens_per_step, r["eval_ppl"]] for r in rows if "eval_ppl" in r]
    out = {"method": method, "lr": lr, "scale": scale, "seed": seed, "eval_ppl": curve[-1][1],
           "curve": curve, "wall_s": round([r["elapsed_s"] for r in rows if "elapsed_s" in r][-1], 1),
           "passes": round([r["epoch"] for r in rows if "epoch" in r][-1], 4)}
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}), flush=True)
    return out


def summarize(runs: list[dict]) -> dict:
    ppl = [r["eval_ppl"] for r in runs]
    return {"lr": runs[0]["lr"], "scale": runs[0]["scale"], "seeds": [r["seed"] for r in runs],
            "eval_ppl": ppl, "mean": statistics.fmean(ppl),
            "stdev": statistics.stdev(ppl) if len(ppl) > 1 else 0.0, "min": min(ppl), "max": max(ppl)}


def label(name: str, s: dict, seeds: int) -> str:
    return (f"{name} (lr {s['lr']:g}" + (f", scale {s['scale']:g}" if name != "adamw" else "")
            + f"; {seeds} seeds)")


def plot(lines: dict[str, list[dict]], path: Path, eval_name: str = "WikiText-2 test", name_of=label) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in lines.items():
        tokens = [t for t, _ in runs[0]["curve"]]
        per_point = list(zip(*[[p for _, p in r["curve"]] for r in runs]))
        mean = [statistics.fmean(v) for v in per_point]
        s = summarize(runs)
        line, = ax.plot(tokens, mean, "o-", label=name_of(name, s, len(runs)))
        ax.fill_between(tokens, [min(v) for v in per_point], [max(v) for v in per_point],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"eval perplexity ({eval_name})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--gap", type=int, default=100)
    p.add_argument("--adamw-lrs", default="0.00125,0.0025,0.005,0.01")
    p.add_argument("--galore-lrs", default="0.01,0.02")
    p.add_argument("--scales", default="0.25,0.5")
    p.add_argument("--seeds", default="0,1,2", help="AdamW and GaLore at their best settings")
    p.add_argument("--extra-seeds", default="0,1", help="randomized refresh and galore-torch")
    p.add_argument("--evals", type=int, default=6, help="evaluations per run (the curve's points)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="one lr per method: check the script, measure nothing")
    p.add_argument("--run-root", default="runs/quality")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    return p


def main() -> None:
    args = parser().parse_args()
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    adamw_lrs, galore_lrs, scales = floats(args.adamw_lrs), floats(args.galore_lrs), floats(args.scales)
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.quick:
        adamw_lrs, galore_lrs, scales = adamw_lrs[:1], galore_lrs[:1], scales[:1]
    started = time.perf_counter()

    sweep = [run(args, "adamw", lr, 0.0, seeds[0]) for lr in adamw_lrs]
    sweep += [run(args, "galore", lr, s, seeds[0]) for lr, s in itertools.product(galore_lrs, scales)]
    best = {m: min((r for r in sweep if r["method"] == m), key=lambda r: r["eval_ppl"]) for m in ("adamw", "galore")}
    lines = {m: [best[m]] + [run(args, m, best[m]["lr"], best[m]["scale"], s) for s in seeds[1:]]
             for m in ("adamw", "galore")}
    for other in ("galore_randomized", "galore_torch"):  # GaLore's best setting, other refresh / code
        lines[other] = [run(args, other, best["galore"]["lr"], best["galore"]["scale"], s)
                        for s in (int(x) for x in args.extra_seeds.split(","))]

    summary = {m: summarize(rs) for m, rs in lines.items()}
    gap = 100 * (summary["galore"]["mean"] / summary["adamw"]["mean"] - 1)
    out = Path(args.out)
    doc = {
        "setup": {**vars(args), "tokens": args.steps * args.batch * args.seq,
                  "params_note": "LLaMA, untied embeddings", "data": "WikiText-2 valid.txt (train) / test.txt (eval)",
                  "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
                  "wall_s": round(time.perf_counter() - started, 1)},
        "summary": summary,
        "galore_vs_adamw_ppl_pct": round(gap, 2),
        "randomized_vs_exact_ppl_pct": round(100 * (summary["galore_randomized"]["mean"] / summary["galore"]["mean"] - 1), 2),
        "galore_vs_galore_torch_ppl_pct": round(100 * (summary["galore"]["mean"] / summary["galore_torch"]["mean"] - 1), 2),
        "paper_gap_pct": "+0.5 to +2.4 (60M-1B, C4, arXiv 2403.03507 Table 2)",
        "sweep": [{k: v for k, v in r.items() if k != "curve"} for r in sweep],
        "runs": {m: rs for m, rs in lines.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(lines, out.with_suffix(".png"))
    print(json.dumps({m: {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k != "eval_ppl"}
                      for m, s in summary.items()}, indent=1))
    print(f"GaLore vs AdamW: {gap:+.2f}% eval perplexity; wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
