"""galore_ds's own DCP form, which the FSDP engine saves (train/engines/fsdp.py):
`dcp_state_dict` for torch.distributed.checkpoint.save, `dcp_load` to load it on any world size.

The model is torch's model state dict; the optimizer is the flat form (flat.py) keyed by
parameter name, its split state as DTensor blocks of logical tensors (places.py), which DCP
reshards. A quantized rule's codes (GaLoreAdamW8bit) have one absmax per 256 values of the
rank's OWN moment block, so they are not blocks of one tensor: each rank saves its codes as
they are (`places.shard_key`, 2 bytes per entry, as in memory). A rank with the same block and
form installs them unchanged (a resume on the same world size is bit-identical); otherwise it
reads the saved blocks that overlap its own, takes each one's fp32 values (with its own
absmax) and quantizes its block in its own blocks, within one code step: the signed map has +1
but no -1, so re-quantizing is not the identity, which is why the same layout keeps the codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from galore_ds.core import projector as pj
from galore_ds.layouts.base import local_tensor
from galore_ds.optim.checkpoint.flat import optim_state_dict
from galore_ds.optim.checkpoint.places import (
    SCALAR_KEYS, dtensor_block, from_tensor, low_place, low_shape, lr_value, named_entries, shard_key, shard_of,
    span,
)
from galore_ds.optim.entry import Entry


def dcp_state_dict(model: torch.nn.Module, opt) -> dict:
    """{"model": ..., "optim": ...} for torch.distributed.checkpoint.save (see the module
    docstring): state keyed by parameter name, blocks of split logical tensors as DTensors,
    GaLoreAdamW8bit's codes per shard as they are."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    return {"model": get_model_state_dict(model), "optim": optim_state_dict(opt, names, raw_8bit=True)}


