"""Quality at equal bytes: the low-rank data-parallel engine (engine.mode=ddp) against torch's
PowerSGD hook with AdamW at the rank that sends the same bytes, 4 ranks, and the same engine
against the single-process GaLore run it must equal (it is exact).

    OMP_NUM_THREADS=1 python benchmarks/equal_bytes.py              # ~30 min on 2 cores
    python benchmarks/equal_bytes.py --steps 20 --evals 2 --quick    # a check of the script

The model, data, schedule and GaLore setting are benchmarks/quality.py's (its best GaLore lr and
scale, its best AdamW lr), so the single-process run is that study's seed-0 GaLore run.
1. Bytes: benchmarks/comm.py's model of what each method sends per optimizer step, for this
   model's parameter shapes at --world ranks; PowerSGD's rank is the one whose bytes are
   closest to GaLore's (averaged over the run: refreshes included).
2. Runs: GaLore single-process (launch/train.py's loop, `python`), GaLore on the ddp engine
   (`torchrun launch/train.py`), AdamW with DDP + torch's powerSGD_hook (this file's worker,
   the same train loop and data; error feedback and warm start on, the hook's defaults
   otherwise) at each of --psgd-lrs. Every distributed run logs the bytes it handed to
   torch.distributed each step (metrics.jsonl comm_bytes), so the model is checked too.
3. Control: the single process again, its global batch split into the ddp run's micro-batches
   (accumulated). The ddp engine is exact up to fp32 summation order; over hundreds of steps
   that order alone moves the trajectory, and this run shows by how much.
Writes benchmarks/results/equal_bytes.json and a plot of eval perplexity against tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import comm  # noqa: E402
import quality  # noqa: E402


# ------------------------------------------------------------------------------ worker
def powersgd_worker(config: str, rank: int) -> None:
    """One rank of the PowerSGD run: the ddp engine's set-up with torch's hook instead of ours."""
    import torch
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from galore_ds.train.config import dist_env, load_config
    from galore_ds.train.engines.ddp import DDPEngine
    from galore_ds.train.model import materialize
    from galore_ds.train.optim import build_optimizer, build_param_groups, warmup_cosine
    from galore_ds.train.trainer import train

    class PowerSGDEngine(DDPEngine):
        """AdamW; DDP's buckets all-reduced by torch's PowerSGD hook (rank `rank`)."""

        def setup(self, model: nn.Module) -> None:
            self.init_process_group()
            if any(p.is_meta for p in model.parameters()):  # the same initial weights as the ddp engine's
                materialize(model, self.device, self.cfg.model.init_std, self.cfg.training.seed)
            self._module = model.to(self.device)
            self._module.train()
            self.optimizer = build_optimizer(build_param_groups(self._module, self.cfg), self.cfg)
            self.scheduler = warmup_cosine(self.optimizer, self.cfg)
            self.layerwise = None
            self._ddp = nn.parallel.DistributedDataParallel(self._module, bucket_cap_mb=self.cfg.engine.ddp.bucket_mb)
            # start_powerSGD_iter=2: the earliest the hook allows with error feedback / warm start
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2,
                                       random_seed=self.cfg.training.seed)
            self._ddp.register_comm_hook(state, psgd.powerSGD_hook)

    torch.set_num_threads(1)
    env = dist_env()
    cfg = load_config(config, [], env)
    engine = PowerSGDEngine(cfg, env)
    train(cfg, env, engine)
    engine.close()


# ------------------------------------------------------------------------------ driver
def shapes(args) -> list[comm.ParamShape]:
    rec = quality.recipe(args, Path("unused"), "galore", 0.0, 0.0, 0)["model"]
    return comm.llama_shapes(rec["hidden_size"], rec["intermediate_size"], rec["num_hidden_layers"],
                             rec["vocab_size"])


def equal_rank(args) -> tuple[int, float, dict[int, float]]:
    """PowerSGD's rank whose bytes per step are closest to GaLore's average over the run."""
    ps = shapes(args)
    galore = comm.predicted_bytes(ps, args.rank, args.world, "galore", update_proj_gap=args.gap).average(args.steps)
    table = {r: comm.predicted_bytes(ps, r, args.world, "powersgd").average(args.steps) for r in range(1, 129)}
    best = min(table, key=lambda r: (abs(table[r] - galore), r))
    return best, galore, table


def launch(script: list[str], world: int) -> None:
    """`python script` on one process, torchrun on several."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)] if world > 1 else []
    cmd = [sys.executable, *ranks, *script]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def distributed_run(args, name: str, lr: float, scale: float, method: str, psgd_rank: int = 0,
                    world: int | None = None) -> dict:
    """One --world-rank run (read back when the same recipe already finished). world=1: the
    control, one process that splits the global batch into the same micro-batches."""
    world = world or args.world
    run_dir = Path(args.run_root) / f"{name.replace(' ', '_')}_lr{lr:g}"
    rec = quality.recipe(args, run_dir, "adamw" if method == "powersgd" else method, lr, scale, args.seed)
    micro = args.batch // args.world
    rec["training"]["micro_batch"] = micro   # the same global batch, one micro-batch per rank
    # the eval set is the first eval_batches x micro_batch sequences: the single run's set
    rec["training"]["eval_batches"] = args.eval_batches * args.batch // micro
    rec["logging"]["log_every"] = 1                             # every step's comm_bytes
    if world > 1:
        rec["engine"] = {"mode": "ddp"}
    if method == "powersgd":  # the ddp engine's config takes AdamW as GaLoreAdamW's full-rank rule
        rec["training"]["optimizer"], rec["galore"]["enabled"] = "galore_adamw", False
        rec["galore"]["scale"] = 1.0  # unused without GaLore matrices; validation wants it positive
    key = {"recipe": rec, "psgd_rank": psgd_rank}
    done, metrics = run_dir / "done.json", run_dir / "metrics.jsonl"
    if not (done.is_file() and json.loads(done.read_text()) == key and metrics.is_file()):
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
        path = run_dir / "recipe.json"
        path.write_text(json.dumps(rec))
        if method == "powersgd":
            launch([str(Path(__file__).resolve()), "--worker-config", str(path), "--worker-rank", str(psgd_rank)], world)
        else:
            launch([str(ROOT / "launch" / "train.py"), "--config", str(path)], world)
        done.write_text(json.dumps(key))
    return summarize_metrics(args, metrics, name, lr, scale)


