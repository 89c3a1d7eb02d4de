"""Multi-process FSDP2 GaLore cases: one process group per world size, every case inside it.

Run by tests/test_fsdp.py (env RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, like torchrun):
    torchrun --nproc_per_node 4 tests/dist/fsdp_cases.py --out /tmp/r.json [--only NAME ...]
Each case builds the same tiny model on every rank, trains it with FSDP2 + our optimizer on a
global batch split across ranks, and trains an unsharded copy with the single-process
GaLoreAdamW on the whole global batch inside the same rank. Rank 0 writes one JSON with
every case's numbers and errors (per rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from galore_ds.distributed.common import COMM, chunk_rows, count_collectives  # noqa: E402
from galore_ds.distributed.fsdp import FSDPGaLoreAdamW, FSDPGaLoreAdamW8bit  # noqa: E402
from galore_ds.distributed.fsdp_layerwise import FSDPLayerwiseOptimizer  # noqa: E402
from galore_ds.layerwise import LayerwiseOptimizer  # noqa: E402
from galore_ds.optim.adamw import GaLoreAdamW  # noqa: E402
from galore_ds.optim.base import side_of  # noqa: E402
from shutdown import exit_worker  # noqa: E402

TOL = 1e-5
IN, OUT = 7, 3


class Tiny(nn.Module):
    """LLaMA-ish shapes with odd row counts: 10x7, 13x10, 5x13 (wide: 2,2,1,0 rows on 4
    ranks), a norm vector and a full-rank head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, 10)
        self.mlp_up = nn.Linear(10, 13, bias=False)
        self.mlp_down = nn.Linear(13, 5, bias=False)
        self.norm = nn.Parameter(torch.ones(5))
        self.head = nn.Linear(5, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.mlp_up(h))
        h = self.mlp_down(h) * self.norm
        return self.head(torch.tanh(h))


GALORE = ("embed.weight", "mlp_up.weight", "mlp_down.weight")


def make_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def groups(model: nn.Module, **galore) -> list[dict]:
    named = dict(model.named_parameters())
    g = dict(params=[named[n] for n in GALORE], rank=3, weight_decay=0.01, **galore)
    rest = dict(params=[p for n, p in named.items() if n not in GALORE], weight_decay=0.0)
    return [g, rest]


def data(step: int, micro: int, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7919 * step + 31 * micro + 1)
    x = torch.randn(bsz, IN, generator=gen)
    y = torch.randn(bsz, OUT, generator=gen)
    return x, y


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    kw = {} if mesh is None else {"mesh": mesh}
    for mod in (model.embed, model.mlp_up, model.mlp_down, model.head):
        fully_shard(mod, **kw)
    fully_shard(model, **kw)
    return model


