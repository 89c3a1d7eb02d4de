"""Piece files for a torch optimizer (the AdamW baseline): the DeepSpeed engine's
layout-independent copy when the recipe's optimizer is not a GaLore one
(train/engines/deepspeed.py). Same file names as pieces.py (`galore_state_rank<r>.pt`), in a
form of their own: every state tensor is shaped like what the optimizer steps, so each rank
saves ranges of the flattened parameter (its ZeRO segments, or whole parameters without
ZeRO), and `load_torch_pieces` reassembles them on any world size or stage.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch

from galore_ds.optim.checkpoint.pieces import PIECES, read_pieces


def _torch_units(opt, binding) -> Iterator[tuple[str, Any, int, int, int, Any]]:
    """(name, state key, offset in the state tensors, start in the flattened parameter, elements,
    the model parameter) for every piece a torch optimizer (the AdamW baseline) steps: ZeRO
    flat partitions by segment, whole parameters by their group's param_names otherwise."""
    if binding is not None:
        for ft in binding.flats.values():
            for seg in ft.segments:
                if seg.layout is not None and seg.layout.piece is not None:
                    pc = seg.layout.piece
                    yield seg.key, ft.flat, pc.offset, pc.start, pc.numel, seg.param
        return
    for group in opt.param_groups:
        names = group.get("param_names") or [f"p{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            yield name, p, 0, 0, p.numel(), p


def save_torch_pieces(opt, binding, directory: str, rank: int) -> str:
    """`save_pieces` for a torch optimizer whose state is shaped like what it steps (AdamW):
    each segment's slice of every such state tensor, the scalars, and the weights."""
    entries = {}
    for name, key, off, start, n, _ in _torch_units(opt, binding):
        st = opt.state.get(key, {})
        flat_len = key.numel()
        state = {k: ("piece", start, v.detach().reshape(-1)[off:off + n].cpu().clone())
                 if torch.is_tensor(v) and v.numel() == flat_len else ("scalar", v) for k, v in st.items()}
        entries[name] = {"state": state, "weights": (start, key.detach().reshape(-1)[off:off + n].float().cpu().clone()),
                         "numel": n}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PIECES.format(rank=rank))
    torch.save({"entries": entries}, path)
    return path


def load_torch_pieces(opt, binding, directory: str) -> dict[str, torch.Tensor]:
    """Inverse of save_torch_pieces on any layout; returns every whole parameter (flattened)."""
    files = read_pieces(directory)
    whole: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for f in files:
        for name, e in f.items():
            start, w = e["weights"]
            size = max(start + w.numel(), whole.get(name, torch.zeros(0)).numel())
            buf = whole.setdefault(name, torch.zeros(size))
            if buf.numel() < size:
                buf = whole[name] = torch.cat([buf, torch.zeros(size - buf.numel())])
            buf[start:start + w.numel()] = w
            for k, v in e["state"].items():
                if v[0] == "scalar":
                    scalars.setdefault(name, {})[k] = v[1]
                else:
                    t = states.setdefault(name, {}).setdefault(k, torch.zeros(0, dtype=v[2].dtype))
                    if t.numel() < v[1] + v[2].numel():
                        t = states[name][k] = torch.cat([t, torch.zeros(v[1] + v[2].numel() - t.numel(), dtype=t.dtype)])
                    t[v[1]:v[1] + v[2].numel()] = v[2]
    for name, key, off, start, n, _ in _torch_units(opt, binding):
        key.data.reshape(-1)[off:off + n].copy_(whole[name][start:start + n].to(key.dtype))
        if name in states or name in scalars:
            st = opt.state.setdefault(key, {})
            for k, v in scalars.get(name, {}).items():
                st[k] = v.clone() if torch.is_tensor(v) else v
            for k, v in states.get(name, {}).items():
                if k not in st or not torch.is_tensor(st[k]) or st[k].numel() != key.numel():
                    st[k] = torch.zeros(key.numel(), dtype=v.dtype, device=key.device).reshape(key.shape)
                st[k].reshape(-1)[off:off + n].copy_(v[start:start + n])
    return whole


__all__ = ["save_torch_pieces", "load_torch_pieces"]
