"""The optimizer over every layout: the one step (step.py), the projector refresh
(refresh.py), the per-layer wrapper (layerwise.py), the DDP hook that sends low-rank gradients
(lowrank_ddp.py), the checkpoint formats (checkpoint/), and the public optimizers, one
constructor per file (adamw.py, adamw8bit.py, adafactor.py; GaLore's successors at its memory:
fira.py, apollo.py)."""
from galore_ds.optim.adafactor import GaLoreAdafactor
from galore_ds.optim.adamw import GaLoreAdamW
from galore_ds.optim.adamw8bit import GaLoreAdamW8bit
from galore_ds.optim.apollo import ApolloAdamW
from galore_ds.optim.fira import FiraAdamW

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "FiraAdamW", "ApolloAdamW"]