def rel_diff(sharded: nn.Module, ref: nn.Module) -> float:
    worst = 0.0
    for (name, p), (_, q) in zip(sharded.named_parameters(), ref.named_parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        worst = max(worst, float((full.detach() - q.detach()).norm() / q.detach().norm().clamp_min(1e-30)))
    return worst


def cdm_count(fn) -> tuple[int, int, object]:
    """(torch.distributed calls, CommDebugMode c10d/funcol ops, fn's result)."""
    from torch.distributed.tensor.debug import CommDebugMode

    cdm = CommDebugMode()
    with count_collectives() as c, cdm:
        out = fn()
    return c.total_calls(), cdm.get_total_counts(), out


def run_training(
    *, steps: int, gap: int, bsz: int, accum: int = 1, sync_each: bool = False,
    refresh_mode: str = "owner", refresh: str = "svd", opt_cls=FSDPGaLoreAdamW,
    stagger: bool = False, mesh=None, replicate_group=None, dp_rank=None, dp_size=None,
    lr: float = 1e-2, start_step: int = 0, model=None, opt=None, moments: str = "keep",
):
    """Train the sharded model; returns (model, opt, per-step collective counts)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank = rank if dp_rank is None else dp_rank
    dp_size = world if dp_size is None else dp_size
    if model is None:
        model = shard_model(make_model(), mesh)
        opt = opt_cls(groups(model, update_proj_gap=gap, refresh=refresh, stagger=stagger,
                             moments=moments),
                      lr=lr, refresh_mode=refresh_mode, replicate_group=replicate_group)
    counts = []
    local = bsz // dp_size
    for step in range(start_step, start_step + steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(accum):
            x, y = data(step, micro, bsz)
            x, y = x[dp_rank * local:(dp_rank + 1) * local], y[dp_rank * local:(dp_rank + 1) * local]
            if accum > 1 and not sync_each:
                model.set_requires_gradient_sync(micro == accum - 1)
            loss = nn.functional.mse_loss(model(x), y) / accum
            loss.backward()
        calls, cdm, _ = cdm_count(opt.step)
        counts.append((calls, cdm))
    return model, opt, counts


def reference(*, steps: int, gap: int, bsz: int, accum: int = 1, refresh: str = "svd",
              stagger: bool = False, lr: float = 1e-2, moments: str = "keep"):
    """Single-process GaLoreAdamW (proj_type='right') on the whole global batch (accum x bsz)."""
    model = make_model()
    opt = GaLoreAdamW(groups(model, update_proj_gap=gap, refresh=refresh, stagger=stagger,
                             proj_type="right", moments=moments), lr=lr)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        xs, ys = zip(*(data(step, micro, bsz) for micro in range(accum)))
        loss = nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys))
        loss.backward()
        opt.step()
    return model, opt


def refresh_steps(steps: int, gap: int) -> list[int]:
    return [s for s in range(steps) if s % gap == 0]


# ------------------------------------------------------------------------------ cases
def case_exact(world: int, refresh_mode="owner", refresh="svd", accum=1, sync_each=False,
               steps=7, gap=3, stagger=False, moments="keep") -> dict:
    bsz = 12
    model, opt, counts = run_training(steps=steps, gap=gap, bsz=bsz, accum=accum, sync_each=sync_each,
                                      refresh_mode=refresh_mode, refresh=refresh, stagger=stagger,
                                      moments=moments)
    ref, ref_opt = reference(steps=steps, gap=gap, bsz=bsz, accum=accum, refresh=refresh,
                             stagger=stagger, moments=moments)
    diff = rel_diff(model, ref)
    refr = set(refresh_steps(steps, gap)) if not stagger else set()
    between = [counts[s] for s in range(steps) if s not in refr] if not stagger else []
    at = [counts[s] for s in sorted(refr)]
    out = {"rel_diff": diff, "counts": counts, "refreshes": opt.galore_stats["refreshes"],
           "ref_refreshes": ref_opt.galore_stats["refreshes"]}
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    assert opt.galore_stats["refreshes"] == ref_opt.galore_stats["refreshes"], out
    assert all(c == (0, 0) for c in between), f"collectives between refreshes: {between}"
    if refresh_mode == "owner":
        assert all(c[0] == 2 for c in at), f"owner refresh should be 2 collectives: {at}"
    else:  # first refresh: owner SVD (2); warm refreshes: one all-reduce per iteration
        assert at[0][0] == 2 and all(c[0] == 1 for c in at[1:]), f"subspace refresh counts: {at}"
    # every GaLore matrix is projected on the right (row shards)
    for p in model.parameters():
        st = opt.state[p]
        if "proj" in st:
            assert side_of(st) == "right"
            assert st["exp_avg"].shape == (p.to_local().shape[0], 3), st["exp_avg"].shape
    return out


def case_stagger(world: int) -> dict:
    """Staggered refreshes (a different subset each step) still equal single-process."""
    steps, gap = 7, 3
    model, opt, counts = run_training(steps=steps, gap=gap, bsz=12, stagger=True)
    ref, _ = reference(steps=steps, gap=gap, bsz=12, stagger=True)
    diff = rel_diff(model, ref)
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    return {"rel_diff": diff, "counts": counts}


def case_8bit_smoke(world: int) -> dict:
    """8-bit moments on shards: trains, finite, no collectives between refreshes."""
    steps, gap = 4, 3
    model, opt, counts = run_training(steps=steps, gap=gap, bsz=12, opt_cls=FSDPGaLoreAdamW8bit)
    for p in model.parameters():
        assert torch.isfinite(p.to_local()).all()
    assert all(c == (0, 0) for s, c in enumerate(counts) if s % gap), counts
    ref, _ = reference(steps=steps, gap=gap, bsz=12)
    return {"counts": counts, "rel_diff_vs_fp32_adamw": rel_diff(model, ref)}


def case_layout(world: int) -> dict:
    """FSDP2 row split is torch.chunk's (10 rows on 4 ranks: 3,3,3,1; 5 rows: 2,2,1,0)."""
    rank = dist.get_rank()
    model = shard_model(make_model())
    rows = {}
    for name, p in model.named_parameters():
        rows[name] = p.to_local().shape[0]
        assert rows[name] == chunk_rows(p.shape[0], world)[rank], (name, rows[name])
    return {"rows": rows}


def case_hsdp(world: int) -> dict:
    """HSDP 2 x 2: fully_shard on the shard mesh, projected gradients all-reduced over the
    replicate mesh by the optimizer (1 collective per step, m_i x r instead of m_i x n)."""
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    steps, gap, bsz = 7, 3, 12
    model, opt, counts = run_training(steps=steps, gap=gap, bsz=bsz, mesh=mesh["shard"],
                                      replicate_group=mesh["replicate"].get_group())
    ref, _ = reference(steps=steps, gap=gap, bsz=bsz)
    diff = rel_diff(model, ref)
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    refr = set(refresh_steps(steps, gap))
    assert all(c[0] == 1 for s, c in enumerate(counts) if s not in refr), counts
    assert all(c[0] == 4 for s, c in enumerate(counts) if s in refr), counts
    # bytes over the replicate mesh per step vs all-reducing the full local gradients
    low = sum(opt.state[p]["exp_avg"].numel() for p in model.parameters()) * 4
    full = sum(p.to_local().numel() for p in model.parameters()) * 4
    return {"rel_diff": diff, "counts": counts, "replicate_bytes_per_step": low,
            "full_grad_bytes_per_step": full}


CKPT_STEPS, CONT_STEPS, CKPT_GAP = 4, 4, 3


def case_dcp_save(world: int) -> dict:
    """World 2: train 4 steps (refreshes at 0 and 3), save with torch.distributed.checkpoint."""
    if world != 2 or not CKPT_DIR:
        return {"skipped": "saves on 2 ranks"}
    import torch.distributed.checkpoint as dcp

    from galore_ds.distributed.fsdp_checkpoint import dcp_state_dict

    model, opt, _ = run_training(steps=CKPT_STEPS, gap=CKPT_GAP, bsz=12)
    dcp.save(dcp_state_dict(model, opt), checkpoint_id=CKPT_DIR)
    return {"saved": CKPT_DIR}


def case_dcp_load(world: int) -> dict:
    """World 3: load the 2-rank checkpoint, train 4 more steps (refresh at 6), equal to an
    uninterrupted single-process run of 8 steps."""
    if world != 3 or not CKPT_DIR:
        return {"skipped": "loads on 3 ranks"}
    from galore_ds.distributed.fsdp_checkpoint import dcp_load

    model = shard_model(make_model(seed=123))  # different init: the load must overwrite it
    opt = FSDPGaLoreAdamW(groups(model, update_proj_gap=CKPT_GAP), lr=1e-2)
    dcp_load(model, opt, CKPT_DIR)
    for p in model.parameters():
        assert opt.state[p]["step"] == CKPT_STEPS
    model, opt, counts = run_training(steps=CONT_STEPS, gap=CKPT_GAP, bsz=12, model=model, opt=opt,
                                      start_step=CKPT_STEPS)
    ref, _ = reference(steps=CKPT_STEPS + CONT_STEPS, gap=CKPT_GAP, bsz=12)
    diff = rel_diff(model, ref)
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    assert counts[2][0] == 2 and all(c == (0, 0) for i, c in enumerate(counts) if i != 2), counts
    return {"rel_diff": diff, "counts": counts}


def case_engine(world: int, replicate: int = 1, clip: float = 0.05, layerwise: bool = False) -> dict:
    """The fsdp engine (tiny LLaMA, accumulation, clipping at 0.05) equals the single engine
    on the same global micro-batches: loss, grad norm and parameters. replicate=2 on 4 ranks
    with clip=0: HSDP 2 x 2 with the low-rank replica all-reduce. layerwise=True: the fsdp
    engine with engine.fsdp.layerwise (4 micro-batches of 2 per step, low-rank clipping)
    equals the single-process layerwise engine (8 micro-batches of 1)."""
    if world != (2 if replicate == 1 else 4):
        return {"skipped": "runs on 2 ranks (HSDP: 4)"}
    from galore_ds.config import DistEnv, from_dict
    from galore_ds.model import build_model
    from galore_ds.train.engine_fsdp import FSDPEngine
    from galore_ds.train.engine_layerwise import LayerwiseEngine
    from galore_ds.train.engine_single import SingleEngine

    rank = dist.get_rank()
    cfg = from_dict({
        "model": {"hidden_size": 16, "intermediate_size": 26, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "vocab_size": 32, "max_position_embeddings": 16},
        "training": {"optimizer": "galore_adamw", "steps": 4, "lr": 0.01, "warmup_steps": 1,
                     "global_batch": 8, "micro_batch": 1, "grad_clip": clip},
        "galore": {"rank": 4, "update_proj_gap": 2, "proj_type": "right"},
        "engine": {"mode": "fsdp", "fsdp": {"replicate": replicate, "layerwise": layerwise}},
    })
    n_micro = cfg.accumulation(world)
    fs = FSDPEngine(cfg, DistEnv(rank, world, rank, "torch"))
    fs.setup(build_model(cfg.model, seed=0, meta=False))
    single = (LayerwiseEngine if layerwise else SingleEngine)(cfg, DistEnv())
    single.setup(build_model(cfg.model, seed=0, meta=False))
    out = []
    for step in range(4):
        gen = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, 32, (8, 8), generator=gen)
        mbs = [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(8)]
        mine = mbs[rank * n_micro:(rank + 1) * n_micro]
        a, b = fs.train_step(mine), single.train_step(mbs)
        out.append((a.loss, b.loss, a.grad_norm, b.grad_norm))
        assert abs(a.loss - b.loss) <= 1e-5 * abs(b.loss), out
        if clip > 0:
            assert abs(a.grad_norm - b.grad_norm) <= 1e-5 * b.grad_norm, out
    diff = rel_diff(fs.model, single.model)
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    if clip > 0:
        assert out[0][3] > clip, "clipping should be active in this test"
    else:
        assert getattr(fs.optimizer, "replicate_group", None) is not None, "low-rank HSDP path"
    if layerwise:
        assert fs.layerwise is not None and fs.layerwise.global_step == 4
        assert single.layerwise.accumulation_steps == 8 and fs.layerwise.accumulation_steps == 4
    return {"rel_diff": diff, "loss_gradnorm": out, "stats": fs.galore_stats()}


