"""The projector refresh on any layout: one owner routine, one distributed subspace iteration.

Every rank calls `refresh` with the same due matrices in the same order (refresh steps depend
only on step counts), so every collective below matches across ranks.

Owner refresh (exact SVD, and randomized refresh where the Gram products cannot be formed
locally): each matrix gets an owner (comm.assign_owners: a rank holding all of it, else LPT
among its holders); the owner receives the whole gradient in ONE collective for all due
matrices (gather_to_owners for blocks; reduce_to_owners for per-rank contributions, which it
sums), computes the basis once in the world, and ONE all_gather shares every new projector.

Subspace refresh (refresh="randomized", when the Gram operator A X = G^T (G X) of the
`to_right` view is a sum over ranks): every due matrix's program (core/projector.py) runs in
lockstep and each round of Gram products is ONE packed all-reduce; every rank computes the
same basis and nothing is shared. Row blocks of the `to_right` view: A X = sum_i G_i^T (G_i X).
Per-rank contributions G = mean_w G_w (replicated data parallelism): two all-reduces per
round, Y = mean_w G_w X (m x k) then A X = mean_w G_w^T Y (n x k).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from galore_ds.core import projector as pj
from galore_ds.layouts.comm import (
    all_reduce_packed,
    assign_owners,
    gather_to_owners,
    group_rank_size,
    reduce_to_owners,
    share_from_owners,
    svd_cost,
)
from galore_ds.optim.entry import Entry

# compute(entry, full_gradient) -> basis rows or None (non-finite gradient, failed SVD)
Compute = Callable[[Entry, torch.Tensor], "torch.Tensor | None"]
# install(entry, basis or None) -> None
Install = Callable[[Entry, "torch.Tensor | None"], None]


def _basis_dims(e: Entry) -> tuple[int, int]:
    m, n = e.layout.shape
    return e.group["rank"], (n if e.side == "right" else m)


def _subspace_ok(e: Entry) -> bool:
    """Whether the Gram products of this matrix's refresh are sums over ranks."""
    if e.group["refresh"] != "randomized":
        return False
    lay = e.layout
    if lay.group is None:
        return lay.reduce_group is not None
    rows_of_view = (e.side == "right" and lay.split_dim == 0) or (e.side == "left" and lay.split_dim == 1)
    return rows_of_view and not lay.split_rows and lay.reduce_group is None


def refresh(entries: list[Entry], compute: Compute, install: Install, prev_basis, program_for) -> None:
    """Refresh every due matrix in `entries` (see the module docstring).

    compute: the basis from a whole gradient (the optimizer's own method and sign rule);
    install: put a basis (or None: keep the old one) into the state; prev_basis(entry) and
    program_for(entry) give a matrix's previous basis and its randomized program."""
    local, by_kind = [], {}
    for e in entries:
        lay = e.layout
        if lay.group is None and lay.reduce_group is None and lay.replica_group is None:
            local.append(e)
            continue
        if lay.group is not None and lay.reduce_group is not None:
            kind = "split_partial"
        elif lay.group is not None:
            kind = "split"
        elif lay.reduce_group is not None:
            kind = "partial"
        else:
            kind = "replica"
        group = lay.group if lay.group is not None else (lay.reduce_group if kind == "partial" else lay.replica_group)
        sub = "subspace" if _subspace_ok(e) else "owner"
        by_kind.setdefault((kind, sub, id(group)), (group, []))[1].append(e)
    for e in local:
        install(e, compute(e, e.g_local))
    for (kind, sub, _), (group, es) in by_kind.items():
        if kind == "split_partial":
            _average_over_replicas(es)
        if sub == "subspace":
            _subspace(es, group, kind == "partial", compute, install, prev_basis, program_for)
        elif kind == "partial":
            _owner_from_contributions(es, group, compute, install)
        else:
            _owner(es, group, kind == "replica", compute, install)


def _average_over_replicas(entries: list[Entry]) -> None:
    """Due matrices whose blocks are per-replica contributions (HSDP with low-rank replica
    reduction): average the blocks over the replicas first (ONE all-reduce)."""
    avg = all_reduce_packed([(e.g_local, e.layout.reduce_group) for e in entries], op="avg",
                            name="refresh_replica_grad")
    for e, g in zip(entries, avg):
        e.g_local = g.to(e.g_local.dtype)
        e.g_piece = None


