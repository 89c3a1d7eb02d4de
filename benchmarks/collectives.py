"""Count every torch.distributed collective called inside a block, with its payload: the
independent check that tests and benchmarks hold galore_ds's own accounting (COMM, recorded
where galore_ds issues each collective) and the byte model against.

This wraps torch.distributed's module-level functions for the duration of the block, which is
why it lives here and not in the package: training never runs inside it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist

from galore_ds.layouts.comm import CommCounter

# torch.distributed entry points counted by `count_collectives` (the ones present are wrapped),
# with the position of the tensor (or list of tensors) this rank hands over to be sent.
_COLLECTIVES = {
    "all_reduce": 0, "reduce": 0, "broadcast": 0, "send": 0, "isend": 0, "all_gather": 1,
    "all_gather_into_tensor": 1, "_all_gather_base": 1, "all_gather_single": 1, "reduce_scatter": 1,
    "reduce_scatter_tensor": 1, "_reduce_scatter_base": 1, "reduce_scatter_single": 1,
    "all_to_all": 1, "all_to_all_single": 1, "gather": 0, "scatter": 1, "all_gather_object": 1,
    "broadcast_object_list": 0, "recv": None, "irecv": None, "barrier": None, "batch_isend_irecv": None,
}
_PAYLOAD_NAMES = ("tensor", "input_tensor", "input", "input_tensor_list", "tensor_list", "object_list", "obj")


def _payload_bytes(position: int | None, args: tuple, kwargs: dict) -> int:
    """Bytes of the tensor(s) a collective call hands over to be sent (objects: 0)."""
    if position is None:
        return 0
    value = args[position] if position < len(args) else next(
        (kwargs[k] for k in _PAYLOAD_NAMES if k in kwargs), None)
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def count_collectives() -> Iterator[CommCounter]:
    """Count every torch.distributed collective called (by anyone) inside the body, with the
    bytes of the tensors handed to it to send (the payload, once: a ring all-reduce moves
    about 2(W-1)/W of it per rank).

    torch.distributed offers no hook on its collectives, so this wraps its module-level
    functions for the duration of the body, seeing calls made through `dist.X` /
    `torch.distributed.X` (galore_ds's, FSDP2's, DeepSpeed's torch backend, a DDP comm hook's; DDP's own C++ reducer is not
    seen). Not thread-safe. For DTensor-implicit collectives use CommDebugMode as well.
    """
    counter = CommCounter()
    saved = {}
    for name, position in _COLLECTIVES.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrap(fn=fn, name=name, position=position):
            @functools.wraps(fn)
            def counted(*args, **kwargs):
                counter.record(name, _payload_bytes(position, args, kwargs))
                return fn(*args, **kwargs)
            return counted

        setattr(dist, name, wrap())
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


__all__ = ["count_collectives"]
