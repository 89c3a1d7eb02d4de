"""Piece files: the GaLore optimizers' state on any layout, DeepSpeed ZeRO's arbitrary ranges
of flat partitions included, as one file per rank that loads on any world size or ZeRO stage.
The DeepSpeed engine (train/engines/deepspeed.py) writes them with every checkpoint and
loads them when the world size or stage changed (`load_elsewhere`).

`save_pieces` writes `galore_state_rank<r>.pt`: every state tensor as a piece of its logical
tensor (places.py), and the fp32 weights the optimizer steps as a range of the flattened
parameter, keyed by parameter name. A quantized rule's codes (GaLoreAdamW8bit) are kept as
they are with where the rank's moment block lies (a `places.Place`, so those files need
torch.load(weights_only=False)). `load_pieces` reads every file (mmap'd) and assembles the
block the loading rank holds: codes whose saver held exactly this block in this form are
installed unchanged; otherwise the overlapping savers' codes are turned into fp32 values
(each with its own scales) and quantized in the loader's own blocks.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import torch

from galore_ds.layouts.base import local_tensor
from galore_ds.optim.checkpoint.places import block_of, low_place, low_shape, named_entries, place, quantized_keys
from galore_ds.optim.entry import Entry

PIECES = "galore_state_rank{rank}.pt"


def _weight_piece(e: Entry) -> tuple[torch.Tensor, int]:
    """(this rank's weights of the parameter, flattened, fp32 masters where the optimizer keeps
    them; the offset of the first in the flattened parameter): pieces of whole parameters
    that `load_pieces` reassembles on any layout."""
    lay = e.layout
    if lay.piece is not None:
        pc = lay.piece
        return pc.flat.data[pc.offset:pc.offset + pc.numel], pc.start
    local = local_tensor(e.param).detach()
    if lay.group is None:
        return local.reshape(-1), 0
    if lay.split_dim == 0:
        return local.reshape(-1), lay.rows[0] * (lay.shape[1] if lay.is_matrix else 1)
    raise NotImplementedError("piece files hold row blocks and flat ranges; use DCP for column-sharded DTensors")


def save_pieces(opt, directory: str, rank: int, weights: bool = True) -> str:
    """Write this rank's part of the optimizer state (and of the weights the optimizer steps)
    as pieces of logical tensors, keyed by parameter name: `galore_state_rank<r>.pt`. Together
    the files of all ranks hold everything, whatever the world size or ZeRO stage."""
    codes = quantized_keys(opt.rule)
    entries = {}
    for name, e in named_entries(opt):
        state = {}
        for key, value in e.state.items():
            if not torch.is_tensor(value):
                state[key] = ("scalar", value)
            elif key in codes:
                state[key] = ("raw", low_place(e), tuple(value.shape), value.detach().cpu())
            else:
                where = place(e, key, value)
                state[key] = ("piece", where.shape, where.dim, where.start, value.detach().cpu())
        entry = {"shape": tuple(e.layout.shape), "state": state}
        if weights and e.holds:
            w, start = _weight_piece(e)
            entry["weights"] = (start, w.detach().float().cpu().clone())
        entries[name] = entry
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PIECES.format(rank=rank))
    # with delayed clipping's carried coefficient (the same on every rank), which no entry holds
    torch.save({"entries": entries, "next_clip_coef": float(opt.next_clip_coef)}, path)
    return path


def _saved_clip_coef(directory: str) -> float:
    """The delayed-clipping coefficient `save_pieces` wrote (1.0 in files from before it did)."""
    first = sorted(glob.glob(os.path.join(directory, "galore_state_rank*.pt")))[0]
    return float(torch.load(first, map_location="cpu", weights_only=False, mmap=True).get("next_clip_coef", 1.0))


def read_pieces(directory: str) -> list[dict]:
    """The entries of every rank's piece file under `directory` (mmap'd, on the CPU)."""
    files = sorted(glob.glob(os.path.join(directory, "galore_state_rank*.pt")))
    if not files:
        raise FileNotFoundError(f"no galore_state_rank*.pt under {directory}")
    return [torch.load(f, map_location="cpu", weights_only=False, mmap=True)["entries"] for f in files]


def _assemble(pieces: list[tuple], shape: tuple[int, ...], dtype) -> torch.Tensor:
    """The logical tensor from (dim, start, block) pieces (overlaps hold equal values)."""
    full = torch.zeros(shape, dtype=dtype)
    for dim, start, block in pieces:
        if dim is None:
            return block.clone()
        full.narrow(dim, start, block.shape[dim]).copy_(block)
    return full


def load_pieces(opt, directory: str, weights: bool = True) -> dict[str, torch.Tensor]:
    """Install the state `save_pieces` wrote (on any world size) into this rank's layout; put
    the weights into the blocks the optimizer steps, and return every full weight by name
    (for the caller's other copies: 16-bit model parameters)."""
    files = read_pieces(directory)
    opt.next_clip_coef = _saved_clip_coef(directory)
    assembled: dict[str, torch.Tensor] = {}

    def full_weights(name: str) -> torch.Tensor:
        """A whole parameter from every saver's piece (including those this rank does not hold:
        ZeRO-1/2 keep every 16-bit parameter whole on every rank)."""
        if name not in assembled:
            saved = [f[name] for f in files if name in f]
            shape = saved[0]["shape"]
            flat = torch.zeros(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float32)
            for s in saved:
                if "weights" in s:
                    start, w = s["weights"]
                    flat[start:start + w.numel()] = w
            assembled[name] = flat.reshape(shape)
        return assembled[name]

    for group in opt.param_groups:
        for p in group["params"]:
            opt.state.setdefault(p, {})
    if opt.zero is not None:
        for ft in opt.zero.flats.values():
            for seg in ft.segments:
                if seg.layout is not None:
                    opt.state.setdefault(seg.key, {})
    for name, e in list(named_entries(opt)):
        saved = [f[name] for f in files if name in f]
        if not saved:
            opt.state.pop(e.key, None)
            continue
        new: dict[str, Any] = {}
        raws = [{k: v for k, v in s["state"].items() if v[0] == "raw"} for s in saved]
        raws = [r for r in raws if r]
        for key in {k for s in saved for k in s["state"]}:
            kinds = [s["state"][key] for s in saved if key in s["state"]]
            if kinds[0][0] == "scalar":
                new[key] = kinds[0][1]
            elif kinds[0][0] == "piece":
                shape = kinds[0][1]
                logical = _assemble([(k[2], k[3], k[4]) for k in kinds], shape, kinds[0][4].dtype)
                new[key] = block_of(logical, place(e, key, logical), e).to(e.p_local.device).clone()
        if raws:
            new.update(_reform_codes(opt.rule, e, raws))
        opt.state[e.key] = new
        if weights and e.holds:
            w, start = _weight_piece(e)
            w.copy_(full_weights(name).reshape(-1)[start:start + w.numel()].to(w.dtype))
    return {name: full_weights(name) for name in {n for f in files for n in f}} if weights else {}


def _reform_codes(rule, e: Entry, raws: list[dict[str, tuple]]) -> dict[str, torch.Tensor]:
    """A quantized rule's state for this rank's block from every saver's raw codes: a saver's
    block that is exactly this one, in the form the rule gives it, is installed as it is;
    otherwise each saver's fp32 values (from its own scales) are assembled, sliced and
    quantized in this rank's blocks."""
    logical = low_place(e)
    local = low_shape(e)
    code = rule.code_keys[0]   # shaped like the moment block
    fresh = rule.zero_state(local, e.group)
    for saver in raws:  # one saver's block was exactly this one
        _, where, shape, codes = saver[code]
        if where == logical and tuple(shape) == local and codes.dtype == fresh[code].dtype:
            return {k: v[3].to(e.p_local.device).clone() for k, v in saver.items()}
    blocks: dict[str, list[tuple]] = {}
    for saver in raws:
        where = saver[code][1]
        for key, values in rule.to_values({k: v[3] for k, v in saver.items()}).items():
            blocks.setdefault(key, []).append((where.dim, where.start, values))
    values = {key: block_of(_assemble(b, logical.shape, torch.float32), logical, e) for key, b in blocks.items()}
    return rule.from_values(values, e.group, local, e.p_local.device)


__all__ = ["save_pieces", "load_pieces", "read_pieces", "PIECES"]
