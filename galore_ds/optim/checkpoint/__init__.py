"""Checkpoint formats for the GaLore optimizers' state that do not depend on the world size:
save on W ranks, load on W'. Each format is one module; where each state tensor lies in its
logical tensor, which they all share, is places.py.

  module           API                              who goes through it
  galore_dcp.py    dcp_state_dict, dcp_load         the FSDP engine (train/engines/fsdp.py)
  flat.py          optim_state_dict,                torchtitan (integrations/torchtitan.py,
                   load_optim_state_dict,           integrations/torchtitan_trainspec.py)
                   create_state
  pieces.py        save_pieces, load_pieces         the DeepSpeed engine with a GaLore optimizer,
                                                    on another world size or ZeRO stage
  torch_pieces.py  save_torch_pieces,               the DeepSpeed engine with the AdamW
                   load_torch_pieces                baseline, likewise
  (optim/step.py)  the optimizers' state_dict,      the single, DDP and per-layer engines;
                   load_state_dict: torch's form,   torch's get_/set_optimizer_state_dict +
                   split state as places.py's       DCP; Accelerate; HF Trainer
                   DTensor blocks

A quantized rule's moments (GaLoreAdamW8bit) go through the rule's own codec
(core/rule.py, QuantizedRule): no module here knows its form.
"""
from galore_ds.optim.checkpoint.flat import create_state, load_optim_state_dict, optim_state_dict
from galore_ds.optim.checkpoint.galore_dcp import dcp_load, dcp_state_dict
from galore_ds.optim.checkpoint.pieces import load_pieces, save_pieces
from galore_ds.optim.checkpoint.places import Place, dtensor_block, low_place, named_entries, place
from galore_ds.optim.checkpoint.torch_pieces import load_torch_pieces, save_torch_pieces

__all__ = ["dcp_state_dict", "dcp_load", "optim_state_dict", "load_optim_state_dict", "create_state", "save_pieces",
           "load_pieces", "save_torch_pieces", "load_torch_pieces", "place", "low_place", "Place", "named_entries",
           "dtensor_block"]
