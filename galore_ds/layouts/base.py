"""How one rank holds one parameter: the `Layout` every GaLore optimizer step reads.

A layout names the block of the (global) parameter this rank holds and who holds the rest:

  shape        the parameter's global shape
  rows, cols   the block [r0, r1) x [c0, c1) of a matrix (1-D: rows = the elements held)
  group        the process group across which the blocks are split (None: whole here)
  split_dim    0 (row blocks: FSDP2 Shard(0), ZeRO partitions) or 1 (column blocks:
               Shard(1)); None when whole
  counts       elements each rank of `group` holds, in rank order; the pieces are contiguous
               in the row-major order of the matrix (split_dim 0) or of its transpose (1)
  piece        ZeRO flat partitions: the element range [start, end) held, which may begin or
               end inside a row ("partial rows"); None for whole rows/columns
  reduce_group the gradient is this rank's own contribution, not yet averaged across these
               ranks (replicated data parallelism that sends low-rank gradients, HSDP
               replicas); the optimizer averages what it consumes
  replica_group the parameter and its gradient are whole and identical on these ranks
               (DeepSpeed ZeRO-0, DDP): the refresh runs once, on an owner

What a layout costs per step, and why (counted in tests/dist):
- right projection (R = G Q^T contracts columns): local when columns are whole (row blocks);
  column blocks give partial sums of every row: ONE all-reduce of m x r per matrix (packed
  with the step's other such tensors); a ZeRO partition boundary that cuts a row makes that
  row's R partial on two ranks: ONE all-reduce of (cut rows x r) per flat tensor.
- left projection (R = P^T G contracts rows): local when rows are whole (column blocks); row
  blocks give partial sums: ONE all-reduce of r x n per matrix (packed).
- reduce_group: ONE all-reduce of every projected gradient (and of the full gradients of the
  other parameters) per step: n/r less traffic than averaging G.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from galore_ds.core.groups import global_shape
from galore_ds.layouts.comm import group_rank_size


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of a DTensor (an FSDP2 shard); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class FlatPiece:
    """Where a ZeRO partition keeps a parameter: elements [start, end) of the flattened
    parameter, at `offset` in this rank's flat fp32 tensor."""

    flat: torch.Tensor        # this rank's flat fp32 partition (the tensor the optimizer steps)
    offset: int
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class Layout:
    shape: tuple[int, ...]
    rows: tuple[int, int]
    cols: tuple[int, int] = (0, 1)
    group: Any = None
    split_dim: int | None = None
    counts: list[int] | None = None
    piece: FlatPiece | None = None
    reduce_group: Any = None
    replica_group: Any = None
    split_rows: list[int] = field(default_factory=list)  # rows cut by any rank's piece boundary
    # ranks whose blocks are disjoint parts of this parameter, summed for norms; defaults to
    # `group` (a ZeRO matrix held whole by one rank sets it while `group` is None)
    sum_group: Any = None

    @property
    def norm_group(self) -> Any:
        return self.sum_group if self.sum_group is not None else self.group

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rank_in_group(self) -> int:
        return group_rank_size(self.group)[0]

    def contracted_whole(self, right: bool) -> bool:
        """Whether projecting on `right` (contracting columns) or left (rows) is local."""
        if self.group is None:
            return True
        if right:
            return self.split_dim == 0 and not self.split_rows
        return self.split_dim == 1

    # ------------------------------------------------------------------ local views
    def local(self, p: torch.Tensor, grad: torch.Tensor | None, rows_needed: bool = False):
        """(param view, grad view, write-back or None) of the block this rank holds.

        Whole rows/columns: views (updates land in place). A ZeRO piece as 2-D rows (GaLore
        matrices, and any matrix when `rows_needed`): a zero-padded copy of the rows it
        touches and a function writing the piece back; otherwise its flat 1-D range."""
        if self.piece is None:
            return local_tensor(p), None if grad is None else local_tensor(grad), None
        pc = self.piece
        flat_p = pc.flat.data[pc.offset:pc.offset + pc.numel]
        flat_g = None if grad is None else grad[pc.offset:pc.offset + pc.numel]
        if not (self.is_matrix and rows_needed):
            return flat_p, flat_g, None
        n = self.shape[1]
        if pc.numel == 0:
            return flat_p.view(0, n), None if flat_g is None else flat_g.view(0, n), None
        r0, r1 = self.rows
        if pc.start == r0 * n and pc.end == r1 * n:
            return flat_p.view(r1 - r0, n), None if flat_g is None else flat_g.view(r1 - r0, n), None
        a = pc.start - r0 * n
        padded_p = flat_p.new_zeros((r1 - r0) * n)
        padded_p[a:a + pc.numel] = flat_p
        padded_g = None
        if flat_g is not None:
            padded_g = flat_g.new_zeros((r1 - r0) * n)
            padded_g[a:a + pc.numel] = flat_g

        def write_back() -> None:
            flat_p.copy_(padded_p[a:a + pc.numel])
        return padded_p.view(r1 - r0, n), None if padded_g is None else padded_g.view(r1 - r0, n), write_back

    def owned_rows(self) -> slice:
        """Rows of the local block this rank counts: a row a partition boundary cuts is counted
        by the rank holding its first element."""
        if self.piece is None or not self.is_matrix or self.piece.numel == 0:
            return slice(None)
        return slice(1 if self.piece.start % self.shape[1] else 0, None)

    def own_sq(self, p: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the parameter elements this rank holds (disjoint across `group`)."""
        if self.piece is not None:
            pc = self.piece
            t = pc.flat.data[pc.offset:pc.offset + pc.numel]
        else:
            t = local_tensor(p)
        return torch.linalg.vector_norm(t, dtype=torch.float32).square()

    def gather_piece(self, grad_local: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the gradient as a contiguous range of the matrix's row-major
        order (split_dim 0, pieces) or of its transpose (split_dim 1)."""
        if self.split_dim == 1:
            return grad_local.t().contiguous()
        return grad_local.reshape(-1)


def plain_layout(p: torch.Tensor, reduce_group: Any = None, replica_group: Any = None) -> Layout:
    """A whole tensor on this rank (one process; DDP, where every rank holds all of it)."""
    shape = global_shape(p)
    rows = (0, shape[0]) if shape else (0, 1)
    cols = (0, shape[1]) if len(shape) == 2 else (0, 1)
    return Layout(shape, rows, cols, reduce_group=reduce_group, replica_group=replica_group)


__all__ = ["Layout", "FlatPiece", "plain_layout", "local_tensor"]
