"""What the multi-process test workers share: a tiny model with awkward shapes, the global
batch, the single-process reference, comparisons, and the case runner.

A worker runs every case inside one process group (starting ranks is slow); each case asserts
inside the ranks and returns numbers, and rank 0 writes one JSON that the pytest file reads.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import galore_ds  # noqa: E402
from galore_ds.layouts.comm import COMM  # noqa: E402
from shutdown import exit_worker  # noqa: E402

TOL = 1e-5           # fp32: sharded == single process, relative, per parameter
EIGHT_BIT_TOL = 1e-2  # GaLoreAdamW8bit: blocks follow each rank's own moments (stated tolerance; measured <= 2.3e-3)
IN, OUT, RANK = 7, 3, 3

OPTIMIZERS = {
    "adamw": (galore_ds.GaLoreAdamW, dict(lr=1e-2, weight_decay=0.01)),
    "adafactor": (galore_ds.GaLoreAdafactor, dict(lr=1e-2, relative_step=False, scale_parameter=True,
                                                   beta1=0.9, clip_threshold=0.5, weight_decay=0.01)),
    "adamw8bit": (galore_ds.GaLoreAdamW8bit, dict(lr=1e-2, weight_decay=0.01, min_8bit_size=16)),
    # the family (issue 23): they read the full gradient; the limiter and APOLLO-Mini's tensor
    # norms are per matrix, summed across a split matrix's shards
    "fira": (galore_ds.FiraAdamW, dict(lr=1e-2, weight_decay=0.01)),
    "apollo": (galore_ds.ApolloAdamW, dict(lr=1e-2, weight_decay=0.01)),
    "apollo_mini": (galore_ds.ApolloAdamW, dict(lr=3e-3, weight_decay=0.01, scale_type="tensor", scale=128)),
}
# group settings an optimizer's users write into its GaLore groups (APOLLO-Mini is rank 1)
GROUP_SETTINGS = {"apollo_mini": dict(rank=1)}


class Tiny(nn.Module):
    """Module names as param_groups expects (attn/mlp are GaLore), shapes chosen to be awkward:
    attn_q 10x10 (10 rows on 3 ranks: 4,4,2; on 4: 3,3,3,1), attn_o 4x10 (wide: std projects
    it on the left; 10 columns divide by 2 but not 3 or 4), mlp_up 12x10, mlp_down 5x13 (wide;
    5 rows on 4 ranks: 2,2,1,0, one rank holds none), mlp_out 3x12 (wide, 12 columns divide by
    2, 3 and 4), a norm vector and full-rank embed/head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 10)
        self.attn_q = nn.Linear(10, 10, bias=False)
        self.attn_o = nn.Linear(10, 4, bias=False)
        self.mlp_up = nn.Linear(10, 13, bias=False)
        self.mlp_down = nn.Linear(13, 5, bias=False)
        self.mlp_out = nn.Linear(12, 3, bias=False)
        self.norm = nn.Parameter(torch.ones(5))
        self.head = nn.Linear(5, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        a = torch.tanh(self.attn_q(h))
        u = torch.tanh(self.mlp_up(h))
        d = torch.tanh(self.mlp_down(u) * self.norm)
        return self.mlp_out(torch.tanh(self.head(d))) + self.attn_o(a)[:, :OUT]


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def data(step: int, micro: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global micro-batch `micro` of step `step` (every rank builds the same)."""
    gen = torch.Generator().manual_seed(7919 * step + 31 * micro + 1)
    return torch.randn(rows, IN, generator=gen), torch.randn(rows, OUT, generator=gen)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def groups_of(model: nn.Module, kind: str, **galore) -> list | object:
    """The group layouts users build: param_groups (GaLore first), the plain groups first
    (transformers' integration), or a flat parameter list with `rank` (DeepSpeed's JSON)."""
    if kind == "flat":
        return list(model.parameters())
    gs = galore_ds.param_groups(model, **{"rank": RANK, "weight_decay": 0.01, **galore})
    return gs[::-1] if kind == "plain_first" else gs


def make_optimizer(name: str, model: nn.Module, kind: str = "named", **galore):
    cls, kw = OPTIMIZERS[name]
    extra = {k: galore.pop(k) for k in ("max_grad_norm", "reduce_group") if k in galore}
    galore = {"rank": RANK, **GROUP_SETTINGS.get(name, {}), **galore}
    if kind == "flat":
        return cls(groups_of(model, kind), **galore, **kw, **extra)
    return cls(groups_of(model, kind, **galore), **kw, **extra)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel_diff(model: nn.Module, ref: nn.Module) -> float:
    worst = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        a, b = full(p.detach()), q.detach()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst


def params_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """Every local parameter block and optimizer state tensor, cloned (bit-level checks)."""
    out = {f"p.{n}": (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
           for n, p in model.named_parameters()}
    for i, st in enumerate(opt.state.values()):
        for k, v in st.items():
            out[f"s{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def check(diff: float, tol: float, what: str = "parameters") -> None:
    assert diff <= tol, f"max relative {what} difference {diff:.3e} > {tol}"


def run_worker(cases: dict[str, Callable[[int], dict]], init: Callable[[], None] | None = None) -> None:
    """Run `cases` (name -> fn(world) -> dict) on every rank; rank 0 writes the JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the deepspeed launcher adds it
    args = ap.parse_args()
    os.environ["GALORE_TEST_CKPT"] = args.ckpt
    torch.set_num_threads(1)
    # the launcher sends SIGUSR1 to a run that hangs: every thread's stack goes to its log
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if init is not None:
        init()
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in args.only or list(cases):
        print(f"case {name}", flush=True)   # the log says which case a hang's stacks are in
        COMM.reset()
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **(cases[name](world) or {})}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "ranks": gathered}, f, indent=1, default=str)
    exit_worker()
