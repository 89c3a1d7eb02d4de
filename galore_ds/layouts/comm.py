"""The collectives every layout shares: owner assignment, gather to owners, share from
owners, packed all-reduces, and the counters that record them.

Refresh pieces:

- `assign_owners`: which rank computes which matrix's SVD (LPT: largest cost first, each
  to the least-loaded rank; ties go to the lowest rank, so every rank gets the same answer
  without talking).
- `chunk_rows` / `flat_counts`: how a matrix is split over ranks (FSDP2 Shard(0) uses
  torch.chunk: ceil(m / W) rows each, the tail short or empty: 10 rows on 4 ranks = 3,3,3,1).
- `gather_to_owners`: ONE all_to_all_single moves every rank's piece of every due matrix
  to that matrix's owner. Pieces are contiguous row-major element ranges (a row block is
  one; a ZeRO flat range with partial rows is one too), any size including 0.
- `share_from_owners`: ONE all_gather_single (all_gather_into_tensor) of padded flat
  buffers gives every rank every new projector; a per-matrix flag says when an owner had
  nothing to share (SVD failed, non-finite gradient: everybody keeps the old projector).
- `reduce_to_owners`: ONE reduce_scatter gives each owner the SUM over ranks of its matrices
  (gradients that are per-rank contributions, as replicated data parallelism leaves them).
Step pieces:
- `all_reduce_packed`: every tensor bound for the same process group in ONE all_reduce.
- `CommCounter` / `COMM`: every collective galore_ds issues is recorded where it is issued
  (these helpers, the comm hook, the per-layer buckets, the engines' loss mean); the train
  loop's `comm_bytes` reads it. (benchmarks/collectives.py counts every torch.distributed call
  independently, for tests and benchmarks only: it wraps torch's functions.)

Every function here is called by every rank of `group` with the same job list, including
ranks whose pieces are empty: each is exactly one collective, or none when W == 1.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "svd_cost", "assign_owners", "chunk_rows", "flat_counts", "gather_to_owners",
    "reduce_to_owners", "share_from_owners", "all_reduce_packed", "max_over_groups", "CommCounter", "COMM",
    "group_rank_size",
]


# --------------------------------------------------------------------------- ownership
def svd_cost(shape: Sequence[int]) -> float:
    """Cost model of a full SVD of an m x n matrix: m * n * min(m, n)."""
    m, n = int(shape[0]), int(shape[1])
    return float(m) * float(n) * float(min(m, n))


def assign_owners(costs: Sequence[float], world_size: int,
                  counts: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Owner rank of each job, the same on every rank without talking.

    A rank that holds a job's whole matrix (counts[j][r] == sum(counts[j])) owns it: nothing
    has to move. The others go LPT: by decreasing cost (ties: lower index first), each to the
    least-loaded rank (ties: lower rank) among those holding part of it (all ranks when
    `counts` is None or nobody holds any): the owner then has the previous projector too.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    load = [0.0] * world_size
    owners = [-1] * len(costs)
    if counts is not None:
        for j, cnt in enumerate(counts):
            total = sum(cnt)
            whole = [r for r in range(world_size) if total and cnt[r] == total]
            if len(whole) == 1:
                owners[j] = whole[0]
                load[whole[0]] += float(costs[j])
    for j in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        if owners[j] >= 0:
            continue
        holders = [r for r in range(world_size) if counts is not None and counts[j][r] > 0]
        r = min(holders or range(world_size), key=lambda k: (load[k], k))
        owners[j] = r
        load[r] += float(costs[j])
    return owners


def chunk_rows(m: int, world_size: int) -> list[int]:
    """Rows per rank of torch.chunk / FSDP2 Shard(0): ceil(m/W) each, tail short or empty."""
    c = -(-m // world_size) if m > 0 else 0
    return [max(0, min(c, m - r * c)) for r in range(world_size)]


def flat_counts(shape: Sequence[int], rows: Sequence[int]) -> list[int]:
    """Element counts of row blocks of a 2-D matrix."""
    n = int(shape[1])
    return [int(k) * n for k in rows]


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    """The default-group rank of `group`'s rank `rank` (what dist.reduce / broadcast take)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


# --------------------------------------------------------------------------- counting
@dataclass
class CommCounter:
    """What the GaLore helpers sent: calls and bytes per op name (this process)."""

    calls: dict = field(default_factory=lambda: defaultdict(int))
    bytes: dict = field(default_factory=lambda: defaultdict(int))

    def record(self, op: str, nbytes: int) -> None:
        """One collective `op` that sent `nbytes` from this rank (payload, once)."""
        self.calls[op] += 1
        self.bytes[op] += int(nbytes)

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}


#: process-wide counter the helpers write to
COMM = CommCounter()

