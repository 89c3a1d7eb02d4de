"""galore_ds: GaLore (gradient low-rank projection) for LLaMA pre-training, from one 24 GB
GPU to DeepSpeed ZeRO 0-3 and FSDP2 clusters.

    import galore_ds
    opt = galore_ds.GaLoreAdamW(galore_ds.param_groups(model, rank=128), lr=1e-2)

The optimizers read how each parameter is laid out (plain tensor, FSDP2/HSDP DTensor,
DeepSpeed ZeRO partition) and take the exact step for it. Layers, each importing only the
ones before it: core (math) -> layouts -> optim (the step, these classes) -> integrations -> train ->
tools; launch/train.py on top.
"""
from galore_ds.core.groups import param_groups
from galore_ds.optim.layerwise import LayerwiseOptimizer
from galore_ds.optim.step import GaLoreOptimizer
from galore_ds.optim.lowrank_ddp import LowRankHookState, lowrank_comm_hook
from galore_ds.optim import ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

__version__ = "0.2.0"
__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreAdafactor", "FiraAdamW", "ApolloAdamW", "GaLoreOptimizer",
           "LayerwiseOptimizer", "LowRankHookState", "lowrank_comm_hook", "param_groups"]
