"""How much `oversample` buys the randomized refresh: its subspace error and cost at 0 and 8, and
the loss of whole runs (the measurement behind GaLoreSettings.oversample, galore_ds/core/settings.py).

    OMP_NUM_THREADS=1 python benchmarks/oversample.py          # ~3 min on one core

A 4-layer byte-level LLaMA (hidden 128, rank 32, update_proj_gap 25) trains on this Python's own
standard library sources with exact SVD refreshes. At every refresh after the first, for each
GaLore matrix, the warm randomized refresh at each oversample, chained from its own previous
basis as in training, is compared with the exact SVD of the same gradient: the share of the
top-`rank` gradient energy its subspace captures (1 = the exact subspace) and its wall time.
Then one whole run per setting (exact, randomized at each oversample): mean loss of the last
20 steps. Writes benchmarks/results/oversample.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import galore_ds
from galore_ds.core import projector as pj

RANK, GAP, SEQ, BSZ = 32, 25, 128, 8


def corpus(limit: int = 400_000) -> torch.Tensor:
    root = Path(os.__file__).parent
    text = b"".join(p.read_bytes() for p in sorted(root.glob("*.py")))[:limit]
    return torch.tensor(list(text), dtype=torch.long)


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ))


def batches(ids: torch.Tensor, steps: int):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ - 1, (BSZ,), generator=g)
        yield torch.stack([ids[s:s + SEQ] for s in starts])


def captured(grad: torch.Tensor, side: str, basis: torch.Tensor, exact: torch.Tensor) -> float:
    g = pj.to_right(grad, side).float()
    return float((g @ basis.t()).square().sum() / (g @ exact.t()).square().sum())


def subspace_error(ids: torch.Tensor, steps: int, oversamples: list[int]) -> dict:
    m = model()
    groups = galore_ds.param_groups(m, rank=RANK, update_proj_gap=GAP)
    opt = galore_ds.GaLoreAdamW(groups, lr=3e-3)
    mats = [(n, p) for g in groups if "rank" in g for n, p in zip(g["param_names"], g["params"])]
    prev = {k: {} for k in oversamples}
    ratios = {k: [] for k in oversamples}
    seconds = {k: 0.0 for k in oversamples}
    for step, x in enumerate(batches(ids, steps)):
        opt.zero_grad(set_to_none=True)
        m(input_ids=x, labels=x).loss.backward()
        if step % GAP == 0:
            for i, (name, p) in enumerate(mats):
                side = pj.choose_side(tuple(p.shape), "std")
                exact = pj.svd_basis(p.grad, RANK, side)
                for k in oversamples:
                    if name in prev[k]:
                        t0 = time.perf_counter()
                        basis = pj.compute_basis(p.grad, side, RANK, "randomized", prev[k][name], oversample=k,
                                                 generator=pj.refresh_generator(0, step, i))
                        seconds[k] += time.perf_counter() - t0
                        ratios[k].append(captured(p.grad, side, basis, exact))
                        prev[k][name] = basis
                    else:
                        prev[k][name] = exact   # the first refresh is exact in training too (cold start aside)
        opt.step()
    return {str(k): {"captured_energy_mean": statistics.mean(ratios[k]), "captured_energy_min": min(ratios[k]),
                     "refreshes": len(ratios[k]), "refresh_seconds": round(seconds[k], 3)} for k in oversamples}


def final_loss(ids: torch.Tensor, steps: int, **options) -> float:
    m = model()
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(m, rank=RANK, update_proj_gap=GAP, **options), lr=3e-3)
    losses = []
    for x in batches(ids, steps):
        opt.zero_grad(set_to_none=True)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return statistics.mean(losses[-20:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--oversample", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "oversample.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ids = corpus()
    t0 = time.perf_counter()
    out = {"rank": RANK, "update_proj_gap": GAP, "steps": args.steps,
           "subspace": subspace_error(ids, args.steps, args.oversample),
           "loss_last20": {"svd": final_loss(ids, args.steps)}}
    for k in args.oversample:
        out["loss_last20"][f"randomized_oversample_{k}"] = final_loss(ids, args.steps, refresh="randomized",
                                                                      oversample=k)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