# --------------------------------------------------------------------------- gather
def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def gather_to_owners(
    pieces: Sequence[torch.Tensor],
    counts: Sequence[Sequence[int]],
    owners: Sequence[int],
    shapes: Sequence[Sequence[int]],
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = COMM,
) -> list[torch.Tensor | None]:
    """Full matrix j on rank owners[j] (None elsewhere), in ONE all_to_all_single.

    pieces[j]: this rank's contiguous row-major piece of matrix j (any shape; numel must
      equal counts[j][my_rank]; may be empty).
    counts[j][r]: elements of matrix j held by rank r; rank-ordered pieces concatenate to
      the whole matrix (sum == prod(shapes[j])).
    Every rank must call this with the same counts/owners/shapes (they are derived from
    global shapes, so no exchange is needed). Result dtype: the pieces' dtype when they
    agree, else float32.
    """
    rank, world = group_rank_size(group)
    njobs = len(pieces)
    if not (len(counts) == len(owners) == len(shapes) == njobs):
        raise ValueError("gather_to_owners: pieces, counts, owners and shapes differ in length")
    for j in range(njobs):
        if len(counts[j]) != world:
            raise ValueError(f"gather_to_owners: counts[{j}] has {len(counts[j])} ranks, world is {world}")
        full = 1
        for s in shapes[j]:
            full *= int(s)
        if sum(counts[j]) != full:
            raise ValueError(f"gather_to_owners: counts[{j}] sum {sum(counts[j])} != numel {full}")
        if pieces[j].numel() != counts[j][rank]:
            raise ValueError(
                f"gather_to_owners: rank {rank} piece {j} has {pieces[j].numel()} elements, "
                f"counts say {counts[j][rank]}"
            )
    if njobs == 0:
        return []
    dtype = _common_dtype(pieces)
    device = pieces[0].device
    if world == 1:
        return [pieces[j].reshape(tuple(shapes[j])).to(dtype) for j in range(njobs)]

    # send buffer: grouped by destination rank, jobs in index order within each
    send_split = [0] * world
    send_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for j in range(njobs):
        o = owners[j]
        send_split[o] += counts[j][rank]
        if counts[j][rank]:
            send_parts[o].append(pieces[j].reshape(-1).to(dtype))
    flat = [p for parts in send_parts for p in parts]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    # receive: for my matrices, every rank's piece, grouped by source rank
    mine = [j for j in range(njobs) if owners[j] == rank]
    recv_split = [sum(counts[j][src] for j in mine) for src in range(world)]
    recv = torch.empty(sum(recv_split), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_split, send_split, group=group)
    if counter is not None:  # bytes leaving this rank (its own rows stay local)
        counter.record("gather_to_owners", (send.numel() - send_split[rank]) * send.element_size())

    out: list[torch.Tensor | None] = [None] * njobs
    src_chunks = torch.split(recv, recv_split)
    pos = [0] * world
    parts: dict[int, list[torch.Tensor]] = {j: [] for j in mine}
    for src in range(world):
        for j in mine:
            k = counts[j][src]
            parts[j].append(src_chunks[src][pos[src]:pos[src] + k])
            pos[src] += k
    for j in mine:
        out[j] = torch.cat(parts[j]).reshape(tuple(shapes[j]))
    return out


# --------------------------------------------------------------------------- share
def share_from_owners(
    tensors: Sequence[torch.Tensor | None],
    shapes: Sequence[Sequence[int]],
    owners: Sequence[int],
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    counter: CommCounter | None = COMM,
) -> list[torch.Tensor | None]:
    """Every rank gets tensor j from rank owners[j], in ONE all_gather_single.

    On the owner, tensors[j] is the value (shape shapes[j]) or None ("nothing new": every
    rank then gets None for j). Other ranks' tensors[j] are ignored. Each rank packs
    [one flag per owned job | owned values, flattened] padded to the largest rank's size.
    """
    rank, world = group_rank_size(group)
    njobs = len(shapes)
    if world == 1:
        return [None if t is None else t.to(dtype) for t in tensors]
    numel = []
    for s in shapes:
        k = 1
        for d in s:
            k *= int(d)
        numel.append(k)
    by_rank = [[j for j in range(njobs) if owners[j] == r] for r in range(world)]
    sizes = [len(js) + sum(numel[j] for j in js) for js in by_rank]
    width = max(sizes) if sizes else 0
    if width == 0:
        return [None] * njobs
    if len({owners[j] for j in range(njobs)}) == 1:
        # one owner (a per-layer refresh of one matrix): a broadcast of its row, not a gather
        # of every rank's padded one
        width = sizes[owners[0]]
    mine = by_rank[rank]
    buf = torch.zeros(width, dtype=dtype, device=device)
    off = len(mine)
    for i, j in enumerate(mine):
        t = tensors[j]
        if t is not None:
            if t.numel() != numel[j]:
                raise ValueError(
                    f"share_from_owners: job {j} has {t.numel()} elements, shape says {numel[j]}")
            buf[i] = 1.0
            buf[off:off + numel[j]] = t.reshape(-1).to(dtype)
        off += numel[j]
    if len({owners[j] for j in range(njobs)}) == 1:
        dist.broadcast(buf, src=global_rank(group, owners[0]), group=group)
        if counter is not None:
            counter.record("share_from_owners", buf.numel() * buf.element_size())
        out_buf = torch.zeros(world * width, dtype=dtype, device=device)
        out_buf[owners[0] * width:(owners[0] + 1) * width] = buf
    else:
        out_buf = torch.empty(world * width, dtype=dtype, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out_buf, buf, group=group)
        if counter is not None:
            counter.record("share_from_owners", buf.numel() * buf.element_size())

    out: list[torch.Tensor | None] = [None] * njobs
    for r in range(world):
        row = out_buf[r * width:(r + 1) * width]
        off = len(by_rank[r])
        for i, j in enumerate(by_rank[r]):
            if row[i].item() != 0.0:
                out[j] = row[off:off + numel[j]].reshape(tuple(shapes[j])).clone()
            off += numel[j]
    return out