def _owners(entries: list[Entry], costs: list[float], world: int) -> list[int]:
    """Each replicated matrix's own owner (optimizer.replicated_owner: balanced over all
    matrices, so one-at-a-time refreshes spread too), else LPT over these jobs."""
    if all(e.owner is not None for e in entries):
        return [e.owner for e in entries]
    return assign_owners(costs, world)


def _owner(entries: list[Entry], group, replicated: bool, compute: Compute, install: Install) -> None:
    rank, world = group_rank_size(group)
    shapes = [e.layout.shape for e in entries]
    costs = [svd_cost(s) for s in shapes]
    if replicated:
        counts = None
        owners = _owners(entries, costs, world)
        fulls = [e.g_local if owners[j] == rank else None for j, e in enumerate(entries)]
    else:
        counts = [e.layout.counts for e in entries]
        owners = assign_owners(costs, world, counts)
        if any(counts[j][owners[j]] != sum(counts[j]) for j in range(len(entries))):
            gathered = [(e.layout.shape if e.layout.split_dim != 1 else e.layout.shape[::-1]) for e in entries]
            fulls = gather_to_owners([e.raw_grad() for e in entries], counts, owners, gathered, group=group)
            fulls = [None if f is None else (f.t() if e.layout.split_dim == 1 else f)
                     for e, f in zip(entries, fulls)]
        else:  # every owner holds its whole matrix (ZeRO interior matrices): nothing moves
            fulls = [e.raw_grad().reshape(e.layout.shape) if owners[j] == rank else None
                     for j, e in enumerate(entries)]
    bases = [compute(e, f) if f is not None else None for e, f in zip(entries, fulls)]
    shared = share_from_owners(bases, [_basis_dims(e) for e in entries], owners, group=group,
                               device=entries[0].p_local.device)
    for e, b in zip(entries, shared):
        install(e, b)


def _owner_from_contributions(entries: list[Entry], group, compute: Compute, install: Install) -> None:
    """Per-rank contributions: the owner receives their sum (ONE reduce_scatter), averages."""
    rank, world = group_rank_size(group)
    owners = _owners(entries, [svd_cost(e.layout.shape) for e in entries], world)
    sums = reduce_to_owners([e.g_local for e in entries], owners, group=group)
    bases = [compute(e, s.div_(world).float()) if s is not None else None for e, s in zip(entries, sums)]
    shared = share_from_owners(bases, [_basis_dims(e) for e in entries], owners, group=group,
                               device=entries[0].p_local.device)
    for e, b in zip(entries, shared):
        install(e, b)


def _subspace(entries: list[Entry], group, contributions: bool, compute: Compute, install: Install,
              prev_basis, program_for) -> None:
    """All due matrices' randomized programs in lockstep, one packed all-reduce per round
    (two for per-rank contributions)."""
    views = [pj.to_right(e.g_local, e.side) for e in entries]
    views = [v if v.dtype == torch.float64 else v.float() for v in views]
    programs: dict[int, Any] = {}
    requests: dict[int, torch.Tensor] = {}
    bases: dict[int, torch.Tensor | None] = {}
    for j, e in enumerate(entries):
        programs[j] = program_for(e)
        requests[j] = next(programs[j])
    while requests:
        live = sorted(requests)
        if contributions:
            ys = all_reduce_packed([(views[j] @ requests[j].to(views[j].dtype), group) for j in live], op="avg",
                                   name="subspace_gram")
            zs = all_reduce_packed([(views[j].t() @ y, group) for j, y in zip(live, ys)], op="avg",
                                   name="subspace_gram")
        else:
            zs = all_reduce_packed([(views[j].t() @ (views[j] @ requests[j].to(views[j].dtype)), group)
                                    for j in live], name="subspace_gram")
        for j, z in zip(live, zs):
            z = z.float()
            try:
                requests[j] = programs[j].send(z)
            except StopIteration as done:
                del requests[j]
                bases[j] = done.value
            except RuntimeError:  # a QR/eigh that failed on a degenerate operator
                del requests[j]
                bases[j] = None
    for j, e in enumerate(entries):
        basis = bases[j]
        if basis is not None:
            basis = pj.finish_basis(basis, prev_basis(e), e.group["signs"])
            if not bool(torch.isfinite(basis).all()):
                basis = None
        install(e, basis)


__all__ = ["refresh"]
