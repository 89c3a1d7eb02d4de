"""Layouts read from a DTensor's placements (FSDP2 fully_shard, HSDP, torchtitan, Accelerate).

As microsoft/dion does, the placements decide: each mesh dimension is Replicate() (replicas
hold the same block: HSDP's replicate dimension; FSDP2 has already averaged their gradients)
or Shard(d) (blocks split by torch.chunk: ceil(N/W) each, the tail short or empty). One
sharded mesh dimension, Shard(0) or Shard(1), is exact and cheap (see layouts/base.py for
the cost of each side); anything else is refused with one line, never run differently:
_StridedShard (FSDP2 over tensor parallelism), a tensor sharded over two mesh dimensions, a
Partial parameter.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_ds.layouts.base import Layout
from galore_ds.layouts.comm import chunk_rows


def is_dtensor(p: Any) -> bool:
    return hasattr(p, "placements") and hasattr(p, "device_mesh")


def dtensor_layout(p: torch.Tensor, reduce_group: Any = None) -> Layout:
    """The layout of DTensor parameter `p` on this rank (see the module docstring)."""
    from torch.distributed.tensor import Replicate, Shard

    shape = tuple(p.shape)
    sharded: list[tuple[int, int]] = []  # (mesh dim, tensor dim)
    for mesh_dim, pl in enumerate(p.placements):
        if type(pl) is Shard:
            sharded.append((mesh_dim, pl.dim))
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(
                f"GaLore on a DTensor placed {pl!r} (placements {tuple(p.placements)}): only Shard(0), "
                "Shard(1) and Replicate() give an exact step; reshard it (e.g. fully_shard on a "
                "1-D or (replicate, shard) mesh without tensor parallelism)")
    rows = (0, shape[0]) if shape else (0, 1)
    cols = (0, shape[1]) if len(shape) == 2 else (0, 1)
    if not sharded:
        return Layout(shape, rows, cols, reduce_group=reduce_group)
    if len(sharded) > 1:
        raise NotImplementedError(
            f"GaLore on a DTensor sharded over {len(sharded)} mesh dimensions (placements "
            f"{tuple(p.placements)}): shard each parameter over one mesh dimension")
    mesh_dim, dim = sharded[0]
    if dim not in (0, 1) or (dim == 1 and len(shape) != 2):
        raise NotImplementedError(f"GaLore on a DTensor Shard({dim}) of shape {shape}: use Shard(0) or Shard(1)")
    mesh = p.device_mesh
    world, me = mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
    if world == 1:
        return Layout(shape, rows, cols, reduce_group=reduce_group)
    sizes = chunk_rows(shape[dim], world)
    lo = sum(sizes[:me])
    span = (lo, lo + sizes[me])
    other = shape[1 - dim] if len(shape) == 2 else 1
    local = tuple(p.to_local().shape)
    if local[dim] != sizes[me]:
        raise NotImplementedError(
            f"GaLore: this rank's DTensor block of a {shape} parameter has {local[dim]} entries on "
            f"dim {dim}, torch.chunk would give {sizes[me]}; only torch.chunk splits are supported")
    if dim == 0:
        rows = span
    else:
        cols = span
    return Layout(shape, rows, cols, group=mesh.get_group(mesh_dim), split_dim=dim,
                  counts=[s * other for s in sizes], reduce_group=reduce_group)


__all__ = ["dtensor_layout", "is_dtensor"]