# --------------------------------------------------------------------------- reduce
def reduce_to_owners(
    tensors: Sequence[torch.Tensor],
    owners: Sequence[int],
    group: dist.ProcessGroup | None = None,
    counter: CommCounter | None = COMM,
) -> list[torch.Tensor | None]:
    """The sum over ranks of tensor j on rank owners[j] (None elsewhere), in ONE
    reduce_scatter: each rank packs its tensors by owner, padded to the largest owner's
    share. Every rank passes tensors of the same shapes."""
    rank, world = group_rank_size(group)
    if world == 1 or not tensors:
        return [t.float() for t in tensors] if world == 1 else []
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    if len(set(owners)) == 1:
        # one owner (a per-layer refresh of one matrix): a reduce to it sends each tensor once,
        # where the reduce_scatter below would send world padded copies
        packed = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.reduce(packed, dst=global_rank(group, owners[0]), group=group)
        if counter is not None:
            counter.record("reduce_to_owners", packed.numel() * packed.element_size())
        if rank != owners[0]:
            return [None] * len(tensors)
        out, off = [], 0
        for t in tensors:
            out.append(packed[off:off + t.numel()].reshape(t.shape))
            off += t.numel()
        return out
    by_rank = [[j for j in range(len(tensors)) if owners[j] == r] for r in range(world)]
    width = max(sum(tensors[j].numel() for j in js) for js in by_rank)
    send = torch.zeros(world, width, dtype=dtype, device=device)
    for r, js in enumerate(by_rank):
        off = 0
        for j in js:
            n = tensors[j].numel()
            send[r, off:off + n] = tensors[j].reshape(-1).to(dtype)
            off += n
    recv = torch.empty(width, dtype=dtype, device=device)
    dist.reduce_scatter_tensor(recv, send.reshape(-1), group=group)
    if counter is not None:
        counter.record("reduce_to_owners", send.numel() * send.element_size())
    out: list[torch.Tensor | None] = [None] * len(tensors)
    off = 0
    for j in by_rank[rank]:
        n = tensors[j].numel()
        out[j] = recv[off:off + n].reshape(tensors[j].shape).clone()
        off += n
    return out


def max_over_groups(flag: torch.Tensor, groups: Iterable[dist.ProcessGroup | None], name: str) -> torch.Tensor:
    """`flag` (one element, in place) made its maximum over every group of more than one rank,
    each group once in first-seen order: a verdict all of their ranks share, so that none acts
    on it alone. One all-reduce per group, recorded as `name`."""
    for group in {id(g): g for g in groups if group_rank_size(g)[1] > 1}.values():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        COMM.record(name, flag.numel() * flag.element_size())
    return flag


def all_reduce_packed(
    requests: Sequence[tuple[torch.Tensor, dist.ProcessGroup | None]],
    op: str = "sum",
    name: str = "all_reduce",
    counter: CommCounter | None = COMM,
) -> list[torch.Tensor]:
    """Sum (or average, op="avg") each tensor over the ranks of its group: ONE all_reduce per
    distinct group, in the order the groups first appear (the same on every rank, since every
    rank passes the same request list). Tensors with group None come back as they are.
    Results are fp32 (fp64 where a request is), shaped like the requests."""
    out: list[torch.Tensor | None] = [None] * len(requests)
    by_group: dict[int, list[int]] = {}
    groups: dict[int, dist.ProcessGroup] = {}
    for i, (t, g) in enumerate(requests):
        if g is None or group_rank_size(g)[1] == 1:
            out[i] = t if t.dtype == torch.float64 else t.float()
            continue
        by_group.setdefault(id(g), []).append(i)
        groups[id(g)] = g
    for key, idx in by_group.items():
        g = groups[key]
        wide = any(requests[i][0].dtype == torch.float64 for i in idx)
        flat = torch.cat([requests[i][0].reshape(-1).to(torch.float64 if wide else torch.float32) for i in idx])
        dist.all_reduce(flat, group=g)
        if counter is not None:
            counter.record(name, flat.numel() * flat.element_size())
        if op == "avg":
            flat.div_(group_rank_size(g)[1])
        for i, part in zip(idx, torch.split(flat, [requests[i][0].numel() for i in idx])):
            out[i] = part.reshape(requests[i][0].shape)
    return out  # type: ignore[return-value]
