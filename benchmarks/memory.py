"""Peak memory of a training step, per optimizer and model size (CPU peak RSS; CUDA when present).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory.py --models 60m 130m 350m
    .venv/bin/python benchmarks/memory.py --models 60m --optimizers galore8bit_layerwise --steps 2

Each (model, optimizer) runs in its own subprocess. The model is built on the meta device and
materialised in bf16 (no fp32 copy), seq 256, micro-batch 1, the paper's ranks, randomized
refresh (the refresh method does not change memory; exact SVD of every matrix at step 0 would
take minutes on 2 shared cores). The peak of each step is Linux's VmHWM, reset before the step
(/proc/self/clear_refs = 5); "train_gib" = peak minus the RSS of the process before the model
existed (python + torch + transformers), which is what galore_ds.tools.estimate models.
Results: benchmarks/results/memory.json (one record per run, the estimate next to it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import PAPER_MODELS, proc_status, reset_peak  # noqa: E402

MODELS = PAPER_MODELS
OPTIMIZERS = ("adamw", "adam8bit", "galore", "galore8bit", "galore8bit_layerwise")
GIB = 2**30


def run_one(model_name: str, opt_name: str, steps: int, seq: int, batch: int) -> dict:
    """Inside the subprocess: build, train `steps` steps, report per-step peaks."""
    import torch

    import galore_ds  # noqa: F401  (imports bitsandbytes lazily; do it before the baseline)
    import bitsandbytes  # noqa: F401
    from galore_ds import GaLoreAdamW, GaLoreAdamW8bit, param_groups
    from galore_ds.train.config import ModelConfig
    from galore_ds import LayerwiseOptimizer
    from galore_ds.train.model import build_model, materialize

    torch.manual_seed(0)
    spec = dict(MODELS[model_name])
    rank = spec.pop("rank")
    # warm up the kernels the step uses so that their one-time allocations are in the baseline
    w = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
    (w @ w).sum().backward()
    baseline = proc_status("VmRSS")
    mcfg = ModelConfig(**spec, vocab_size=32000, max_position_embeddings=max(seq, 256), dtype="bfloat16")
    model = build_model(mcfg, seed=0, meta=True)
    materialize(model, "cpu", 0.02, 0)
    model.train()
    opts = dict(refresh="randomized", stagger=False)
    lw = None
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    elif opt_name == "adam8bit":
        opt = GaLoreAdamW8bit([{"params": list(model.parameters())}], lr=1e-3)
    elif opt_name == "galore":
        opt = GaLoreAdamW(param_groups(model, rank=rank, **opts), lr=1e-3)
    else:
        opt = GaLoreAdamW8bit(param_groups(model, rank=rank, **opts), lr=1e-3)
        if opt_name == "galore8bit_layerwise":
            lw = LayerwiseOptimizer(opt)
    after_model = proc_status("VmRSS")
    gen = torch.Generator().manual_seed(0)
    records = []
    for step in range(steps):
        x = torch.randint(0, 32000, (batch, seq), generator=gen)
        reset_peak()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if lw is not None:
            lw.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        peak = proc_status("VmHWM")
        records.append({"step": step, "peak_rss_gib": peak / GIB, "train_gib": (peak - baseline) / GIB,
                        "seconds": dt, "loss": float(loss)})
        del loss
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "optimizer": opt_name, "params": n_params, "rank": rank, "seq": seq,
            "micro_batch": batch, "dtype": "bfloat16", "baseline_rss_gib": baseline / GIB,
            "weights_rss_gib": (after_model - baseline) / GIB, "steps": records,
            "peak_train_gib": max(r["train_gib"] for r in records),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in records)}


def estimate_for(model_name: str, opt_name: str, seq: int, batch: int) -> dict:
    from galore_ds.tools.estimate import Shape, estimate

    spec = dict(MODELS[model_name])
    shape = Shape(**spec, vocab_size=32000, seq_len=seq, micro_batch=batch, dtype="bfloat16")
    layerwise = opt_name.endswith("_layerwise")
    e = estimate(shape, opt_name.replace("_layerwise", ""), layerwise, device="cpu")
    return e.gib()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["60m", "130m", "350m"], choices=sorted(MODELS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    p.add_argument("--reestimate", action="store_true",
                   help="recompute the estimate columns of the stored results and exit")
    p.add_argument("--table", action="store_true", help="print the stored results as a markdown table")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_one(a.child[0], a.child[1], a.steps, a.seq, a.batch)), flush=True)
        return 0
    out = Path(a.out)
    results = json.loads(out.read_text())["runs"] if out.exists() else []
    if a.reestimate:
        for r in results:
            r["estimate_gib"] = estimate_for(r["model"], r["optimizer"], r["seq"], r["micro_batch"])
            r["estimate_error"] = r["estimate_gib"]["total"] / r["peak_train_gib"] - 1
        _write(out, results)
    if a.table:
        print(table(results))
    if a.reestimate or a.table:
        return 0
    for m in a.models:
        for o in a.optimizers:
            cmd = [sys.executable, __file__, "--child", m, o, "--steps", str(a.steps),
                   "--seq", str(a.seq), "--batch", str(a.batch)]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{m} {o}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rec = json.loads(lines[-1][7:])
            rec["estimate_gib"] = estimate_for(m, o, a.seq, a.batch)
            rec["estimate_error"] = rec["estimate_gib"]["total"] / rec["peak_train_gib"] - 1
            rec["command"] = " ".join(["benchmarks/memory.py", "--models", m, "--optimizers", o,
                                       "--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch)])
            rec["wall_s"] = time.time() - t0
            results = [r for r in results if not (r["model"] == m and r["optimizer"] == o
                                                  and r["seq"] == a.seq and r["micro_batch"] == a.batch)]
            results.append(rec)
            print(f"{m:>5} {o:<22} peak RSS {rec['peak_rss_gib']:.3f} GiB, train {rec['peak_train_gib']:.3f} GiB, "
                  f"estimate {rec['estimate_gib']['total']:.3f} GiB ({100 * rec['estimate_error']:+.1f}%), "
                  f"step {rec['steps'][-1]['seconds']:.1f}s", flush=True)
            _write(out, results)
    return 0


def _write(out: Path, results: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    order = {m: i for i, m in enumerate(MODELS)}
    results.sort(key=lambda r: (order.get(r["model"], 99), OPTIMIZERS.index(r["optimizer"])))
    out.write_text(json.dumps({"host": platform.node(), "torch_threads": os.environ.get("OMP_NUM_THREADS"),
                               "note": "CPU peak RSS (VmHWM reset per step); train = peak - pre-model RSS; "
                                       "estimate = galore_ds.tools.estimate(device='cpu').total",
                               "runs": results}, indent=1))


def table(results: list) -> str:
    """Markdown: peak training memory (GiB) per model and optimizer, estimate in brackets."""
    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    rows = ["| optimizer | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for o in OPTIMIZERS:
        cells = []
        for m in models:
            r = next((r for r in results if r["model"] == m and r["optimizer"] == o), None)
            cells.append("" if r is None else
                         f"{r['peak_train_gib']:.2f} ({r['estimate_gib']['total']:.2f}, "
                         f"{100 * r['estimate_error']:+.0f}%)")
        rows.append(f"| {o} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