def _saved_tensors(checkpoint_id: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(checkpoint_id).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def dcp_load(model: torch.nn.Module, opt, checkpoint_id: str) -> None:
    """Load a checkpoint written by `dcp_state_dict` + dcp.save, on any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    saved = _saved_tensors(checkpoint_id)
    names = {id(p): n for n, p in model.named_parameters()}
    rule = opt.rule
    optim: dict[str, Any] = {f"group{gi}.lr": torch.tensor(0.0, dtype=torch.float64)
                             for gi in range(len(opt.param_groups))}
    optim["next_clip_coef"] = torch.tensor(1.0, dtype=torch.float64)  # (1.0: a checkpoint from before it was saved)
    plans = []
    for name, e in _all_entries(opt, names):
        device = e.p_local.device
        st: dict[str, torch.Tensor] = {"step": torch.tensor(-1, dtype=torch.int64)}
        if e.galore:
            m, n = e.layout.shape
            r = e.group["rank"]
            st["proj"] = pj.stored_layout(torch.zeros((r, n) if e.side == "right" else (m, r),
                                                      dtype=pj.storage_dtype(e.p_local.dtype), device=device))
            st["proj_right"] = torch.tensor(e.side == "right")
            st["refresh_offset"] = torch.tensor(0, dtype=torch.int64)
        keys = rule.state_shapes(low_shape(e), e.group)
        raw: dict[str, str] = {}
        reads = None
        shards_saved = _saved_shards(name, rule.code_keys[0], saved) if rule.quantized else None
        if shards_saved is not None:
            raw, reads = _plan_codes(rule, e, name, shards_saved, saved, optim)
            keys = {}
        for key, shape in keys.items():
            # the saved dtype: the rule keeps some moments in the weights' dtype (AdamW's on a
            # bf16 norm), and a moment that comes back in another dtype rounds differently
            dtype = saved.get(f"optim.{name}.{key}", (None, torch.float32))[1]
            st[key] = dtensor_block(e, key, torch.zeros(shape, device=device, dtype=dtype))
        for key, value in st.items():
            optim[f"{name}.{key}"] = value
        plans.append((name, e, st, raw, reads, shards_saved))
    sd = {"model": get_model_state_dict(model), "optim": optim}
    dcp.load(sd, checkpoint_id=checkpoint_id, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(model, sd["model"])
    optim = sd["optim"]
    opt.next_clip_coef = float(optim["next_clip_coef"])
    for gi, group in enumerate(opt.param_groups):
        group["lr"] = lr_value(optim[f"group{gi}.lr"])
    for name, e, st, raw, reads, shards_saved in plans:
        if int(optim[f"{name}.step"]) == -1:
            opt.state.pop(e.key, None)
            continue
        new: dict[str, Any] = {}
        for key in st:
            v = optim[f"{name}.{key}"]
            v = local_tensor(v)
            new[key] = from_tensor(v) if key in SCALAR_KEYS else v.clone()
        if raw:
            new.update({k: optim[v].clone() for k, v in raw.items()})
        elif shards_saved is not None:
            values = _assemble_values(rule, e, name, optim, reads, shards_saved)
            shape = tuple(next(iter(values.values())).shape)
            new.update(rule.from_values(values, e.group, shape, e.p_local.device))
        opt.state[e.key] = new


def _all_entries(opt, names: dict[int, str]) -> Iterator[tuple[str, Entry]]:
    """(name, Entry) of every parameter, state or not (a loading optimizer has none yet)."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state.setdefault(p, {})
    yield from named_entries(opt, names)


def _saved_shards(name: str, code_key: str, saved: dict) -> int | None:
    """How many shards the saver's codes of parameter `name` came in (None: saved as values)."""
    prefix = f"optim.{name}.{code_key}@shard0of"   # (shard_key's form)
    return next((int(k[len(prefix):]) for k in saved if k.startswith(prefix)), None)


@dataclass(frozen=True)
class _Reads:
    dim: int | None      # the saver's split dimension (None: whole copies)
    starts: list[int]    # saved block offsets along it
    wanted: list[int]    # saved blocks this rank reads


def _plan_codes(rule, e: Entry, name: str, shards_saved: int, saved: dict,
                optim: dict) -> tuple[dict[str, str], _Reads | None]:
    """Placeholders for the saved code shards of a quantized rule this rank needs: its own
    layout's (installed as they are) when shard count, shapes and form match, else the saved
    shards that overlap its block (re-formed). Returns ({state key: checkpoint key} of raw
    tensors, reads)."""
    shard, shards = shard_of(e)
    device = e.p_local.device
    if shards_saved == shards:
        fresh = rule.zero_state(low_shape(e), e.group, device)
        keys = {k: shard_key(name, k, shard, shards) for k in fresh}
        if all(saved.get("optim." + keys[k]) == (v.shape, v.dtype) for k, v in fresh.items()):
            optim.update({keys[k]: v for k, v in fresh.items()})
            return keys, None
    logical = low_place(e)
    # codes are shaped like the moment block they quantize
    shapes = [tuple(saved[f"optim.{shard_key(name, rule.code_keys[0], k, shards_saved)}"][0])
              for k in range(shards_saved)]
    # the dimension the saver split the moments along: where its blocks are shorter
    saved_dim = next((d for d in range(len(logical.shape)) if shapes[0][d] != logical.shape[d]), None)
    if saved_dim is None:  # every saver held the whole tensor: one copy is enough
        starts, wanted = [0, logical.shape[0]], [0]
    else:
        starts = [0]
        for shape in shapes:
            starts.append(starts[-1] + shape[saved_dim])
        lo, hi = span(e, logical, saved_dim)
        wanted = [k for k in range(shards_saved) if starts[k] < hi and lo < starts[k + 1]]
    for k in wanted:
        for key in rule.code_keys + rule.scale_keys:
            full_key = f"optim.{shard_key(name, key, k, shards_saved)}"
            if full_key in saved:
                shape, dtype = saved[full_key]
                optim[full_key[len("optim."):]] = torch.empty(shape, dtype=dtype, device=device)
    return {}, _Reads(saved_dim, starts, wanted)


def _assemble_values(rule, e: Entry, name: str, loaded: dict, reads: _Reads,
                     shards_saved: int) -> dict[str, torch.Tensor]:
    """This rank's block of each moment's fp32 values from the saved code shards it read
    (each shard's values from its own codes and scales)."""
    logical = low_place(e)
    parts: dict[str, list[torch.Tensor]] = {}
    for k in reads.wanted:
        keys = {key: shard_key(name, key, k, shards_saved) for key in rule.code_keys + rule.scale_keys}
        for key, values in rule.to_values({key: loaded[sk] for key, sk in keys.items() if sk in loaded}).items():
            parts.setdefault(key, []).append(values)
    out = {}
    for key, blocks in parts.items():
        if reads.dim is None:
            block = blocks[0]
        else:
            block = torch.cat(blocks, dim=reads.dim)
            lo, hi = span(e, logical, reads.dim)
            first = reads.starts[reads.wanted[0]]
            block = block.narrow(reads.dim, lo - first, hi - lo)
        if logical.dim is not None and logical.dim != reads.dim:
            lo, hi = span(e, logical, logical.dim)
            block = block.narrow(logical.dim, lo, hi - lo)
        out[key] = block
    return out


__all__ = ["dcp_state_dict", "dcp_load"]