def case_nonfinite_refresh(world: int) -> dict:
    """A non-finite gradient row on one rank at a refresh: the owner shares "nothing new",
    every rank keeps the same old projector (none diverges, nobody hangs)."""
    gap = 2
    model, opt, _ = run_training(steps=gap, gap=gap, bsz=12)
    p = model.mlp_up.weight
    old = opt.state[p]["proj"].clone()
    x, y = data(99, 0, 12)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    if dist.get_rank() == 0:
        p.grad.to_local()[0, 0] = float("nan")
    opt.step()  # step `gap`: refresh due
    new = opt.state[p]["proj"]
    assert torch.equal(new, old), "projector changed despite a non-finite gradient"
    gathered = [torch.empty_like(new) for _ in range(world)]
    dist.all_gather(gathered, new.contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    skipped = torch.tensor([opt.galore_stats["nonfinite_refresh_skipped"]])
    dist.all_reduce(skipped)
    assert int(skipped) == 1, int(skipped)  # counted once: on the owner
    return {"skipped_total": int(skipped)}


# ------------------------------------------------------------------ per-layer (in backward)
LW_STEPS, LW_GAP, LW_BSZ = 7, 3, 12  # refreshes at steps 0, 3, 6
LW_CLIP = {1: 0.5, 4: 0.3}  # per accumulation: clips some steps, not all (asserted)


def run_layerwise(*, steps: int, gap: int, bsz: int, accum: int, clip: float | None,
                  sync_each: bool = True, nan_at: tuple[int, int] | None = None, lr: float = 1e-2,
                  timing: str = "exact", refresh_mode: str = "owner", refresh: str = "svd"):
    """FSDP2 + FSDPLayerwiseOptimizer: updates inside backward. nan_at=(step, rank): that
    rank's targets are NaN at that step (its loss is NaN). Returns (model, opt, lw, log)
    with per-step helper-collective counts, grad norm and clip coefficient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard_model(make_model())
    opt = FSDPGaLoreAdamW(groups(model, update_proj_gap=gap, refresh=refresh), lr=lr,
                          refresh_mode=refresh_mode)
    lw = FSDPLayerwiseOptimizer(opt, accumulation_steps=accum, max_grad_norm=clip,
                                clip_norm="full" if accum == 1 else "lowrank", clip_timing=timing)
    local = bsz // world
    log = []
    for step in range(steps):
        before = COMM.total_calls()
        done = False
        for micro in range(accum):
            x, y = data(step, micro, bsz)
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            if nan_at == (step, rank):
                y = torch.full_like(y, float("nan"))
            if not sync_each:
                model.set_requires_gradient_sync(micro == accum - 1)
            (nn.functional.mse_loss(model(x), y) / accum).backward()
            done = lw.step()
        assert done, "the window did not close"
        log.append({"calls": COMM.total_calls() - before, "grad_norm": lw.grad_norm,
                    "full_grad_norm": lw.full_grad_norm, "clip_coef": lw.clip_coef})
    return model, opt, lw, log


def reference_layerwise(*, steps: int, gap: int, bsz: int, accum: int, clip: float | None,
                        lr: float = 1e-2, timing: str = "exact", refresh: str = "svd"):
    """The unsharded model on every global micro-batch, with the single-process reference
    for these settings: k=1: GaLoreAdamW(proj_type='right') after clip_grad_norm_ (norms =
    its return values); k>1 with clipping: the single-process LayerwiseOptimizer (itself tested
    against the plain optimizer); k>1 without: the plain optimizer on the k*bsz batch;
    delayed clipping: the single-process LayerwiseOptimizer too."""
    model = make_model()
    opt = GaLoreAdamW(groups(model, update_proj_gap=gap, proj_type="right", refresh=refresh), lr=lr)
    if clip is not None and (accum > 1 or timing == "delayed"):
        lw = LayerwiseOptimizer(opt, accumulation_steps=accum, max_grad_norm=clip,
                                clip_norm="full" if accum == 1 else "lowrank", clip_timing=timing)
        norms = []
        for step in range(steps):
            for micro in range(accum):
                x, y = data(step, micro, bsz)
                (nn.functional.mse_loss(model(x), y) / accum).backward()
                lw.step()
            norms.append(lw.full_grad_norm if accum == 1 else lw.grad_norm)
        return model, opt, norms
    if accum > 1:
        ref, ref_opt = reference(steps=steps, gap=gap, bsz=bsz, accum=accum, lr=lr, refresh=refresh)
        return ref, ref_opt, None
    norms = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = data(step, 0, bsz)
        nn.functional.mse_loss(model(x), y).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(
            model.parameters(), clip if clip is not None else float("inf"))))
        opt.step()
    return model, opt, norms


def case_layerwise(world: int, accum: int = 1, clip: float | None = None, sync_each: bool = True,
                   timing: str = "exact", refresh_mode: str = "owner") -> dict:
    """Per-layer FSDP (hooks inside backward) equals the single-process reference; one 2-float
    all-reduce per step, plus per refreshed matrix (3 GaLore matrices) 2 owner collectives, or
    with refresh_mode="subspace" one all-reduce per warm refresh (the first refresh is the
    owner's exact SVD). Subspace refresh is compared with its single-process equivalent, the
    core's randomized (warm subspace iteration) refresh."""
    steps, gap, bsz = LW_STEPS, LW_GAP, LW_BSZ
    refresh = "randomized" if refresh_mode == "subspace" else "svd"
    model, opt, lw, log = run_layerwise(steps=steps, gap=gap, bsz=bsz, accum=accum, clip=clip,
                                        sync_each=sync_each, timing=timing, refresh_mode=refresh_mode,
                                        refresh=refresh)
    ref, ref_opt, ref_norms = reference_layerwise(steps=steps, gap=gap, bsz=bsz, accum=accum, clip=clip,
                                                  timing=timing, refresh=refresh)
    diff = rel_diff(model, ref)
    norms = [e["full_grad_norm"] if accum == 1 else e["grad_norm"] for e in log]
    norm_diff = 0.0
    if ref_norms is not None:
        norm_diff = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
    coefs = [e["clip_coef"] for e in log]
    out = {"rel_diff": diff, "norm_rel_diff": norm_diff, "log": log,
           "refreshes": opt.galore_stats["refreshes"], "ref_refreshes": ref_opt.galore_stats["refreshes"]}
    assert diff <= TOL, f"max relative param difference {diff:.3e} > {TOL}"
    assert norm_diff <= TOL, f"grad norm relative difference {norm_diff:.3e} > {TOL}"
    refr = set(refresh_steps(steps, gap))
    assert len(refr) >= 2
    # refreshes are counted by the owner's _set_projector on every rank: 3 matrices each time
    assert opt.galore_stats["refreshes"] == ref_opt.galore_stats["refreshes"] == 3 * len(refr), out
    calls = [e["calls"] for e in log]
    first = min(refr)
    per_matrix = {s: 2 if refresh_mode == "owner" or s == first else 1 for s in refr}
    assert all(c == (1 + per_matrix[s] * 3 if s in refr else 1) for s, c in enumerate(calls)), calls
    if clip is not None:  # the threshold is chosen so that clipping is active in some steps only
        assert any(c < 1.0 for c in coefs) and any(c == 1.0 for c in coefs), coefs
    else:
        assert all(c == 1.0 for c in coefs), coefs
    assert lw.skipped_steps == 0 and lw.nonfinite_params_skipped == 0
    for p in model.parameters():
        st = opt.state[p]
        if "proj" in st:
            assert side_of(st) == "right" and st["exp_avg"].shape == (p.to_local().shape[0], 3)
    return out


def _snapshot(model: nn.Module, opt) -> list[torch.Tensor]:
    """Local weights and every optimizer state value, cloned, in a fixed order."""
    out = [p.to_local().detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for k in sorted(opt.state[p]):
            v = opt.state[p][k]
            out.append(v.clone() if torch.is_tensor(v) else torch.tensor(float(v)))
    return out


def case_layerwise_nan(world: int, accum: int = 1) -> dict:
    """NaN loss on the last rank at step 3 (a refresh step): every rank skips the whole step
    (weights, moments, projectors and step counts bit-identical), then training goes on."""
    steps, gap, bsz, bad = 5, LW_GAP, LW_BSZ, 3
    kw = dict(gap=gap, bsz=bsz, accum=accum, clip=0.05)
    model, opt, lw, _ = run_layerwise(steps=bad, **kw)
    before = _snapshot(model, opt)
    rank = dist.get_rank()
    lw_log = []
    local = bsz // world
    for step in range(bad, steps):
        for micro in range(accum):
            x, y = data(step, micro, bsz)
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            if step == bad and rank == world - 1:
                y = torch.full_like(y, float("nan"))
            (nn.functional.mse_loss(model(x), y) / accum).backward()
            lw.step()
        lw_log.append(lw.grad_norm)
        if step == bad:
            after = _snapshot(model, opt)
            same = all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
            assert same, "a skipped step changed weights or optimizer state"
            assert lw.skipped_steps == 1, lw.skipped_steps
            assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        assert torch.isfinite(p.to_local()).all()
        assert opt.state[p]["step"] == steps - 1  # the skipped step is not counted
    return {"grad_norms_after": lw_log, "skipped_steps": lw.skipped_steps}


def case_layerwise_nan_rows_immediate(world: int) -> dict:
    """Immediate mode (k=1, no clipping: updates inside the hooks) with NaN in one gradient
    element of rank 0's rows of mlp_up at a refresh step: only those rows' update is dropped;
    step counts and projectors stay equal on every rank and the next refreshes still match."""
    steps, gap, bsz, bad = 7, LW_GAP, LW_BSZ, 3
    rank = dist.get_rank()
    model = shard_model(make_model())
    opt = FSDPGaLoreAdamW(groups(model, update_proj_gap=gap), lr=1e-2)
    target = model.mlp_up.weight
    at = {"step": 0}

    def poison(p):  # registered before the optimizer's hook, so it runs first
        if at["step"] == bad and rank == 0:
            p.grad.to_local()[0, 0] = float("nan")

    target.register_post_accumulate_grad_hook(poison)
    lw = FSDPLayerwiseOptimizer(opt)
    assert not lw.deferred
    local = bsz // world
    for step in range(steps):
        at["step"] = step
        x, y = data(step, 0, bsz)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        nn.functional.mse_loss(model(x), y).backward()
        lw.step()
    for p in model.parameters():
        assert torch.isfinite(p.to_local()).all()
        assert opt.state[p]["step"] == steps
        proj = opt.state[p].get("proj")
        if proj is not None:
            gathered = [torch.empty_like(proj) for _ in range(world)]
            dist.all_gather(gathered, proj.contiguous())
            assert all(torch.equal(g, gathered[0]) for g in gathered), "projectors diverged"
    skipped = torch.tensor([lw.nonfinite_params_skipped])
    dist.all_reduce(skipped)
    assert int(skipped) == 1, int(skipped)
    return {"nonfinite_params_skipped_total": int(skipped)}


def case_layerwise_refuses_hsdp(world: int) -> dict:
    """Per-layer mode refuses HSDP (optimizer replicas, or FSDP2's own 2-D mesh) clearly."""
    if world != 4:
        return {"skipped": "needs 4 ranks"}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    errors = []
    model = shard_model(make_model(), mesh["shard"])
    opt = FSDPGaLoreAdamW(groups(model), lr=1e-2, replicate_group=mesh["replicate"].get_group())
    model2 = shard_model(make_model(), mesh)  # 2-D mesh: (Replicate, Shard(0)) placements
    opt2 = FSDPGaLoreAdamW(groups(model2), lr=1e-2)
    for o in (opt, opt2):
        try:
            FSDPLayerwiseOptimizer(o)
        except ValueError as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and all("HSDP" in e for e in errors), errors
    return {"errors": errors}


CASES = {
    "layout": case_layout,
    "owner_svd": lambda w: case_exact(w),
    "owner_svd_accum4_nosync": lambda w: case_exact(w, accum=4, steps=5, gap=2),
    "owner_svd_accum4_sync_each": lambda w: case_exact(w, accum=4, sync_each=True, steps=5, gap=2),
    "owner_randomized": lambda w: case_exact(w, refresh="randomized"),
    "subspace": lambda w: case_exact(w, refresh_mode="subspace", refresh="randomized"),
    "stagger": case_stagger,
    "owner_reproject": lambda w: case_exact(w, moments="reproject"),
    "adamw8bit_smoke": case_8bit_smoke,
    "hsdp_2x2": case_hsdp,
    "dcp_save_2": case_dcp_save,
    "dcp_load_3": case_dcp_load,
    "engine_vs_single": case_engine,
    "engine_hsdp_vs_single": lambda w: case_engine(w, replicate=2, clip=0.0),
    "nonfinite_refresh": case_nonfinite_refresh,
    "engine_layerwise_vs_single": lambda w: case_engine(w, layerwise=True),
    "layerwise_k1": lambda w: case_layerwise(w),
    "layerwise_k1_clip": lambda w: case_layerwise(w, clip=LW_CLIP[1]),
    "layerwise_k1_clip_delayed": lambda w: case_layerwise(w, clip=LW_CLIP[1], timing="delayed"),
    "layerwise_k4": lambda w: case_layerwise(w, accum=4),
    "layerwise_k4_clip": lambda w: case_layerwise(w, accum=4, clip=LW_CLIP[4]),
    "layerwise_k4_clip_nosync": lambda w: case_layerwise(w, accum=4, clip=LW_CLIP[4], sync_each=False),
    "layerwise_subspace_k1_clip": lambda w: case_layerwise(w, clip=LW_CLIP[1], refresh_mode="subspace"),
    "layerwise_subspace_k4": lambda w: case_layerwise(w, accum=4, refresh_mode="subspace"),
    "layerwise_nan_k1": lambda w: case_layerwise_nan(w),
    "layerwise_nan_k4": lambda w: case_layerwise_nan(w, accum=4),
    "layerwise_refuses_hsdp": case_layerwise_refuses_hsdp,
    "layerwise_nan_rows_immediate": case_layerwise_nan_rows_immediate,
}
CKPT_DIR = ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--ckpt", default="", help="checkpoint dir shared by the 2- and 3-rank runs")
    args = ap.parse_args()
    global CKPT_DIR
    CKPT_DIR = args.ckpt
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = args.only or list(CASES)
    results = {}
    for name in names:
        if name not in CASES:
            continue
        COMM.reset()
        t0 = time.perf_counter()
        try:
            res = CASES[name](world)
            results[name] = {"ok": True, **res}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc()[-2000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
        results[name]["helper_comm"] = COMM.snapshot()
        dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "ranks": gathered}, f, indent=1, default=str)
    exit_worker()


if __name__ == "__main__":
    main()
