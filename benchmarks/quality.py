"""Quality at equal tokens: a small LLaMA on WikiText-2 (train on valid.txt, eval on test.txt),
AdamW vs GaLore (exact SVD) vs GaLore (randomized refresh) vs galore-torch 1.0.

    python benchmarks/quality.py [--steps 300] [--out benchmarks/results/quality.json]

Every run uses the same recipe, data order, initial weights and LR schedule (the train loop of
this project); only the optimizer differs. Eval perplexity is on the whole held-out test
stream (up to --eval-batches micro-batches). Writes the JSON and quality.png next to it."""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from galore_ds.train.config import DistEnv, from_dict, validate
from galore_ds.train.engines.single import SingleEngine
from galore_ds.train.optim import build_param_groups
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


def recipe(args, name: str, run_root: Path, **over) -> dict:
    d = {
        "name": name,
        "model": {"hidden_size": args.hidden, "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
                  "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 32,
                  "vocab_size": args.vocab, "max_position_embeddings": args.seq},
        "data": {"source": str(DATA / "valid.txt"), "eval_source": str(DATA / "test.txt"), "tokenizer": "bpe",
                 "seq_len": args.seq, "cache_dir": str(run_root / "cache")},
        "training": {"optimizer": "galore_adamw", "steps": args.steps, "lr": args.lr, "warmup_steps": args.steps // 10,
                     "global_batch": args.batch, "micro_batch": args.batch, "grad_clip": 1.0,
                     "eval_every": 0, "eval_batches": args.eval_batches, "seed": 0},
        "galore": {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale},
        "checkpoint": {"save_final": False, "dir": str(run_root / name / "ckpt")},
        "logging": {"run_dir": str(run_root / name), "progress_bar": False, "log_every": 1},
    }
    for path, value in over.items():
        sec, key = path.split("__")
        d[sec][key] = value
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.005, help="GaLore runs' peak LR")
    p.add_argument("--adamw-lr", type=float, default=0.001,
                   help="AdamW's peak LR (the paper tunes full-rank and GaLore LRs separately: 1e-3 vs 1e-2)")
    p.add_argument("--merge", action="store_true", help="update --out with these runs, keep the others")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--gap", type=int, default=50)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--runs", default="adamw,galore_exact,galore_randomized,galore_torch")
    p.add_argument("--run-root", default="runs/quality")
    p.add_argument("--out", default="benchmarks/results/quality.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.run_root)
    variants = {
        "adamw": dict(training__optimizer="adamw", galore__enabled=False, training__lr=args.adamw_lr),
        "galore_exact": dict(galore__refresh="svd"),
        "galore_randomized": dict(galore__refresh="randomized"),
        "galore_torch": dict(),  # same recipe, optimizer replaced by GaloreTorchEngine
    }
    out = Path(args.out)
    results = {}
    if args.merge and out.exists():
        results = json.loads(out.read_text())["results"]
    for name in [n for n in args.runs.split(",") if n]:  # --runs "" only re-summarises --out
        cfg = validate(from_dict(recipe(args, name, root, **variants[name])), DistEnv())
        engine = GaloreTorchEngine(cfg, DistEnv()) if name == "galore_torch" else None
        (root / name / "metrics.jsonl").unlink(missing_ok=True)
        t0 = time.perf_counter()
        summary = train(cfg, DistEnv(), engine)
        prev = results.get(name)
        if prev is not None and prev.get("lr") not in (None, cfg.training.lr):
            results[f"{name}_lr{prev['lr']}"] = prev  # keep an earlier run at another LR
        results[name] = {"lr": cfg.training.lr, "eval_loss": summary["eval_loss"],
                         "eval_ppl": math.exp(summary["eval_loss"]),
                         "final_train_loss": summary["last_loss"], "wall_s": time.perf_counter() - t0,
                         "metrics": str(root / name / "metrics.jsonl")}
        print(name, json.dumps(results[name]), flush=True)
    # The baseline is the best AdamW run (LR swept: --adamw-lr with --merge keeps each LR).
    adamw = {n: r for n, r in results.items() if n.startswith("adamw")}
    if adamw:
        best = min(adamw, key=lambda n: adamw[n]["eval_ppl"])
        for r in results.values():
            r["ppl_gap_vs_best_adamw_pct"] = 100 * (r["eval_ppl"] / adamw[best]["eval_ppl"] - 1)
            r.pop("ppl_gap_vs_adamw_pct", None)
    tokens = args.steps * args.batch * args.seq
    doc = {"best_adamw": best if adamw else None,
           "setup": {**vars(args), "tokens": tokens, "data": "wikitext-2 valid.txt (train) / test.txt (eval)",
                     "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
           "results": results}
    ran = [n for n in args.runs.split(",") if n]
    if not ran and out.exists():  # summarising only: keep the setup of the runs
        doc["setup"] = json.loads(out.read_text())["setup"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    from galore_ds.tools.plot import plot

    names = [n for n in results if Path(results[n]["metrics"]).is_file()]
    plot([results[n]["metrics"] for n in names], str(out.with_suffix(".png")), labels=names)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