def summarize_metrics(args, metrics: Path, name: str, lr: float, scale: float) -> dict:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    tokens_per_step = args.batch * args.seq
    curve = [[r["step"] * tokens_per_step, r["eval_ppl"]] for r in rows if "eval_ppl" in r]
    sent = [r["comm_bytes"] for r in rows if "comm_bytes" in r]
    out = {"name": name, "lr": lr, "scale": scale, "eval_ppl": curve[-1][1], "curve": curve,
           "train_loss": {r["step"]: r["loss"] for r in rows if "loss" in r},
           "comm_bytes_per_step": statistics.fmean(sent) if sent else 0.0,
           "wall_s": round([r["elapsed_s"] for r in rows if "elapsed_s" in r][-1], 1)}
    print(json.dumps({k: v for k, v in out.items() if k not in ("curve", "train_loss")}), flush=True)
    return out


def train_loss_gap(a: dict, b: dict) -> dict:
    """Worst relative train-loss difference over the steps both logged, and the first step where
    the two differ at all."""
    steps = sorted(set(a["train_loss"]) & set(b["train_loss"]), key=int)
    rel = {s: abs(a["train_loss"][s] / b["train_loss"][s] - 1) for s in steps}
    return {"worst_rel": max(rel.values()), "first_step_differing": next((int(s) for s in steps if rel[s]), None),
            "steps_compared": len(steps)}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        mb = r.get("comm_bytes_per_step", 0.0) / 2**20
        label = f"{r['name']} (lr {r['lr']:g}" + (f", {mb:.2f} MiB/step sent" if mb else "") + ")"
        ax.plot([t for t, _ in r["curve"]], [p for _, p in r["curve"]], marker="o", label=label,
                linestyle="--" if r["name"].startswith("galore single process") else "-")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("eval perplexity (WikiText-2 test)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = quality.parser()
    p.description = __doc__.splitlines()[0]
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--galore-lr", type=float, default=0.01, help="quality.py's best GaLore lr")
    p.add_argument("--galore-scale", type=float, default=0.5, help="quality.py's best GaLore scale")
    p.add_argument("--psgd-lrs", default="0.0025,0.005", help="AdamW lrs for PowerSGD (quality.py's best AdamW first)")
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--worker-rank", type=int, help=argparse.SUPPRESS)
    p.set_defaults(run_root="runs/equal_bytes", out="benchmarks/results/equal_bytes.json")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.worker_config:
        return powersgd_worker(args.worker_config, args.worker_rank)
    started = time.perf_counter()
    psgd_rank, galore_bytes, table = equal_rank(args)
    psgd_lrs = [float(x) for x in args.psgd_lrs.split(",")][: 1 if args.quick else None]
    print(f"GaLore rank {args.rank}: {galore_bytes / 2**20:.3f} MiB/step predicted; PowerSGD rank {psgd_rank}: "
          f"{table[psgd_rank] / 2**20:.3f} MiB/step", flush=True)

    quality.run(args, "galore", args.galore_lr, args.galore_scale, args.seed)  # trains it, or finds it trained
    run_dir = Path(args.run_root) / f"galore_lr{args.galore_lr:g}_s{args.galore_scale:g}_seed{args.seed}"  # quality.run's
    single = summarize_metrics(args, run_dir / "metrics.jsonl", "galore single process", args.galore_lr, args.galore_scale)
    ddp = distributed_run(args, "galore ddp engine", args.galore_lr, args.galore_scale, "galore")
    # control: the same single process with the ddp run's micro-batches (accumulated): how far
    # fp32 summation order alone carries this training
    control = distributed_run(args, f"galore single process {args.world} micro-batches", args.galore_lr,
                              args.galore_scale, "galore", world=1)
    psgd = [distributed_run(args, f"powersgd rank {psgd_rank}", lr, 0.0, "powersgd", psgd_rank) for lr in psgd_lrs]
    best_psgd = min(psgd, key=lambda r: r["eval_ppl"])

    doc = {
        "setup": {**{k: v for k, v in vars(args).items() if not k.startswith("worker")},
                  "tokens": args.steps * args.batch * args.seq, "torch": __import__("torch").__version__,
                  "machine": platform.machine(), "wall_s": round(time.perf_counter() - started, 1),
                  "powersgd": "torch powerSGD_hook: error feedback, warm start, start_powerSGD_iter 2, "
                              "min_compression_rate 2 (every 2-D tensor incl. embeddings)"},
        # benchmarks/comm.py: bytes each rank puts on the wire (a ring all-reduce sends
        # 2(W-1)/W of its payload); metrics' comm_bytes (runs[].comm_bytes_per_step) is the payload
        "bytes_per_step_predicted": {"galore": galore_bytes, "powersgd": table[psgd_rank],
                                     "powersgd_rank": psgd_rank,
                                     "ddp_full": comm.predicted_bytes(shapes(args), 0, args.world, "ddp").average(args.steps)},
        "eval_ppl": {"galore_single": single["eval_ppl"], "galore_single_micro_batches": control["eval_ppl"],
                     "galore_ddp": ddp["eval_ppl"],
                     **{f"powersgd_lr{r['lr']:g}": r["eval_ppl"] for r in psgd}},
        "galore_ddp_vs_single_rel": abs(ddp["eval_ppl"] / single["eval_ppl"] - 1),
        "control_vs_single_rel": abs(control["eval_ppl"] / single["eval_ppl"] - 1),
        "galore_ddp_vs_control_rel": abs(ddp["eval_ppl"] / control["eval_ppl"] - 1),
        "train_loss_gap": {"ddp_vs_single": train_loss_gap(ddp, single), "control_vs_single": train_loss_gap(control, single),
                           "ddp_vs_control": train_loss_gap(ddp, control)},
        "powersgd_vs_galore_ddp_ppl_pct": round(100 * (best_psgd["eval_ppl"] / ddp["eval_ppl"] - 1), 2),
        "runs": [single, control, ddp, *psgd],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc["runs"], out.with_suffix(".png"))
    print(json.dumps({k: doc[k] for k in ("bytes_per_step_predicted", "eval_ppl", "galore_ddp_vs_single_rel",
                                          "control_vs_single_rel", "train_loss_gap",
                                          "powersgd_vs_galore_ddp_ppl_pct")}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
